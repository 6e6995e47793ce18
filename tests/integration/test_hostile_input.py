"""Hostile input to every RPC of both services, over real gRPC to the in-process servers.

For each RPC in the service descriptors (so a new RPC is covered without a line here), Hypothesis
sends requests whose fields are malformed, extreme or hostile (tests/support/hostile.py): some
entirely hostile, some a valid request with one or two fields spoiled, so the bad value also
reaches the code behind the first check (real ids, real page tokens with forged cursors).

Whatever comes in, the answer is a success or a clean refusal: an expected status code (never
UNKNOWN, INTERNAL or a timeout), one ErrorInfo with a stable UPPER_SNAKE reason from the
service's own domain, a BadRequest naming real fields of the request for INVALID_ARGUMENT, and a
message that leaks no traceback or driver internals. Afterwards both services still report
SERVING and book as usual.

Examples are derandomized and the example database is off, so CI runs the same requests each
time; run with --hypothesis-show-statistics to see the outcomes per RPC.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor, duration_pb2, field_mask_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from booking.v1 import booking_pb2, booking_pb2_grpc
from booking_service.requests import request_key
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit import pagination
from service_kit.errors import MAX_REASON_LENGTH, error_details
from service_kit.server import Runtime
from tests.support.auth import OPERATOR_ID
from tests.support.hostile import (
    EDGE_CURSOR_PARTS,
    Material,
    forged_tokens,
    mutated,
    page_token_fields,
    requests,
    retokened,
    with_field,
)
from tests.support.stack import health_status
from tests.support.world import ALL_WEEK, World, future_hour, ts

SERVICES = (
    booking_pb2.DESCRIPTOR.services_by_name["BookingService"],
    credit_pb2.DESCRIPTOR.services_by_name["CreditService"],
)
RPCS = [method for service in SERVICES for method in service.methods]
EXAMPLES_PER_RPC = 50
INTERLEAVED_EXAMPLES = 200
# Hypothesis may stop a little short when it drops examples protobuf itself refuses to build.
MIN_EXAMPLES_PER_RPC = EXAMPLES_PER_RPC * 4 // 5
CALL_TIMEOUT_S = 5.0
# Refusals a client can act on. UNAVAILABLE and DEADLINE_EXCEEDED are absent on purpose: both
# services and the database are up, so either would mean hostile input hurt the service.
CLEAN_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
REASON = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
LEAK = re.compile(r'Traceback|asyncpg|File "|\b[A-Z][A-Za-z0-9]*(Error|Exception)\b')
# Valid requests the scene cannot make succeed, with the refusal they get instead.
REFUSED_VALID_REQUESTS = {
    # Dead letters come only from an outbox event failing for good, which no RPC can cause.
    "booking.v1.BookingService.RetryDeadLetter": "NOT_FOUND DEAD_LETTER_NOT_FOUND",
    # Likewise a dead webhook delivery: an endpoint has to refuse an event for good first.
    "booking.v1.BookingService.RetryWebhookDelivery": "NOT_FOUND WEBHOOK_DELIVERY_NOT_FOUND",
    # Sessions of the scene are in the future; an outcome needs a session that started.
    "booking.v1.BookingService.RecordSessionOutcome": "FAILED_PRECONDITION SESSION_NOT_STARTED",
    # A feed token is made by RotateCalendarFeed and shown once; a well-formed one nobody made.
    "booking.v1.BookingService.GetCalendarFeed": "NOT_FOUND CALENDAR_FEED_NOT_FOUND",
    # Offers come from the waitlist worker when a wanted slot is free; a well-formed id of none.
    "booking.v1.BookingService.AcceptWaitlistOffer": "NOT_FOUND OFFER_NOT_FOUND",
}
# The scene's webhook endpoints: nowhere reachable (the discard port), reschedules only.
HOSTILE_ENDPOINT = booking_pb2.WebhookEndpoint(
    url="http://127.0.0.1:9/hostile", event_types=["booking.rescheduled"], description="hostile"
)
UPDATABLE_THERAPIST_FIELDS = (
    "display_name",
    "time_zone",
    "buffer_before_minutes",
    "buffer_after_minutes",
    "minimum_notice_minutes",
    "booking_horizon_days",
)
# One segment of a BadRequest field path: `windows[3]`, `start_time`.
PATH_SEGMENT = re.compile(r"(?P<name>[a-z_][a-z0-9_]*)(\[(?P<index>\d+)\])?")


@dataclass
class Scene:
    """A therapist with two bookings and a client with two spare reservations, the valid request
    each RPC's mutations start from, and the real ids and page tokens hostile values reuse."""

    material: Material
    # Hypothesis prints the fixtures of a failing example: the material is what reproduces it.
    valid: dict[str, Message] = field(repr=False)
    _strategies: dict[str, st.SearchStrategy[Message]] = field(default_factory=dict, repr=False)

    def requests(self, method: descriptor.MethodDescriptor) -> st.SearchStrategy[Message]:
        if method.full_name not in self._strategies:
            hostile = requests(method.input_type, self.material)
            base = self.valid.get(method.full_name)
            spoiled = [] if base is None else [mutated(base, self.material), retokened(base)]
            self._strategies[method.full_name] = st.one_of(hostile, *[s for s in spoiled if s is not None])
        return self._strategies[method.full_name]


