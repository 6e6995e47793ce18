"""Every RPC of both services against every kind of caller: the expected code, and no forbidden
call changes any data (docs/security.md has the same table in words). Each caller's token is
signed once with a PEM key the services trust and once by the identity provider whose JWKS they
fetch (tests/support/jwks.py): both paths give the same answers."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import field_mask_pb2

from booking.v1 import booking_pb2, booking_pb2_grpc
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit.auth import ADMIN, CLIENT, SERVICE, THERAPIST
from service_kit.errors import error_details
from tests.support.auth import AUDIENCE, ISSUER, bearer, provider_key, token
from tests.support.jwks import SigningKey, claims_for
from tests.support.world import ALL_WEEK, World, grant, scene_rows, ts

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
MISSING = grpc.StatusCode.NOT_FOUND
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

CALLERS = (
    "none",
    "expired",
    "forged",
    "wrong_audience",
    "client_self",
    "client_other",
    "therapist_self",
    "therapist_other",
    "admin",
    "service",
)
UNAUTHENTICATED_CALLERS = frozenset(CALLERS[:4])
READERS = frozenset({"client_self", "client_other", "therapist_self", "therapist_other", "admin"})
OWNERS = frozenset({"client_self", "therapist_self", "admin"})

# rpc -> {caller: code} for the authenticated callers; a caller not named gets PERMISSION_DENIED.
EXPECTED: dict[str, dict[str, grpc.StatusCode]] = {
    "CreateTherapist": {"admin": OK},
    "GetTherapist": dict.fromkeys(READERS, OK),
    "UpdateTherapist": {"therapist_self": OK, "admin": OK},
    "SetWeeklySchedule": {"therapist_self": OK, "admin": OK},
    "SetDateOverride": {"therapist_self": OK, "admin": OK},
    "DeleteDateOverride": {"therapist_self": OK, "admin": OK},
    "GetSchedule": dict.fromkeys(READERS, OK),
    "CreateSessionType": {"therapist_self": OK, "admin": OK},
    "ListSessionTypes": dict.fromkeys(READERS, OK),
    "ListAvailableSlots": dict.fromkeys(READERS, OK),
    "CreateBooking": {"client_self": OK, "admin": OK},
    # Another's booking looks missing: forbidden and absent are alike to an outsider.
    "GetBooking": {**dict.fromkeys(OWNERS, OK), "client_other": MISSING, "therapist_other": MISSING},
    "ListBookings": {"client_self": OK, "admin": OK},
    "CancelBooking": {**dict.fromkeys(OWNERS, OK), "client_other": MISSING, "therapist_other": MISSING},
    "RescheduleBooking": {**dict.fromkeys(OWNERS, OK), "client_other": MISSING, "therapist_other": MISSING},
    "ListDeadLetters": {"admin": OK},
    # The admin may; the dead letter does not exist.
    "RetryDeadLetter": {"admin": MISSING},
    "ListTherapists": dict.fromkeys(READERS, OK),
    "SearchAvailability": dict.fromkeys(READERS, OK),
    "ArchiveTherapist": {"admin": OK},
    "UnarchiveTherapist": {"admin": OK},
    "UpdateSessionType": {"therapist_self": OK, "admin": OK},
    "RetireSessionType": {"therapist_self": OK, "admin": OK},
    "CreateWebhookEndpoint": {"admin": OK},
    "ListWebhookEndpoints": {"admin": OK},
    "UpdateWebhookEndpoint": {"admin": OK},
    "RotateWebhookSecret": {"admin": OK},
    "DisableWebhookEndpoint": {"admin": OK},
    "EnableWebhookEndpoint": {"admin": OK},
    "DeleteWebhookEndpoint": {"admin": OK},
    # The endpoint's partner (role service, subject = partner_id) reads it; nobody else but admins.
    "GetWebhookEndpoint": {"admin": OK, "service": OK},
    "ListWebhookAttempts": {"admin": OK, "service": OK},
    "ListWebhookDeliveries": {"admin": OK, "service": OK},
    # The caller may; the delivery does not exist.
    "RetryWebhookDelivery": {"admin": MISSING, "service": MISSING},
    "CreateBookingSeries": {"client_self": OK, "admin": OK},
    # A client never may; the therapist and an admin are refused only because it has not started.
    "RecordSessionOutcome": {"therapist_self": REFUSED, "admin": REFUSED, "therapist_other": MISSING},
    "RotateCalendarFeed": {"therapist_self": OK, "admin": OK},
    # No token is asked, none read: every caller alike, and a token nobody made finds no feed.
    "GetCalendarFeed": dict.fromkeys(CALLERS, MISSING),
    "JoinWaitlist": {"client_self": OK, "admin": OK},
    # Another client's entry or offer looks missing; a therapist has no waitlist calls.
    "GetWaitlistEntry": {"client_self": OK, "admin": OK, "client_other": MISSING},
    "LeaveWaitlist": {"client_self": OK, "admin": OK, "client_other": MISSING},
    # No offer has this id (offers come from the waitlist worker).
    "AcceptWaitlistOffer": dict.fromkeys(("client_self", "client_other", "admin"), MISSING),
    "CancelFollowingBookings": {**dict.fromkeys(OWNERS, OK), "client_other": MISSING, "therapist_other": MISSING},
    "GrantCredits": {"admin": OK},
    "GetBalance": {"client_self": OK, "admin": OK},
    "ListLedgerEntries": {"client_self": OK, "admin": OK},
    "ReserveCredits": {"service": OK},
    "BatchReserveCredits": {"service": OK},
    # The batch is answered; its one item says the reservation does not exist.
    "BatchCommitReservations": {"service": OK},
    # The service may; the reservation does not exist.
    "CommitReservation": {"service": MISSING},
    "CancelReservation": {"service": MISSING},
    "RefundReservation": {"service": MISSING},
    "GetReservation": {"service": MISSING, "admin": MISSING},
    "ListReservations": {"service": OK, "admin": OK},
}

BOOKING_RPCS = [m.name for m in booking_pb2.DESCRIPTOR.services_by_name["BookingService"].methods]
CREDIT_RPCS = [m.name for m in credit_pb2.DESCRIPTOR.services_by_name["CreditService"].methods]


# RPCs whose request carries its own credential instead of a bearer token.
OPEN_RPCS = frozenset({"GetCalendarFeed"})


def expected_code(rpc: str, caller: str) -> grpc.StatusCode:
    if rpc in OPEN_RPCS:
        return EXPECTED[rpc][caller]
    if caller in UNAUTHENTICATED_CALLERS:
        return UNAUTHENTICATED
    return EXPECTED[rpc].get(caller, DENIED)


def test_the_table_names_every_rpc_of_both_services() -> None:
    assert set(EXPECTED) == set(BOOKING_RPCS) | set(CREDIT_RPCS)


# The webhook endpoints of this module: nowhere reachable (the discard port), for reschedules only,
# and deleted when the module ends, so that no other test's events go to them.
AUTHZ_ENDPOINT = booking_pb2.WebhookEndpoint(
    url="http://127.0.0.1:9/authz",
    event_types=["booking.rescheduled"],
    description="authz",
    partner_id="booking-service",
)


@dataclass
class Scene:
    world: World
    booking_stub: Any
    credit_stub: Any
    starts: itertools.count[int]
    series_starts: itertools.count[int]
    # Channels that attach no token at all.
    anonymous_booking: Any
    anonymous_credit: Any
    # A disabled endpoint whose partner is the `service` caller.
    endpoint_id: str

    def next_start(self) -> datetime:
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
        return day + timedelta(hours=next(self.starts))

    async def fresh_booking(self) -> str:
        return (await self.world.book(self.next_start())).booking_id

    def series_request(self, request_id: str) -> booking_pb2.CreateBookingSeriesRequest:
        """A weekly series of two, far beyond the single bookings, an hour after the previous
        series (fewer than a week of hours are used, so no two series meet)."""
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=100)
        w = self.world
        return booking_pb2.CreateBookingSeriesRequest(
            request_id=request_id,
            client_id=w.client_id,
            therapist_id=w.therapist_id,
            session_type_id=w.session_type_id,
            start_time=ts(day + timedelta(hours=next(self.series_starts))),
            occurrences=2,
        )


@pytest.fixture(scope="module")
async def scene(
    booking_stub: booking_pb2_grpc.BookingServiceStub,
    credit_stub: credit_pb2_grpc.CreditServiceStub,
    booking_address: str,
    credit_address: str,
) -> AsyncIterator[Scene]:
    world = await World.create(booking_stub, credit_stub)
    await grant(world.credit, world.client_id, 10_000)
    endpoint = await new_endpoint(booking_stub)
    async with (
        grpc.aio.insecure_channel(booking_address) as booking_channel,
        grpc.aio.insecure_channel(credit_address) as credit_channel,
    ):
        yield Scene(
            world,
            booking_stub,
            credit_stub,
            itertools.count(),
            itertools.count(),
            booking_pb2_grpc.BookingServiceStub(booking_channel),
            credit_pb2_grpc.CreditServiceStub(credit_channel),
            endpoint,
        )
    admin: Any = booking_stub
    listed = await admin.ListWebhookEndpoints(booking_pb2.ListWebhookEndpointsRequest(page_size=500))
    for made in listed.endpoints:
        if made.description == AUTHZ_ENDPOINT.description:
            await admin.DeleteWebhookEndpoint(booking_pb2.DeleteWebhookEndpointRequest(endpoint_id=made.endpoint_id))


async def new_endpoint(booking_stub: Any) -> str:
    """A disabled endpoint of this module (by an admin); its id."""
    created = await booking_stub.CreateWebhookEndpoint(
        booking_pb2.CreateWebhookEndpointRequest(request_id=str(uuid.uuid4()), endpoint=AUTHZ_ENDPOINT)
    )
    endpoint_id: str = created.endpoint.endpoint_id
    await booking_stub.DisableWebhookEndpoint(booking_pb2.DisableWebhookEndpointRequest(endpoint_id=endpoint_id))
    return endpoint_id


def caller_token(caller: str, world: World, via: str = "pem") -> str | None:
    stranger = str(uuid.uuid4())
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: token(
            world.client_id, [CLIENT], ttl_s=60, now_s=datetime.now(UTC).timestamp() - 3600, via=via
        ),
        "forged": lambda: forged_token(world.client_id, [CLIENT, ADMIN], via),
        "wrong_audience": lambda: token(world.client_id, [CLIENT], audience="someone-else", via=via),
        "client_self": lambda: token(world.client_id, [CLIENT], via=via),
        "client_other": lambda: token(stranger, [CLIENT], via=via),
        "therapist_self": lambda: token(world.therapist_id, [THERAPIST], via=via),
        "therapist_other": lambda: token(stranger, [THERAPIST], via=via),
        "admin": lambda: token(stranger, [ADMIN], via=via),
        "service": lambda: token("booking-service", [SERVICE], via=via),
    }
    return None if caller == "none" else tokens[caller]()


def forged_token(subject: str, roles: list[str], via: str) -> str:
    """Signed by a key nobody trusts; over the JWKS path it even names the provider's kid."""
    if via == "pem":
        return token(subject, roles, key=Ed25519PrivateKey.generate())
    impostor = SigningKey.rsa(provider_key().kid)
    return impostor.mint(claims_for(subject, roles, issuer=ISSUER, audience=AUDIENCE))


