"""Session outcomes and their policies: COMPLETED or NO_SHOW recorded once a session started, by its
therapist or an admin (never a client); a no-show refunds the session type's share once, through
the credit service's partial refund; a late cancellation its own share; the sweeper completes the
sessions nobody marked after its period. Time moves by the service's clock (tests/support/clocked.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

import grpc
import pytest

from booking.v1 import booking_pb2
from booking_service.domain import (
    Actor,
    Booking,
    CancelReason,
    PaymentStatus,
    SessionAlreadyStarted,
    SessionOutcome,
    SessionType,
    Therapist,
)
from booking_service.practice import OutcomeAlreadyRecorded, SessionNotStarted
from booking_service.requests import NewStart
from credit.v1 import credit_pb2_grpc
from service_kit.auth import CLIENT, THERAPIST
from tests.support.auth import bearer, token
from tests.support.clocked import (
    Clocked,
    available,
    clocked_service,
    new_booking,
    therapist_with_type,
    whole_hour_after,
)
from tests.support.world import World, grant, refusal

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

pytestmark = pytest.mark.timeout(60)

SWEEP_AFTER = timedelta(hours=48)
REFUNDED = PaymentStatus.REFUNDED


async def book(
    clocked: Clocked, therapist: Therapist, session_type: SessionType, client: uuid.UUID, hours: int
) -> Booking:
    """A booking `hours` whole hours after the clock's now."""
    start = whole_hour_after(clocked.clock.now, hours)
    return await clocked.service.bookings.create(new_booking(therapist, session_type, client, start))


@pytest.fixture(scope="module")
async def clocked(postgres_server_url: str, credit_address: str) -> AsyncIterator[Clocked]:
    async with clocked_service(
        postgres_server_url, credit_address, BOOKING_OUTCOME_SWEEP_AFTER_S=str(SWEEP_AFTER.total_seconds())
    ) as started:
        yield started