@dataclass(frozen=True)
class Spares:
    """What the RPCs that retire, archive or delete act on, so that the scene's own therapist,
    session type and endpoint stay for the RPCs after them."""

    therapist_id: str
    session_type_id: str
    endpoint_id: str
    deleted_endpoint_id: str


@pytest.fixture(autouse=True)
async def no_endpoint_outlives_a_test(booking_db: asyncpg.Pool) -> AsyncIterator[None]:
    """Webhook endpoints are global to the shared server: those a test made (its scene's, and
    whatever hostile requests managed to create) go when it ends, so that none receives another
    test's events and their number stays far from its bound."""
    started = await booking_db.fetchval("SELECT now()")
    yield
    await booking_db.execute("DELETE FROM booking.webhook_endpoints WHERE created_at >= $1", started)


async def endpoint(world: World) -> str:
    created = await world.booking.CreateWebhookEndpoint(
        booking_pb2.CreateWebhookEndpointRequest(request_id=str(uuid.uuid4()), endpoint=HOSTILE_ENDPOINT)
    )
    endpoint_id: str = created.endpoint.endpoint_id
    return endpoint_id


async def spares_of(world: World) -> Spares:
    spare_therapist = await World.create(world.booking, world.credit, credits=0)
    return Spares(
        spare_therapist.therapist_id, await world.add_session_type(45), await endpoint(world), await endpoint(world)
    )


@pytest.fixture
async def scene(world: World) -> Scene:
    spares = await spares_of(world)
    first = await world.book(future_hour(3, 10))
    second = await world.book(future_hour(4, 10))
    spare_reservation_ids = (str(uuid.uuid4()), str(uuid.uuid4()))
    for reservation_id in spare_reservation_ids:
        await world.credit.ReserveCredits(
            credit_pb2.ReserveCreditsRequest(
                reservation_id=reservation_id, owner_id=world.client_id, amount=5, reference="hostile"
            )
        )
    bookings = booking_pb2.ListBookingsRequest(client_id=world.client_id, page_size=1)
    reservations = credit_pb2.ListReservationsRequest(owner_id=world.client_id, page_size=1)
    entries = credit_pb2.ListLedgerEntriesRequest(owner_id=world.client_id, page_size=1)
    bookings.page_token = (await world.booking.ListBookings(bookings)).next_page_token
    reservations.page_token = (await world.credit.ListReservations(reservations)).next_page_token
    entries.page_token = (await world.credit.ListLedgerEntries(entries)).next_page_token
    assert all((bookings.page_token, reservations.page_token, entries.page_token)), "two or more items each"
    # No event is dead-lettered here, so this token is made the way the service makes one (a
    # cursor after an event updated now; the list has no filters).
    dead_letters = booking_pb2.ListDeadLettersRequest(
        page_size=1, page_token=pagination.encode([datetime.now(UTC).isoformat(), str(uuid.uuid4())], ())
    )
    tokens = (bookings.page_token, reservations.page_token, entries.page_token, dead_letters.page_token)
    material = Material(
        known_ids=(
            world.therapist_id,
            world.session_type_id,
            world.client_id,
            first.booking_id,
            second.booking_id,
            *spare_reservation_ids,
            spares.therapist_id,
            spares.session_type_id,
            spares.endpoint_id,
        ),
        page_tokens=tokens,
    )
    valid = valid_requests(world, (first.booking_id, second.booking_id), spare_reservation_ids, spares)
    valid.update(
        {
            "booking.v1.BookingService.ListBookings": bookings,
            "booking.v1.BookingService.ListDeadLetters": dead_letters,
            "credit.v1.CreditService.ListReservations": reservations,
            "credit.v1.CreditService.ListLedgerEntries": entries,
        }
    )
    return Scene(material, valid)