def actor_of(caller: str) -> booking_pb2.CancellationActor.ValueType:
    if caller.startswith("therapist"):
        return booking_pb2.CANCELLATION_ACTOR_THERAPIST
    if caller == "admin":
        return booking_pb2.CANCELLATION_ACTOR_ADMIN
    return booking_pb2.CANCELLATION_ACTOR_CLIENT


Call = Callable[[Scene, str, Any], Awaitable[object]]


async def request_for(rpc: str, scene: Scene, caller: str) -> tuple[Any, Any]:  # noqa: PLR0911  # one per kind
    """(stub method, request) for one call; targets the scene's therapist, client and bookings."""
    w, b, c = scene.world, scene.booking_stub, scene.credit_stub
    rid = str(uuid.uuid4())
    start = scene.next_start()
    therapist = booking_pb2.Therapist(display_name="Dr. Auth", time_zone="UTC", booking_horizon_days=365)
    requests: dict[str, Callable[[], Awaitable[tuple[Any, Any]]]] = {}

    async def plain(method: Any, request: Any) -> tuple[Any, Any]:
        return method, request

    requests = {
        "CreateTherapist": lambda: plain(
            b.CreateTherapist, booking_pb2.CreateTherapistRequest(request_id=rid, therapist=therapist)
        ),
        "GetTherapist": lambda: plain(b.GetTherapist, booking_pb2.GetTherapistRequest(therapist_id=w.therapist_id)),
        "UpdateTherapist": lambda: plain(
            b.UpdateTherapist,
            booking_pb2.UpdateTherapistRequest(
                therapist=booking_pb2.Therapist(therapist_id=w.therapist_id, display_name="Dr. Test"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
        ),
        "SetWeeklySchedule": lambda: plain(
            b.SetWeeklySchedule, booking_pb2.SetWeeklyScheduleRequest(therapist_id=w.therapist_id, windows=ALL_WEEK)
        ),
        "SetDateOverride": lambda: plain(
            b.SetDateOverride, booking_pb2.SetDateOverrideRequest(therapist_id=w.therapist_id, date="2099-01-01")
        ),
        "DeleteDateOverride": lambda: plain(
            b.DeleteDateOverride,
            booking_pb2.DeleteDateOverrideRequest(therapist_id=w.therapist_id, date="2099-01-01"),
        ),
        "GetSchedule": lambda: plain(b.GetSchedule, booking_pb2.GetScheduleRequest(therapist_id=w.therapist_id)),
        "CreateSessionType": lambda: plain(
            b.CreateSessionType,
            booking_pb2.CreateSessionTypeRequest(
                therapist_id=w.therapist_id,
                request_id=rid,
                session_type=booking_pb2.SessionType(name="Auth", duration_minutes=50, credit_cost=1),
            ),
        ),
        "ListSessionTypes": lambda: plain(
            b.ListSessionTypes, booking_pb2.ListSessionTypesRequest(therapist_id=w.therapist_id)
        ),
        "ListAvailableSlots": lambda: plain(
            b.ListAvailableSlots,
            booking_pb2.ListAvailableSlotsRequest(
                therapist_id=w.therapist_id,
                session_type_id=w.session_type_id,
                start_time=ts(start),
                end_time=ts(start + timedelta(hours=2)),
            ),
        ),
        "CreateBooking": lambda: plain(b.CreateBooking, w.booking_request(start, request_id=rid)),
        "ListBookings": lambda: plain(b.ListBookings, booking_pb2.ListBookingsRequest(client_id=w.client_id)),
        "CreateBookingSeries": lambda: plain(b.CreateBookingSeries, scene.series_request(rid)),
        "RotateCalendarFeed": lambda: plain(
            b.RotateCalendarFeed, booking_pb2.RotateCalendarFeedRequest(therapist_id=w.therapist_id)
        ),
        "GetCalendarFeed": lambda: plain(b.GetCalendarFeed, booking_pb2.GetCalendarFeedRequest(feed_token="A" * 43)),
        "ListDeadLetters": lambda: plain(b.ListDeadLetters, booking_pb2.ListDeadLettersRequest()),
        "RetryDeadLetter": lambda: plain(b.RetryDeadLetter, booking_pb2.RetryDeadLetterRequest(event_id=rid)),
        "GrantCredits": lambda: plain(
            c.GrantCredits,
            credit_pb2.GrantCreditsRequest(
                request_id=rid, owner_id=w.client_id, amount=1, kind=credit_pb2.GRANT_KIND_PURCHASE
            ),
        ),
        "GetBalance": lambda: plain(c.GetBalance, credit_pb2.GetBalanceRequest(owner_id=w.client_id)),
        "ListLedgerEntries": lambda: plain(
            c.ListLedgerEntries, credit_pb2.ListLedgerEntriesRequest(owner_id=w.client_id)
        ),
        "ReserveCredits": lambda: plain(
            c.ReserveCredits,
            credit_pb2.ReserveCreditsRequest(reservation_id=rid, owner_id=w.client_id, amount=1, reference="authz"),
        ),
        "BatchReserveCredits": lambda: plain(
            c.BatchReserveCredits,
            credit_pb2.BatchReserveCreditsRequest(
                requests=[
                    credit_pb2.ReserveCreditsRequest(
                        reservation_id=rid, owner_id=w.client_id, amount=1, reference="authz"
                    )
                ]
            ),
        ),
        "CommitReservation": lambda: plain(
            c.CommitReservation, credit_pb2.CommitReservationRequest(reservation_id=rid)
        ),
        "BatchCommitReservations": lambda: plain(
            c.BatchCommitReservations,
            credit_pb2.BatchCommitReservationsRequest(
                requests=[credit_pb2.CommitReservationRequest(reservation_id=rid)]
            ),
        ),
        "CancelReservation": lambda: plain(
            c.CancelReservation, credit_pb2.CancelReservationRequest(reservation_id=rid)
        ),
        "RefundReservation": lambda: plain(
            c.RefundReservation, credit_pb2.RefundReservationRequest(reservation_id=rid, amount=1)
        ),
        "GetReservation": lambda: plain(c.GetReservation, credit_pb2.GetReservationRequest(reservation_id=rid)),
        "ListReservations": lambda: plain(c.ListReservations, credit_pb2.ListReservationsRequest(owner_id=w.client_id)),
    }
    requests.update(discovery_requests(scene, start))
    requests.update(webhook_requests(scene, rid))
    prepared = await request_on_its_own_target(rpc, scene)
    if prepared is not None:
        return prepared
    if rpc in ("JoinWaitlist", "GetWaitlistEntry", "LeaveWaitlist"):
        day = scene.next_start()
        join = booking_pb2.JoinWaitlistRequest(
            request_id=rid,
            client_id=w.client_id,
            therapist_id=w.therapist_id,
            session_type_id=w.session_type_id,
            window_start=booking_pb2.LocalDateTime(date_time=f"{day:%Y-%m-%dT%H:%M}", time_zone="UTC"),
            window_end=booking_pb2.LocalDateTime(date_time=f"{day:%Y-%m-%dT%H}:30", time_zone="UTC"),
        )
        if rpc == "JoinWaitlist":
            return b.JoinWaitlist, join
        entry = (await b.JoinWaitlist(join)).entry
        if rpc == "GetWaitlistEntry":
            return b.GetWaitlistEntry, booking_pb2.GetWaitlistEntryRequest(entry_id=entry.entry_id)
        return b.LeaveWaitlist, booking_pb2.LeaveWaitlistRequest(entry_id=entry.entry_id)
    if rpc == "AcceptWaitlistOffer":
        return b.AcceptWaitlistOffer, booking_pb2.AcceptWaitlistOfferRequest(offer_id=str(uuid.uuid4()), request_id=rid)
    if rpc == "RecordSessionOutcome":
        booking_id = await scene.fresh_booking()
        return b.RecordSessionOutcome, booking_pb2.RecordSessionOutcomeRequest(
            booking_id=booking_id, outcome=booking_pb2.SESSION_OUTCOME_COMPLETED
        )
    if rpc == "CancelFollowingBookings":
        series = await b.CreateBookingSeries(scene.series_request(rid))
        return b.CancelFollowingBookings, booking_pb2.CancelFollowingBookingsRequest(
            booking_id=series.bookings[0].booking_id,
            actor=actor_of(caller),
            reason=booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT,
        )
    if rpc in ("GetBooking", "CancelBooking", "RescheduleBooking"):
        booking_id = await scene.fresh_booking()
        if rpc == "GetBooking":
            return b.GetBooking, booking_pb2.GetBookingRequest(booking_id=booking_id)
        if rpc == "CancelBooking":
            return b.CancelBooking, booking_pb2.CancelBookingRequest(
                booking_id=booking_id,
                actor=actor_of(caller),
                reason=booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT,
            )
        return b.RescheduleBooking, booking_pb2.RescheduleBookingRequest(
            booking_id=booking_id, request_id=rid, start_time=ts(scene.next_start())
        )
    return await requests[rpc]()


async def request_on_its_own_target(rpc: str, scene: Scene) -> tuple[Any, Any] | None:
    """The calls whose success would spoil the scene for the calls after them (an archived
    therapist, a retired type, a deleted endpoint) act on a target of their own, made now."""
    w, b, c = scene.world, scene.booking_stub, scene.credit_stub
    if rpc == "ArchiveTherapist":
        other = await World.create(b, c, credits=0)
        return b.ArchiveTherapist, booking_pb2.ArchiveTherapistRequest(therapist_id=other.therapist_id)
    if rpc == "UnarchiveTherapist":
        other = await World.create(b, c, credits=0)
        await b.ArchiveTherapist(booking_pb2.ArchiveTherapistRequest(therapist_id=other.therapist_id))
        return b.UnarchiveTherapist, booking_pb2.UnarchiveTherapistRequest(therapist_id=other.therapist_id)
    if rpc == "RetireSessionType":
        spare = await w.add_session_type(50)
        return b.RetireSessionType, booking_pb2.RetireSessionTypeRequest(
            therapist_id=w.therapist_id, session_type_id=spare
        )
    if rpc == "DeleteWebhookEndpoint":
        return b.DeleteWebhookEndpoint, booking_pb2.DeleteWebhookEndpointRequest(endpoint_id=await new_endpoint(b))
    return None


def discovery_requests(scene: Scene, start: datetime) -> dict[str, Callable[[], Awaitable[tuple[Any, Any]]]]:
    w, b = scene.world, scene.booking_stub

    async def plain(method: Any, request: Any) -> tuple[Any, Any]:
        return method, request

    return {
        "ListTherapists": lambda: plain(b.ListTherapists, booking_pb2.ListTherapistsRequest(page_size=5)),
        "SearchAvailability": lambda: plain(
            b.SearchAvailability,
            booking_pb2.SearchAvailabilityRequest(
                duration_minutes=50, start_time=ts(start), end_time=ts(start + timedelta(hours=2)), page_size=2
            ),
        ),
        "UpdateSessionType": lambda: plain(
            b.UpdateSessionType,
            booking_pb2.UpdateSessionTypeRequest(
                session_type=booking_pb2.SessionType(
                    therapist_id=w.therapist_id, session_type_id=w.session_type_id, name="Auth"
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
        ),
    }


def webhook_requests(scene: Scene, rid: str) -> dict[str, Callable[[], Awaitable[tuple[Any, Any]]]]:
    b, endpoint_id = scene.booking_stub, scene.endpoint_id

    async def plain(method: Any, request: Any) -> tuple[Any, Any]:
        return method, request

    return {
        "CreateWebhookEndpoint": lambda: plain(
            b.CreateWebhookEndpoint,
            booking_pb2.CreateWebhookEndpointRequest(request_id=rid, endpoint=AUTHZ_ENDPOINT),
        ),
        "GetWebhookEndpoint": lambda: plain(
            b.GetWebhookEndpoint, booking_pb2.GetWebhookEndpointRequest(endpoint_id=endpoint_id)
        ),
        "ListWebhookEndpoints": lambda: plain(b.ListWebhookEndpoints, booking_pb2.ListWebhookEndpointsRequest()),
        "UpdateWebhookEndpoint": lambda: plain(
            b.UpdateWebhookEndpoint,
            booking_pb2.UpdateWebhookEndpointRequest(
                endpoint=booking_pb2.WebhookEndpoint(endpoint_id=endpoint_id, description="authz"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
        ),
        "RotateWebhookSecret": lambda: plain(
            b.RotateWebhookSecret, booking_pb2.RotateWebhookSecretRequest(endpoint_id=endpoint_id)
        ),
        "DisableWebhookEndpoint": lambda: plain(
            b.DisableWebhookEndpoint, booking_pb2.DisableWebhookEndpointRequest(endpoint_id=endpoint_id)
        ),
        # Enabling it changes nothing an outsider could see: the scene's own enabled endpoint is
        # disabled again by the next DisableWebhookEndpoint call, and nothing is sent meanwhile but
        # reschedules to the discard port.
        "EnableWebhookEndpoint": lambda: plain(
            b.EnableWebhookEndpoint, booking_pb2.EnableWebhookEndpointRequest(endpoint_id=endpoint_id)
        ),
        "ListWebhookAttempts": lambda: plain(
            b.ListWebhookAttempts, booking_pb2.ListWebhookAttemptsRequest(endpoint_id=endpoint_id)
        ),
        "ListWebhookDeliveries": lambda: plain(
            b.ListWebhookDeliveries, booking_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id)
        ),
        "RetryWebhookDelivery": lambda: plain(
            b.RetryWebhookDelivery,
            booking_pb2.RetryWebhookDeliveryRequest(endpoint_id=endpoint_id, delivery_id=rid),
        ),
    }


@pytest.mark.parametrize("via", ["pem", "jwks"])
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", BOOKING_RPCS + CREDIT_RPCS)
async def test_every_rpc_answers_every_caller_as_the_table_says(
    rpc: str, caller: str, via: str, scene: Scene, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    method, request = await request_for(rpc, scene, caller)
    expected = expected_code(rpc, caller)
    value = caller_token(caller, scene.world, via)
    metadata: tuple[tuple[str, str], ...] = ()
    if value is None:
        anonymous = scene.anonymous_booking if rpc in BOOKING_RPCS else scene.anonymous_credit
        method = getattr(anonymous, rpc)
    else:
        metadata = bearer(value)
    before = await scene_rows(booking_db, credit_db, scene.world)

    try:
        await method(request, metadata=metadata, timeout=10)
        code = OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
        details = error_details(error)
        if expected is UNAUTHENTICATED:
            assert details.reason in ("TOKEN_MISSING", "TOKEN_EXPIRED", "TOKEN_INVALID"), details
        if expected is DENIED:
            assert details.reason == "PERMISSION_DENIED", details

    assert code == expected, f"{rpc} as {caller}"
    if expected is not OK:
        assert await scene_rows(booking_db, credit_db, scene.world) == before, f"{rpc} as {caller} changed data"


async def test_an_expired_token_says_so_and_a_missing_one_too(scene: Scene) -> None:
    request = credit_pb2.GetBalanceRequest(owner_id=scene.world.client_id)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await scene.credit_stub.GetBalance(request, metadata=bearer(caller_token("expired", scene.world) or ""))
    assert error_details(expired.value).reason == "TOKEN_EXPIRED"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await scene.anonymous_credit.GetBalance(request)
    assert error_details(missing.value).reason == "TOKEN_MISSING"


async def test_a_client_cannot_cancel_as_the_therapist(
    scene: Scene, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking_id = await scene.fresh_booking()
    before = await scene_rows(booking_db, credit_db, scene.world)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await scene.booking_stub.CancelBooking(
            booking_pb2.CancelBookingRequest(
                booking_id=booking_id,
                actor=booking_pb2.CANCELLATION_ACTOR_THERAPIST,
                reason=booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT,
            ),
            metadata=bearer(token(scene.world.client_id, [CLIENT])),
        )
    assert refused.value.code() == DENIED
    assert await scene_rows(booking_db, credit_db, scene.world) == before


async def test_a_missing_booking_and_anothers_look_alike(scene: Scene) -> None:
    booking_id = await scene.fresh_booking()
    stranger = bearer(token(uuid.uuid4(), [CLIENT]))
    answers = []
    for target in (booking_id, str(uuid.uuid4())):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await scene.booking_stub.GetBooking(booking_pb2.GetBookingRequest(booking_id=target), metadata=stranger)
        details = error_details(refused.value)
        answers.append((details.code, details.reason, details.message.replace(target, "<id>")))
    assert answers[0] == answers[1]


async def test_a_malformed_id_is_invalid_argument_naming_the_field_even_where_rights_are_checked_first(
    scene: Scene,
) -> None:
    """A malformed value is not a question of rights: a client sending a malformed client_id, a
    therapist a malformed therapist_id, gets INVALID_ARGUMENT naming the field, as the handler
    would say, not PERMISSION_DENIED from the rule that compares the id with the caller."""
    w = scene.world
    as_client = bearer(token(w.client_id, [CLIENT]))
    as_therapist = bearer(token(w.therapist_id, [THERAPIST]))
    missing = w.booking_request(scene.next_start())
    missing.client_id = ""
    calls = [
        (scene.booking_stub.CreateBooking, w.booking_request(scene.next_start(), client_id="not-a-uuid"), as_client),
        (scene.booking_stub.CreateBooking, missing, as_client),
        (scene.credit_stub.GetBalance, credit_pb2.GetBalanceRequest(owner_id="A" * 36), as_client),
        (
            scene.booking_stub.SetWeeklySchedule,
            booking_pb2.SetWeeklyScheduleRequest(therapist_id=w.therapist_id.upper(), windows=ALL_WEEK),
            as_therapist,
        ),
    ]
    for method, request, metadata in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await method(request, metadata=metadata, timeout=10)
        details = error_details(raised.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (request, details)
        assert len(details.field_violations) == 1, details
        assert next(iter(details.field_violations)) in ("client_id", "owner_id", "therapist_id"), details