async def test_a_client_cannot_record_an_outcome_and_a_session_has_none_before_it_starts(world: World) -> None:
    booking = await world.book(whole_hour_after(datetime.now(UTC), 30))
    request = booking_pb2.RecordSessionOutcomeRequest(
        booking_id=booking.booking_id, outcome=booking_pb2.SESSION_OUTCOME_NO_SHOW
    )

    as_client = await refusal(
        world.booking.RecordSessionOutcome(request, metadata=bearer(token(world.client_id, [CLIENT])))
    )
    as_therapist = await refusal(
        world.booking.RecordSessionOutcome(request, metadata=bearer(token(world.therapist_id, [THERAPIST])))
    )
    as_another_therapist = await refusal(
        world.booking.RecordSessionOutcome(request, metadata=bearer(token(str(uuid.uuid4()), [THERAPIST])))
    )

    assert (as_client.code, as_client.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert (as_therapist.code, as_therapist.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_NOT_STARTED")
    assert as_another_therapist.code == grpc.StatusCode.NOT_FOUND
    assert (await world.get(booking.booking_id)).outcome == booking_pb2.SESSION_OUTCOME_UNSPECIFIED


async def test_a_no_show_refunds_the_session_types_share_once(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    credit = cast("CreditServiceAsyncStub", credit_stub)
    service, clock = clocked.service, clocked.clock
    therapist, session_type = await therapist_with_type(service, credit_cost=10, no_show_refund_percent=50)
    client = uuid.uuid4()
    await grant(credit_stub, str(client), 100)
    start = whole_hour_after(clock.now, 5)
    booking = await service.bookings.create(new_booking(therapist, session_type, client, start))

    with pytest.raises(SessionNotStarted):
        await service.outcomes.record(booking.booking_id, SessionOutcome.NO_SHOW, Actor.THERAPIST)
    clock.move_to(start + timedelta(minutes=10))
    marked = await service.outcomes.record(booking.booking_id, SessionOutcome.NO_SHOW, Actor.THERAPIST)
    again = await service.outcomes.record(booking.booking_id, SessionOutcome.NO_SHOW, Actor.ADMIN)

    assert (marked.outcome, marked.outcome_by, marked.outcome_at) == (
        SessionOutcome.NO_SHOW,
        Actor.THERAPIST,
        clock.now,
    )
    assert (marked.refunded_credits, marked.payment_status) == (5, PaymentStatus.REFUNDED)
    assert (again.outcome_by, again.refunded_credits, again.payment_status) == (
        Actor.THERAPIST,
        5,
        PaymentStatus.REFUNDED,
    )
    with pytest.raises(OutcomeAlreadyRecorded):
        await service.outcomes.record(booking.booking_id, SessionOutcome.COMPLETED, Actor.ADMIN)
    assert await available(credit, client) == (95, 0, 5)
    await service.outbox.deliver_once()
    (sent,) = clocked.notifier.of_type("booking.no_show")
    assert json.loads(sent.body)["data"]["outcome"] == "no_show"


async def test_completed_refunds_nothing_and_cancelling_a_session_that_happened_is_refused(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    service, clock = clocked.service, clocked.clock
    therapist, session_type = await therapist_with_type(service, no_show_refund_percent=100)
    client = uuid.uuid4()
    await grant(credit_stub, str(client), 100)
    start = whole_hour_after(clock.now, 2)
    booking = await service.bookings.create(new_booking(therapist, session_type, client, start))
    clock.move_to(start + timedelta(minutes=55))

    marked = await service.outcomes.record(booking.booking_id, SessionOutcome.COMPLETED, Actor.ADMIN)

    assert (marked.outcome, marked.refunded_credits, marked.payment_status) == (
        SessionOutcome.COMPLETED,
        0,
        PaymentStatus.PAID,
    )
    with pytest.raises(OutcomeAlreadyRecorded):
        await service.changes.cancel(booking.booking_id, Actor.ADMIN, CancelReason.ADMINISTRATIVE)


async def test_a_late_cancellation_refunds_the_session_types_share_and_an_early_one_all(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    service, clock = clocked.service, clocked.clock
    therapist, session_type = await therapist_with_type(
        service, credit_cost=10, late_cancel_notice_minutes=120, late_cancel_refund_percent=30
    )
    client = uuid.uuid4()
    await grant(credit_stub, str(client), 100)
    late = await book(clocked, therapist, session_type, client, 3)
    early = await book(clocked, therapist, session_type, client, 6)
    clock.move_to(late.starts_at - timedelta(minutes=119))

    cancelled_late = await service.changes.cancel(late.booking_id, Actor.CLIENT, CancelReason.ADMINISTRATIVE)
    cancelled_early = await service.changes.cancel(early.booking_id, Actor.CLIENT, CancelReason.ADMINISTRATIVE)

    assert cancelled_late.refunded_credits == 3
    assert cancelled_early.refunded_credits == 10


async def test_the_sweeper_completes_the_sessions_nobody_marked_after_its_period(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    service, clock = clocked.service, clocked.clock
    therapist, session_type = await therapist_with_type(service)
    client = uuid.uuid4()
    await grant(credit_stub, str(client), 100)
    unmarked = await service.bookings.create(
        new_booking(therapist, session_type, client, whole_hour_after(clock.now, 20))
    )
    marked = await service.bookings.create(
        new_booking(therapist, session_type, client, whole_hour_after(clock.now, 22))
    )
    clock.move_to(marked.starts_at + timedelta(minutes=5))
    await service.outcomes.record(marked.booking_id, SessionOutcome.NO_SHOW, Actor.THERAPIST)

    clock.move_to(unmarked.ends_at + SWEEP_AFTER - timedelta(seconds=1))
    await service.outcomes.sweep_once()
    assert (await service.changes.booking(unmarked.booking_id)).outcome is None
    clock.move_to(marked.ends_at + SWEEP_AFTER)
    await service.outcomes.sweep_once()

    swept = await service.changes.booking(unmarked.booking_id)
    assert (swept.outcome, swept.outcome_by, swept.outcome_at) == (SessionOutcome.COMPLETED, Actor.SYSTEM, clock.now)
    assert (await service.changes.booking(marked.booking_id)).outcome is SessionOutcome.NO_SHOW
    assert await service.outcomes.sweep_once() is False


async def test_a_session_that_has_started_can_no_longer_be_cancelled_or_moved(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    service, clock = clocked.service, clocked.clock
    therapist, session_type = await therapist_with_type(service)
    client = uuid.uuid4()
    await grant(credit_stub, str(client), 100)
    booking = await book(clocked, therapist, session_type, client, 2)
    clock.move_to(booking.starts_at + timedelta(seconds=1))

    with pytest.raises(SessionAlreadyStarted):
        await service.changes.cancel(booking.booking_id, Actor.CLIENT, CancelReason.NO_LONGER_NEEDED)
    with pytest.raises(SessionAlreadyStarted):
        await service.changes.reschedule(
            NewStart("clocked-test", str(uuid.uuid4()), booking.booking_id, booking.starts_at + timedelta(days=1))
        )
    assert await service.changes.booking(booking.booking_id) == booking