def valid_requests(
    world: World, booking_ids: tuple[str, str], reservation_ids: tuple[str, str], spares: Spares
) -> dict[str, Message]:
    """A well-formed request per RPC, keyed by its full name, that succeeds when each is called
    once in descriptor order (but REFUSED_VALID_REQUESTS): the first booking is cancelled, the
    second moved; the first reservation is committed, then partly refunded, the second cancelled."""
    therapist_id, session_type_id, client_id = world.therapist_id, world.session_type_id, world.client_id
    first_booking_id, second_booking_id = booking_ids
    reservation_id, reservation_to_cancel_id = reservation_ids
    window = booking_pb2.TimeWindow(start_time="09:00", end_time="17:00")
    slots_from = future_hour(3, 0)
    waitlist_request_id, wanted = str(uuid.uuid4()), future_hour(9, 20)
    entry_id = str(request_key(OPERATOR_ID, waitlist_request_id))
    booking = {
        "CreateTherapist": booking_pb2.CreateTherapistRequest(
            request_id=str(uuid.uuid4()),
            therapist=booking_pb2.Therapist(
                display_name="Dr. Hostile", time_zone="Europe/London", booking_horizon_days=365
            ),
        ),
        "GetTherapist": booking_pb2.GetTherapistRequest(therapist_id=therapist_id),
        # Every changeable field, so spoiling one of them really changes the therapist.
        "UpdateTherapist": booking_pb2.UpdateTherapistRequest(
            therapist=booking_pb2.Therapist(
                therapist_id=therapist_id, display_name="Dr. Renamed", time_zone="UTC", booking_horizon_days=365
            ),
            update_mask=field_mask_pb2.FieldMask(paths=[*UPDATABLE_THERAPIST_FIELDS]),
        ),
        "SetWeeklySchedule": booking_pb2.SetWeeklyScheduleRequest(therapist_id=therapist_id, windows=ALL_WEEK),
        "SetDateOverride": booking_pb2.SetDateOverrideRequest(
            therapist_id=therapist_id, date="2030-01-02", windows=[window]
        ),
        "DeleteDateOverride": booking_pb2.DeleteDateOverrideRequest(therapist_id=therapist_id, date="2030-01-02"),
        "GetSchedule": booking_pb2.GetScheduleRequest(therapist_id=therapist_id),
        "CreateSessionType": booking_pb2.CreateSessionTypeRequest(
            therapist_id=therapist_id,
            request_id=str(uuid.uuid4()),
            session_type=booking_pb2.SessionType(name="Hostile", duration_minutes=30, credit_cost=5),
        ),
        "ListSessionTypes": booking_pb2.ListSessionTypesRequest(therapist_id=therapist_id),
        "ListAvailableSlots": booking_pb2.ListAvailableSlotsRequest(
            therapist_id=therapist_id,
            session_type_id=session_type_id,
            start_time=ts(slots_from),
            end_time=ts(slots_from + timedelta(days=1)),
        ),
        "CreateBooking": booking_pb2.CreateBookingRequest(
            request_id=str(uuid.uuid4()),
            client_id=client_id,
            therapist_id=therapist_id,
            session_type_id=session_type_id,
            # A wall-clock start, so mutations reach the local-time resolution (start_time is
            # one hostile value of the oneof away).
            local_start=booking_pb2.LocalDateTime(
                date_time=future_hour(5, 10).strftime("%Y-%m-%dT%H:%M"), time_zone="Europe/London"
            ),
        ),
        "GetBooking": booking_pb2.GetBookingRequest(booking_id=first_booking_id),
        "CancelBooking": booking_pb2.CancelBookingRequest(
            booking_id=first_booking_id,
            actor=booking_pb2.CANCELLATION_ACTOR_CLIENT,
            reason=booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
        ),
        "RescheduleBooking": booking_pb2.RescheduleBookingRequest(
            booking_id=second_booking_id, request_id=str(uuid.uuid4()), start_time=ts(future_hour(6, 10))
        ),
        "RetryDeadLetter": booking_pb2.RetryDeadLetterRequest(event_id=str(uuid.uuid4())),
        **discovery_requests(world, spares),
        **webhook_requests(spares),
        "CreateBookingSeries": booking_pb2.CreateBookingSeriesRequest(
            request_id=str(uuid.uuid4()),
            client_id=client_id,
            therapist_id=therapist_id,
            session_type_id=session_type_id,
            local_start=booking_pb2.LocalDateTime(
                date_time=future_hour(8, 10).strftime("%Y-%m-%dT%H:%M"), time_zone="Europe/London"
            ),
            occurrences=2,
        ),
        "RotateCalendarFeed": booking_pb2.RotateCalendarFeedRequest(therapist_id=therapist_id),
        "JoinWaitlist": booking_pb2.JoinWaitlistRequest(
            request_id=waitlist_request_id,
            client_id=client_id,
            therapist_id=therapist_id,
            session_type_id=session_type_id,
            window_start=booking_pb2.LocalDateTime(date_time=wanted.strftime("%Y-%m-%dT%H:%M"), time_zone="UTC"),
            window_end=booking_pb2.LocalDateTime(date_time=f"{wanted:%Y-%m-%d}T23:00", time_zone="UTC"),
        ),
        # The entry JoinWaitlist made: its id is the key of its request id (the operator's call).
        "GetWaitlistEntry": booking_pb2.GetWaitlistEntryRequest(entry_id=entry_id),
        "LeaveWaitlist": booking_pb2.LeaveWaitlistRequest(entry_id=entry_id),
        "AcceptWaitlistOffer": booking_pb2.AcceptWaitlistOfferRequest(
            offer_id=str(uuid.uuid4()), request_id=str(uuid.uuid4())
        ),
        "GetCalendarFeed": booking_pb2.GetCalendarFeedRequest(feed_token="A" * 43),
        "RecordSessionOutcome": booking_pb2.RecordSessionOutcomeRequest(
            booking_id=second_booking_id, outcome=booking_pb2.SESSION_OUTCOME_NO_SHOW
        ),
        # A booking of no series: CancelFollowingBookings cancels it alone.
        "CancelFollowingBookings": booking_pb2.CancelFollowingBookingsRequest(
            booking_id=second_booking_id,
            actor=booking_pb2.CANCELLATION_ACTOR_CLIENT,
            reason=booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
        ),
    }
    credit = {
        "GrantCredits": credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()), owner_id=client_id, amount=10, kind=credit_pb2.GRANT_KIND_PROMOTION
        ),
        "GetBalance": credit_pb2.GetBalanceRequest(owner_id=client_id),
        "ReserveCredits": credit_pb2.ReserveCreditsRequest(
            reservation_id=str(uuid.uuid4()), owner_id=client_id, amount=1, reference="hostile"
        ),
        "BatchReserveCredits": credit_pb2.BatchReserveCreditsRequest(
            requests=[
                credit_pb2.ReserveCreditsRequest(
                    reservation_id=str(uuid.uuid4()), owner_id=client_id, amount=1, reference="hostile batch"
                )
                for _ in range(2)
            ]
        ),
        "CommitReservation": credit_pb2.CommitReservationRequest(reservation_id=reservation_id, amount=5),
        # The batch is answered OK whatever its items' outcomes are (each has its own).
        "BatchCommitReservations": credit_pb2.BatchCommitReservationsRequest(
            requests=[
                credit_pb2.CommitReservationRequest(reservation_id=reservation_id, amount=5),
                credit_pb2.CommitReservationRequest(reservation_id=str(uuid.uuid4())),
            ]
        ),
        "CancelReservation": credit_pb2.CancelReservationRequest(reservation_id=reservation_to_cancel_id),
        "RefundReservation": credit_pb2.RefundReservationRequest(reservation_id=reservation_id, amount=1),
        "GetReservation": credit_pb2.GetReservationRequest(reservation_id=reservation_id),
    }
    return {f"booking.v1.BookingService.{name}": request for name, request in booking.items()} | {
        f"credit.v1.CreditService.{name}": request for name, request in credit.items()
    }


