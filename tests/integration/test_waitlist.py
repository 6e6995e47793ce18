"""The waitlist: clients wait for a start in a window; a freed slot is offered to them in the order
they joined, held for the first (no other request can take it meanwhile), then, when that hold
expires untaken, offered to the next, who books it. Time moves by the service's clock."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from booking_service.domain import Actor, CancelReason, SlotUnavailable
from booking_service.practice import OfferNotOpen, WaitlistStatus
from booking_service.requests import NewWaitlistEntry
from credit.v1 import credit_pb2_grpc
from tests.support.clocked import Clocked, clocked_service, new_booking, therapist_with_type, whole_hour_after
from tests.support.world import grant

pytestmark = pytest.mark.timeout(60)

HOLD = timedelta(minutes=15)


@pytest.fixture
async def clocked(postgres_server_url: str, credit_address: str) -> AsyncIterator[Clocked]:
    async with clocked_service(
        postgres_server_url, credit_address, BOOKING_WAITLIST_OFFER_HOLD_S=str(HOLD.total_seconds())
    ) as started:
        yield started


async def test_a_freed_slot_is_offered_in_order_held_for_the_first_then_booked_by_the_next(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    service, clock = clocked.service, clocked.clock
    therapist, session_type = await therapist_with_type(service)
    holder, first, second, stranger = (uuid.uuid4() for _ in range(4))
    for client in (holder, first, second, stranger):
        await grant(credit_stub, str(client), 100)
    start = whole_hour_after(clock.now, 30)
    taken = await service.bookings.create(new_booking(therapist, session_type, holder, start))

    def join(client: uuid.UUID) -> NewWaitlistEntry:
        # Only that one start is wanted: its window ends a minute after it.
        ids = (therapist.therapist_id, session_type.session_type_id)
        return NewWaitlistEntry("clocked-test", str(uuid.uuid4()), client, *ids, start, start + timedelta(minutes=1))

    first_entry = await service.waitlist.join(join(first))
    second_entry = await service.waitlist.join(join(second))
    await service.waitlist.offer_once()
    assert (await service.waitlist.entry(first_entry.entry_id)).offer is None  # still taken

    await service.changes.cancel(taken.booking_id, Actor.CLIENT, CancelReason.NO_LONGER_NEEDED)
    await service.waitlist.offer_once()
    offered = (await service.waitlist.entry(first_entry.entry_id)).offer
    assert offered is not None and offered.starts_at == start
    assert (await service.waitlist.entry(second_entry.entry_id)).status is WaitlistStatus.WAITING
    await service.outbox.deliver_once()
    (told,) = clocked.notifier.of_type("waitlist.offered")
    assert json.loads(told.body)["data"]["offer_id"] == str(offered.offer_id)

    # The hold: nobody else can book the slot while the offer is open.
    with pytest.raises(SlotUnavailable):
        await service.bookings.create(new_booking(therapist, session_type, stranger, start))

    clock.move_to(offered.expires_at)
    await service.waitlist.offer_once()
    assert (await service.waitlist.entry(first_entry.entry_id)).status is WaitlistStatus.WAITING
    passed_on = (await service.waitlist.entry(second_entry.entry_id)).offer
    assert passed_on is not None and passed_on.starts_at == start
    with pytest.raises(OfferNotOpen):
        await service.waitlist.accept(offered.offer_id, "clocked-test", "late")

    booked = await service.waitlist.accept(passed_on.offer_id, "clocked-test", "take-it")
    again = await service.waitlist.accept(passed_on.offer_id, "clocked-test", "take-it")

    assert (booked.client_id, booked.starts_at) == (second, start)
    assert again.booking_id == booked.booking_id
    entry = await service.waitlist.entry(second_entry.entry_id)
    assert (entry.status, entry.booking_id) == (WaitlistStatus.BOOKED, booked.booking_id)
    await service.waitlist.offer_once()
    assert (await service.waitlist.entry(first_entry.entry_id)).offer is None  # the slot is booked now
