"""booking.v1.BookingService's waitlist RPCs: each checks its request, calls one use case and
answers, as servicer.py does, which mixes them in. An entry or offer of another client looks
missing (NOT_FOUND), as another's booking does."""

from __future__ import annotations

from typing import Any

import grpc

from booking.v1 import booking_pb2
from booking_service.domain import MAX_SLOT_RANGE
from booking_service.messages import booking_message, local_instant, timestamp
from booking_service.practice import OfferNotFound, WaitlistEntry, WaitlistEntryNotFound, WaitlistStatus
from booking_service.requests import NewWaitlistEntry
from booking_service.service import BookingService
from service_kit.auth import ADMIN, current_principal
from service_kit.validation import Checks

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS_TO_PROTO = {
    WaitlistStatus.WAITING: booking_pb2.WAITLIST_STATUS_WAITING,
    WaitlistStatus.OFFERED: booking_pb2.WAITLIST_STATUS_OFFERED,
    WaitlistStatus.BOOKED: booking_pb2.WAITLIST_STATUS_BOOKED,
    WaitlistStatus.LEFT: booking_pb2.WAITLIST_STATUS_LEFT,
    WaitlistStatus.EXPIRED: booking_pb2.WAITLIST_STATUS_EXPIRED,
}


def entry_message(entry: WaitlistEntry) -> booking_pb2.WaitlistEntry:
    message = booking_pb2.WaitlistEntry(
        entry_id=str(entry.entry_id),
        client_id=str(entry.client_id),
        therapist_id=str(entry.therapist_id),
        session_type_id=str(entry.session_type_id),
        window_start_time=timestamp(entry.wanted_from),
        window_end_time=timestamp(entry.wanted_until),
        status=_STATUS_TO_PROTO[entry.status],
        booking_id="" if entry.booking_id is None else str(entry.booking_id),
    )
    if entry.offer is not None:
        message.offer.CopyFrom(
            booking_pb2.WaitlistOffer(
                offer_id=str(entry.offer.offer_id),
                start_time=timestamp(entry.offer.starts_at),
                expire_time=timestamp(entry.offer.expires_at),
            )
        )
    return message


def _mine(entry: WaitlistEntry) -> bool:
    principal = current_principal()
    return principal.has(ADMIN) or principal.is_subject(str(entry.client_id))


class WaitlistRpcs:
    _service: BookingService

    async def JoinWaitlist(
        self, request: booking_pb2.JoinWaitlistRequest, context: Context
    ) -> booking_pb2.JoinWaitlistResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        client_id = checks.uuid("client_id", request.client_id)
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        session_type_id = checks.uuid("session_type_id", request.session_type_id)
        checks.done()
        start = local_instant(checks, "window_start", request.window_start)
        end = local_instant(checks, "window_end", request.window_end)
        if not start < end <= start + MAX_SLOT_RANGE:
            checks.fail("window_end", f"must be after window_start and at most {MAX_SLOT_RANGE.days} days after it")
        checks.done()
        caller = current_principal().subject
        entry = await self._service.waitlist.join(
            NewWaitlistEntry(caller, request_id, client_id, therapist_id, session_type_id, start, end)
        )
        return booking_pb2.JoinWaitlistResponse(entry=entry_message(entry))

    async def GetWaitlistEntry(
        self, request: booking_pb2.GetWaitlistEntryRequest, context: Context
    ) -> booking_pb2.GetWaitlistEntryResponse:
        checks = Checks()
        entry_id = checks.uuid("entry_id", request.entry_id)
        checks.done()
        entry = await self._service.waitlist.entry(entry_id)
        if not _mine(entry):
            raise WaitlistEntryNotFound(entry_id)
        return booking_pb2.GetWaitlistEntryResponse(entry=entry_message(entry))

    async def LeaveWaitlist(
        self, request: booking_pb2.LeaveWaitlistRequest, context: Context
    ) -> booking_pb2.LeaveWaitlistResponse:
        checks = Checks()
        entry_id = checks.uuid("entry_id", request.entry_id)
        checks.done()
        if not _mine(await self._service.waitlist.entry(entry_id)):
            raise WaitlistEntryNotFound(entry_id)
        return booking_pb2.LeaveWaitlistResponse(entry=entry_message(await self._service.waitlist.leave(entry_id)))

    async def AcceptWaitlistOffer(
        self, request: booking_pb2.AcceptWaitlistOfferRequest, context: Context
    ) -> booking_pb2.AcceptWaitlistOfferResponse:
        checks = Checks()
        offer_id = checks.uuid("offer_id", request.offer_id)
        request_id = checks.request_id("request_id", request.request_id)
        checks.done()
        if not _mine(await self._service.waitlist.entry_of_offer(offer_id)):
            raise OfferNotFound(offer_id)
        booking = await self._service.waitlist.accept(offer_id, current_principal().subject, request_id)
        return booking_pb2.AcceptWaitlistOfferResponse(booking=booking_message(booking))