def discovery_requests(world: World, spares: Spares) -> dict[str, Message]:
    slots_from = future_hour(3, 0)
    return {
        "ListTherapists": booking_pb2.ListTherapistsRequest(page_size=5, languages=["en"]),
        "SearchAvailability": booking_pb2.SearchAvailabilityRequest(
            duration_minutes=50,
            start_time=ts(slots_from),
            end_time=ts(slots_from + timedelta(days=1)),
            time_zone="Europe/London",
            page_size=2,
        ),
        "ArchiveTherapist": booking_pb2.ArchiveTherapistRequest(therapist_id=spares.therapist_id),
        "UnarchiveTherapist": booking_pb2.UnarchiveTherapistRequest(therapist_id=spares.therapist_id),
        "UpdateSessionType": booking_pb2.UpdateSessionTypeRequest(
            session_type=booking_pb2.SessionType(
                therapist_id=world.therapist_id, session_type_id=world.session_type_id, name="Hostile", credit_cost=10
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "credit_cost"]),
        ),
        "RetireSessionType": booking_pb2.RetireSessionTypeRequest(
            therapist_id=world.therapist_id, session_type_id=spares.session_type_id
        ),
    }


def webhook_requests(spares: Spares) -> dict[str, Message]:
    endpoint_id = spares.endpoint_id
    return {
        "CreateWebhookEndpoint": booking_pb2.CreateWebhookEndpointRequest(
            request_id=str(uuid.uuid4()), endpoint=HOSTILE_ENDPOINT
        ),
        "GetWebhookEndpoint": booking_pb2.GetWebhookEndpointRequest(endpoint_id=endpoint_id),
        "ListWebhookEndpoints": booking_pb2.ListWebhookEndpointsRequest(page_size=5),
        "UpdateWebhookEndpoint": booking_pb2.UpdateWebhookEndpointRequest(
            endpoint=booking_pb2.WebhookEndpoint(
                endpoint_id=endpoint_id, url="http://127.0.0.1:9/hostile-2", description="hostile, updated"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["url", "description"]),
        ),
        "RotateWebhookSecret": booking_pb2.RotateWebhookSecretRequest(
            endpoint_id=endpoint_id, overlap=duration_pb2.Duration(seconds=60)
        ),
        "DisableWebhookEndpoint": booking_pb2.DisableWebhookEndpointRequest(endpoint_id=endpoint_id),
        "EnableWebhookEndpoint": booking_pb2.EnableWebhookEndpointRequest(endpoint_id=endpoint_id),
        "DeleteWebhookEndpoint": booking_pb2.DeleteWebhookEndpointRequest(endpoint_id=spares.deleted_endpoint_id),
        "ListWebhookAttempts": booking_pb2.ListWebhookAttemptsRequest(endpoint_id=endpoint_id, page_size=5),
        "ListWebhookDeliveries": booking_pb2.ListWebhookDeliveriesRequest(
            endpoint_id=endpoint_id, state=booking_pb2.WEBHOOK_DELIVERY_STATE_DEAD
        ),
        "RetryWebhookDelivery": booking_pb2.RetryWebhookDeliveryRequest(
            endpoint_id=endpoint_id, delivery_id=str(uuid.uuid4())
        ),
    }


