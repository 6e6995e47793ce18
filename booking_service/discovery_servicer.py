"""booking.v1.BookingService's discovery and catalogue-change RPCs: ListTherapists,
SearchAvailability, Archive/UnarchiveTherapist, UpdateSessionType, RetireSessionType. A mixin of
the servicer (servicer.py): each handler checks its request, calls one use case and answers."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import grpc

from booking.v1 import booking_pb2
from booking_service import availability, domain
from booking_service.discovery import MAX_SEARCH_RANGE, AvailabilityQuery, Available
from booking_service.messages import (
    MAX_NAME_LENGTH,
    SESSION_TYPE_UPDATABLE_FIELDS,
    languages,
    session_type_message,
    shown,
    slot_message,
    specialties,
    therapist_message,
    time_zones,
)
from booking_service.practice_servicer import session_type_policy
from booking_service.service import BookingService
from booking_service.store.discovery import TherapistFilter
from service_kit import pagination
from service_kit.validation import Checks

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEFAULT_SEARCH_PAGE_SIZE = 10
MAX_SEARCH_PAGE_SIZE = 50
DEFAULT_SLOTS_PER_THERAPIST = 3
MAX_SLOTS_PER_THERAPIST = 10
MAX_CREDIT_COST = 10_000
# The refund policy's fields of a session type (practice_servicer.session_type_policy).
POLICY_FIELDS = (
    "late_cancellation_notice_minutes",
    "late_cancellation_refund_percent",
    "no_show_refund_percent",
)


class DiscoveryHandlers:
    _service: BookingService

    async def ListTherapists(
        self, request: booking_pb2.ListTherapistsRequest, context: Context
    ) -> booking_pb2.ListTherapistsResponse:
        checks = Checks()
        where = _filter(
            checks,
            request,
            zones_field="time_zones",
            zones=request.time_zones,
            duration_minutes=_optional_duration(checks, request.duration_minutes),
            include_archived=request.include_archived,
        )
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        after = pagination.decode_instant_and_id(request.page_token, (where,))
        page = await self._service.discovery.list_therapists(where, after, page_size)
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.created_at, last.therapist_id, (where,))
        return booking_pb2.ListTherapistsResponse(
            therapists=[therapist_message(t) for t in page.items], next_page_token=next_token
        )

    async def SearchAvailability(
        self, request: booking_pb2.SearchAvailabilityRequest, context: Context
    ) -> booking_pb2.SearchAvailabilityResponse:
        checks = Checks()
        duration = checks.integer("duration_minutes", request.duration_minutes, minimum=5, maximum=480)
        start = checks.instant("start_time", request.start_time)
        end = checks.instant("end_time", request.end_time)
        if not checks.violations and not start < end <= start + MAX_SEARCH_RANGE:
            checks.fail("end_time", f"must be after start_time and at most {MAX_SEARCH_RANGE.days} days after it")
        where = _filter(
            checks,
            request,
            zones_field="therapist_time_zones",
            zones=request.therapist_time_zones,
            duration_minutes=duration,
            include_archived=False,
        )
        slots_per_therapist = checks.page_size(
            "slots_per_therapist",
            request.slots_per_therapist,
            default=DEFAULT_SLOTS_PER_THERAPIST,
            maximum=MAX_SLOTS_PER_THERAPIST,
        )
        page_size = checks.page_size(
            "page_size", request.page_size, default=DEFAULT_SEARCH_PAGE_SIZE, maximum=MAX_SEARCH_PAGE_SIZE
        )
        display_zone = request.time_zone
        checks.done()
        if display_zone:
            try:
                availability.zone(display_zone)
            except availability.AvailabilityError as error:
                raise domain.domain_error(error) from None
        query = AvailabilityQuery(timedelta(minutes=duration), start, end, where, slots_per_therapist, page_size)
        # The token belongs to this search: the same range, filters, zone and slots per
        # therapist (the page size may change from page to page).
        filters = (replace(query, page_size=0), display_zone)
        after = pagination.decode_instant_and_id(request.page_token, filters)
        page = await self._service.discovery.search(query, after)
        next_token = ""
        if page.next_cursor is not None:
            next_token = pagination.encode_instant_and_id(*page.next_cursor, filters)
        return booking_pb2.SearchAvailabilityResponse(
            results=[_availability_message(found, display_zone) for found in page.results],
            next_page_token=next_token,
            therapists_examined=page.examined,
        )

    async def ArchiveTherapist(
        self, request: booking_pb2.ArchiveTherapistRequest, context: Context
    ) -> booking_pb2.ArchiveTherapistResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        therapist = await self._service.catalogue.set_archived(therapist_id, archived=True)
        return booking_pb2.ArchiveTherapistResponse(therapist=therapist_message(therapist))

    async def UnarchiveTherapist(
        self, request: booking_pb2.UnarchiveTherapistRequest, context: Context
    ) -> booking_pb2.UnarchiveTherapistResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        therapist = await self._service.catalogue.set_archived(therapist_id, archived=False)
        return booking_pb2.UnarchiveTherapistResponse(therapist=therapist_message(therapist))

    async def UpdateSessionType(
        self, request: booking_pb2.UpdateSessionTypeRequest, context: Context
    ) -> booking_pb2.UpdateSessionTypeResponse:
        checks = Checks()
        given = request.session_type
        therapist_id = checks.uuid("session_type.therapist_id", given.therapist_id)
        session_type_id = checks.uuid("session_type.session_type_id", given.session_type_id)
        paths = tuple(request.update_mask.paths)
        allowed = ", ".join(SESSION_TYPE_UPDATABLE_FIELDS)
        if not paths:
            checks.fail("update_mask", f"must name the fields to change: {allowed}")
        elif "duration_minutes" in paths or "start_step_minutes" in paths:
            checks.fail(
                "update_mask",
                "a session type's duration and grid of starts cannot change (its bookings keep theirs): "
                "create another session type and retire this one",
            )
        elif unknown := [p for p in paths if p not in SESSION_TYPE_UPDATABLE_FIELDS]:
            checks.fail("update_mask", f"cannot change {shown(unknown)}; changeable: {allowed}")
        changes: dict[str, Any] = {}
        if "name" in paths:
            changes["name"] = checks.text("session_type.name", given.name, max_length=MAX_NAME_LENGTH, required=True)
        if "credit_cost" in paths:
            changes["credit_cost"] = checks.integer(
                "session_type.credit_cost", given.credit_cost, minimum=1, maximum=MAX_CREDIT_COST
            )
        if any(path in POLICY_FIELDS for path in paths):
            # The refund policy, checked as at creation; a cancellation or a no-show is refunded by
            # the policy in force when it happens.
            notice, late_refund, no_show_refund = session_type_policy(checks, given)
            policy = {
                "late_cancel_notice_minutes": ("late_cancellation_notice_minutes", notice),
                "late_cancel_refund_percent": ("late_cancellation_refund_percent", late_refund),
                "no_show_refund_percent": ("no_show_refund_percent", no_show_refund),
            }
            changes.update({field: value for field, (path, value) in policy.items() if path in paths})
        checks.done()
        updated = await self._service.catalogue.update_session_type(therapist_id, session_type_id, changes)
        return booking_pb2.UpdateSessionTypeResponse(session_type=session_type_message(updated))

    async def RetireSessionType(
        self, request: booking_pb2.RetireSessionTypeRequest, context: Context
    ) -> booking_pb2.RetireSessionTypeResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        session_type_id = checks.uuid("session_type_id", request.session_type_id)
        checks.done()
        retired = await self._service.catalogue.retire_session_type(therapist_id, session_type_id)
        return booking_pb2.RetireSessionTypeResponse(session_type=session_type_message(retired))


def _optional_duration(checks: Checks, minutes: int) -> int:
    if minutes:
        checks.integer("duration_minutes", minutes, minimum=5, maximum=480)
    return minutes


def _filter(
    checks: Checks,
    request: booking_pb2.ListTherapistsRequest | booking_pb2.SearchAvailabilityRequest,
    *,
    zones_field: str,
    zones: Any,
    duration_minutes: int,
    include_archived: bool,
) -> TherapistFilter:
    """The filters both listings share, each bad value a BadRequest violation naming its field."""
    low = checks.integer("min_credit_cost", request.min_credit_cost, minimum=0, maximum=MAX_CREDIT_COST)
    high = checks.integer("max_credit_cost", request.max_credit_cost, minimum=0, maximum=MAX_CREDIT_COST)
    if low and high and low > high:
        checks.fail("max_credit_cost", "must not be below min_credit_cost")
    return TherapistFilter(
        languages=languages(checks, "languages", request.languages),
        specialties=specialties(checks, "specialties", request.specialties),
        time_zones=time_zones(checks, zones_field, zones),
        min_credit_cost=low,
        max_credit_cost=high,
        duration_minutes=duration_minutes,
        include_archived=include_archived,
    )


def _availability_message(found: Available, display_zone: str) -> booking_pb2.TherapistAvailability:
    zone_name = display_zone or found.therapist.time_zone
    return booking_pb2.TherapistAvailability(
        therapist=therapist_message(found.therapist),
        session_types=[session_type_message(s) for s in found.session_types],
        slots=[slot_message(slot, zone_name) for slot in found.slots],
        time_zone=zone_name,
    )