@dataclass(frozen=True)
class Endpoint:
    stub: Any
    max_message_bytes: int


@pytest.fixture
def endpoints(
    booking_stub: booking_pb2_grpc.BookingServiceStub,
    credit_stub: credit_pb2_grpc.CreditServiceStub,
    booking_server: Runtime,
    credit_server: Runtime,
) -> dict[str, Endpoint]:
    return {
        SERVICES[0].full_name: Endpoint(booking_stub, booking_server.settings.max_message_bytes),
        SERVICES[1].full_name: Endpoint(credit_stub, credit_server.settings.max_message_bytes),
    }


@dataclass
class Examples:
    """The examples of one property that reached the server, by outcome."""

    minimum: int
    outcomes: Counter[str] = field(default_factory=Counter)

    def record(self, outcome: str, *, minimum: int) -> None:
        self.minimum = minimum
        self.outcomes[outcome] += 1
        event(outcome)  # shown per test by --hypothesis-show-statistics


@pytest.fixture
def examples(request: pytest.FixtureRequest) -> Iterator[Examples]:
    """Checks after the test that Hypothesis really ran the examples (it would pass on none)."""
    examples = Examples(minimum=1)
    failed_before = request.session.testsfailed
    yield examples
    ran = examples.outcomes.total()
    if request.session.testsfailed == failed_before:  # a failed property stops early; say so only once
        assert ran >= examples.minimum, f"only {ran} examples ran: {dict(examples.outcomes)}"


def names_a_field(message_type: descriptor.Descriptor, path: str) -> bool:
    """Whether a BadRequest field path such as `windows[3].window.end_time` walks real fields."""
    current: descriptor.Descriptor | None = message_type
    for segment in path.split("."):
        match = PATH_SEGMENT.fullmatch(segment)
        if current is None or match is None:
            return False
        found = current.fields_by_name.get(match["name"])
        if found is None or (match["index"] is not None and not found.is_repeated):
            return False
        current = found.message_type
    return True


def assert_clean_refusal(error: grpc.aio.AioRpcError, method: descriptor.MethodDescriptor) -> None:
    try:
        details = error_details(error)
    except ValueError as unreadable:  # grpc_status: the trailers' status disagrees with the call's code
        pytest.fail(f"{method.name} -> {error.code().name}, status unreadable ({unreadable}): {error.details()!r:.500}")
    shown = f"{method.name} -> {details.code.name} {details.reason}: {details.message[:500]!r}"
    assert details.code in CLEAN_CODES, shown
    assert details.reason is not None, f"no ErrorInfo: {shown}"
    assert REASON.fullmatch(details.reason) and len(details.reason) <= MAX_REASON_LENGTH, shown
    assert details.domain == method.containing_service.full_name, shown
    said = [details.message, error.details() or "", *details.field_violations.values(), *details.metadata.values()]
    assert not any(LEAK.search(text) for text in said), shown
    if details.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.field_violations, f"no BadRequest: {shown}"
        strays = [path for path in details.field_violations if not names_a_field(method.input_type, path)]
        assert not strays, f"violations name no field of {method.input_type.name}: {strays}; {shown}"


async def answer(method: descriptor.MethodDescriptor, request: Message, endpoints: dict[str, Endpoint]) -> str:
    """Sends `request` and checks the answer is clean; the outcome, for statistics."""
    endpoint = endpoints[method.containing_service.full_name]
    oversized = request.ByteSize() > endpoint.max_message_bytes
    error: grpc.aio.AioRpcError | None = None
    try:
        await getattr(endpoint.stub, method.name)(request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as raised:
        error = raised
    if error is None:
        assert not oversized, f"a {request.ByteSize()}-byte request passed the size limit"
        return "OK"
    if oversized:
        # gRPC itself refuses it before any handler runs, so there is no ErrorInfo to check.
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return "RESOURCE_EXHAUSTED (over the server's message size limit)"
    assert_clean_refusal(error, method)
    return f"{error.code().name} {error_details(error).reason}"


HOSTILE_SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,
    # The fixtures (servers, the scene) are meant to outlive the examples: set up once per test.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("method", RPCS, ids=lambda method: method.full_name)
@settings(HOSTILE_SETTINGS, max_examples=EXAMPLES_PER_RPC)
@given(data=st.data())
async def test_hostile_request_gets_a_clean_answer(
    method: descriptor.MethodDescriptor,
    scene: Scene,
    endpoints: dict[str, Endpoint],
    examples: Examples,
    data: st.DataObject,
) -> None:
    request = data.draw(scene.requests(method), label="request")

    outcome = await answer(method, request, endpoints)

    examples.record(outcome, minimum=MIN_EXAMPLES_PER_RPC)


@settings(HOSTILE_SETTINGS, max_examples=INTERLEAVED_EXAMPLES)
@given(data=st.data())
async def test_hostile_requests_in_any_order_to_one_world_get_clean_answers(
    scene: Scene, endpoints: dict[str, Endpoint], examples: Examples, data: st.DataObject
) -> None:
    """The same, with the RPCs mixed on one scene, so hostile state one call leaves behind (a
    therapist moved to UTC+14 with the longest buffers, fifty windows, a session type of 480
    minutes, a refunded hold) meets the other calls."""
    method = data.draw(st.sampled_from(RPCS), label="rpc")
    request = data.draw(scene.requests(method), label="request")

    outcome = await answer(method, request, endpoints)

    examples.record(f"{method.name}: {outcome}", minimum=INTERLEAVED_EXAMPLES * 4 // 5)


async def test_forged_page_token_cursors_get_clean_answers(scene: Scene, endpoints: dict[str, Endpoint]) -> None:
    """Every list request the scene has a real page token for, with its filters kept and the
    token's cursor forged one part at a time through every edge value (the property draws only a
    few of these): a clean answer each time, never a failure deep in the database driver."""
    methods = {method.full_name: method for method in RPCS}
    sent = 0
    for name, base in scene.valid.items():
        for field_name in page_token_fields(base):
            for token in forged_tokens(getattr(base, field_name)):
                await answer(methods[name], with_field(base, field_name, token), endpoints)
                sent += 1
    assert sent >= 4 * len(EDGE_CURSOR_PARTS), "a forged token for each list RPC with a real one"


async def test_every_rpc_has_a_valid_request_that_succeeds(scene: Scene, endpoints: dict[str, Endpoint]) -> None:
    """The requests the mutations start from are valid, in descriptor order, and there is one
    for every RPC: a new RPC without one would still get fully hostile requests, but none that
    reach past its first check."""
    assert set(scene.valid) == {method.full_name for method in RPCS}
    for method in RPCS:
        outcome = await answer(method, scene.valid[method.full_name], endpoints)
        assert outcome == REFUSED_VALID_REQUESTS.get(method.full_name, "OK"), method.full_name


async def test_services_stay_healthy_after_hostile_input(
    world: World, booking_address: str, credit_address: str
) -> None:
    for address, service in ((booking_address, SERVICES[0].full_name), (credit_address, SERVICES[1].full_name)):
        assert await health_status(address, "") == "SERVING"
        assert await health_status(address, service) == "SERVING"

    booking = await world.book(future_hour(3, 10))

    assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    balance = await world.balance()
    assert balance.available == 100 - world.credit_cost
