"""Unit tests for credit_service.domain: the reservation state machine and its ledger movements.

Pure and synchronous: no database, no gRPC. The integration tests prove the same rules end to end;
these pin down every transition, including the ones that are hard to reach over the wire.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from credit_service.domain import (
    AccountNotFound,
    AmountExceedsReservation,
    Balance,
    EntryKind,
    InsufficientCredits,
    Movement,
    NoAccountToReserveFrom,
    ReleaseReason,
    RequestIdReused,
    Reservation,
    ReservationAlreadyCommitted,
    ReservationAlreadyRefunded,
    ReservationExpired,
    ReservationIdReused,
    ReservationNotCommitted,
    ReservationNotFound,
    ReservationNotPending,
    ReservationStateError,
    ReservationStatus,
    Transition,
)

CREATED_AT = datetime(2026, 3, 29, 9, 0, tzinfo=UTC)


def pending(amount: int = 10, reference: str = "booking:1") -> Reservation:
    return Reservation(
        reservation_id=uuid.uuid4(),
        owner_id=uuid.uuid4(),
        amount=amount,
        committed_amount=0,
        refunded_amount=0,
        status=ReservationStatus.PENDING,
        release_reason=None,
        reference=reference,
        created_at=CREATED_AT,
        updated_at=CREATED_AT,
        expires_at=CREATED_AT + timedelta(hours=1),
    )


def committed(amount: int = 10, spent: int = 10) -> Reservation:
    return pending(amount).plan_commit(spent).after


def refunded(amount: int = 10, spent: int = 10, given_back: int = 10) -> Reservation:
    return committed(amount, spent).plan_refund(given_back).after


def cancelled(amount: int = 10) -> Reservation:
    return pending(amount).plan_cancel().after


def expired(amount: int = 10) -> Reservation:
    return pending(amount).plan_expiry().after


def kinds(transition: Transition) -> list[tuple[EntryKind, int]]:
    return [(movement.kind, movement.amount) for movement in transition.movements]


# --- Movements and balances ---


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (EntryKind.GRANT, (7, 0, 0, 7)),
        (EntryKind.RESERVE, (-7, 7, 0, 0)),
        (EntryKind.COMMIT, (0, -7, 7, 0)),
        (EntryKind.RELEASE, (7, -7, 0, 0)),
        (EntryKind.REFUND, (7, 0, -7, 0)),
    ],
)
def test_each_movement_moves_credits_between_its_two_buckets(
    kind: EntryKind, expected: tuple[int, int, int, int]
) -> None:
    deltas = Movement(kind, 7).deltas()
    assert deltas == expected
    available, held, spent, granted = deltas
    assert available + held + spent == granted  # conserves credits, like the ledger's CHECK


def test_every_entry_kind_has_a_movement() -> None:
    for kind in EntryKind:
        assert sum(abs(delta) for delta in Movement(kind, 1).deltas()) == 2


@pytest.mark.parametrize("amount", [0, -1])
def test_a_movement_of_no_credits_is_a_bug(amount: int) -> None:
    with pytest.raises(AssertionError):
        Movement(EntryKind.RESERVE, amount).deltas()


def test_balance_accepts_a_consistent_balance() -> None:
    balance = Balance(uuid.uuid4(), available=3, held=2, spent=5, granted=10, updated_at=CREATED_AT)
    assert balance.available + balance.held + balance.spent == balance.granted


@pytest.mark.parametrize(
    ("available", "held", "spent", "granted"),
    [(-1, 1, 0, 0), (1, 1, 1, 4), (0, 0, -2, -2), (5, 0, 0, 4)],
)
def test_balance_refuses_a_negative_bucket_or_a_broken_identity(
    available: int, held: int, spent: int, granted: int
) -> None:
    with pytest.raises(AssertionError):
        Balance(uuid.uuid4(), available, held, spent, granted, updated_at=CREATED_AT)


# --- Reserve idempotency ---


def test_same_request_compares_owner_amount_and_reference() -> None:
    reservation = pending(amount=10, reference="booking:1")
    assert reservation.same_request(reservation.owner_id, 10, "booking:1")
    assert not reservation.same_request(uuid.uuid4(), 10, "booking:1")
    assert not reservation.same_request(reservation.owner_id, 11, "booking:1")
    assert not reservation.same_request(reservation.owner_id, 10, "booking:2")


# --- Commit ---


def test_commit_of_the_whole_hold_spends_it() -> None:
    reservation = pending(10)
    transition = reservation.plan_commit(None)
    assert transition.after.status is ReservationStatus.COMMITTED
    assert transition.after.committed_amount == 10
    assert kinds(transition) == [(EntryKind.COMMIT, 10)]
    assert transition.changes_anything
    assert reservation.status is ReservationStatus.PENDING  # plans, never mutates


def test_commit_of_the_exact_held_amount_writes_no_release() -> None:
    transition = pending(10).plan_commit(10)
    assert kinds(transition) == [(EntryKind.COMMIT, 10)]


def test_partial_commit_releases_the_rest() -> None:
    transition = pending(10).plan_commit(4)
    assert transition.after.status is ReservationStatus.COMMITTED
    assert transition.after.committed_amount == 4
    assert transition.after.release_reason is None
    assert kinds(transition) == [(EntryKind.COMMIT, 4), (EntryKind.RELEASE, 6)]


@pytest.mark.parametrize("amount", [0, -3, 11])
def test_commit_outside_one_to_the_hold_is_refused(amount: int) -> None:
    reservation = pending(10)
    with pytest.raises(AmountExceedsReservation) as refused:
        reservation.plan_commit(amount)
    assert refused.value.reason == "AMOUNT_EXCEEDS_RESERVATION"
    assert refused.value.metadata == {"reservation_id": str(reservation.reservation_id), "status": "pending"}
    assert str(amount) in refused.value.message


@pytest.mark.parametrize("amount", [None, 4])
def test_repeating_a_commit_plans_nothing(amount: int | None) -> None:
    reservation = committed(10, 4)
    transition = reservation.plan_commit(amount)
    assert transition.after == reservation
    assert not transition.changes_anything


def test_commit_again_with_another_amount_is_refused() -> None:
    with pytest.raises(ReservationAlreadyCommitted) as refused:
        committed(10, 4).plan_commit(5)
    assert refused.value.reason == "RESERVATION_ALREADY_COMMITTED"
    assert refused.value.metadata["status"] == "committed"


def test_commit_of_a_refunded_reservation_with_its_amount_returns_it() -> None:
    reservation = refunded(10, 8, 3)
    transition = reservation.plan_commit(8)
    assert transition.after is reservation
    assert not transition.changes_anything
    with pytest.raises(ReservationAlreadyCommitted):
        reservation.plan_commit(3)


def test_commit_after_cancel_is_not_pending() -> None:
    with pytest.raises(ReservationNotPending) as refused:
        cancelled().plan_commit(None)
    assert refused.value.reason == "RESERVATION_NOT_PENDING"
    assert refused.value.metadata["status"] == "released"


def test_commit_after_expiry_says_expired() -> None:
    reservation = expired()
    with pytest.raises(ReservationExpired) as refused:
        reservation.plan_commit(None)
    assert refused.value.reason == "RESERVATION_EXPIRED"
    assert reservation.expires_at.isoformat() in refused.value.message


# --- Cancel and expiry ---


def test_cancel_releases_the_whole_hold() -> None:
    transition = pending(10).plan_cancel()
    assert transition.after.status is ReservationStatus.RELEASED
    assert transition.after.release_reason is ReleaseReason.CANCELLED
    assert transition.after.committed_amount == 0
    assert kinds(transition) == [(EntryKind.RELEASE, 10)]


@pytest.mark.parametrize("make", [cancelled, expired])
def test_cancel_of_a_released_reservation_plans_nothing(make: Callable[[], Reservation]) -> None:
    reservation = make()
    transition = reservation.plan_cancel()
    assert transition.after is reservation
    assert not transition.changes_anything


@pytest.mark.parametrize("make", [committed, refunded])
def test_cancel_after_commit_is_refused(make: Callable[[], Reservation]) -> None:
    with pytest.raises(ReservationAlreadyCommitted) as refused:
        make().plan_cancel()
    assert refused.value.reason == "RESERVATION_ALREADY_COMMITTED"


def test_expiry_releases_the_whole_hold_as_expired() -> None:
    transition = pending(10).plan_expiry()
    assert transition.after.status is ReservationStatus.RELEASED
    assert transition.after.release_reason is ReleaseReason.EXPIRED
    assert kinds(transition) == [(EntryKind.RELEASE, 10)]


@pytest.mark.parametrize("make", [committed, refunded, cancelled, expired])
def test_expiry_of_a_finished_reservation_is_a_bug(make: Callable[[], Reservation]) -> None:
    # The sweeper selects pending rows under a lock; anything else reaching here is a bug.
    with pytest.raises(AssertionError):
        make().plan_expiry()


# --- Refund ---


def test_refund_of_everything_gives_the_spent_credits_back() -> None:
    transition = committed(10, 8).plan_refund(None)
    assert transition.after.status is ReservationStatus.REFUNDED
    assert transition.after.refunded_amount == 8
    assert transition.after.committed_amount == 8
    assert kinds(transition) == [(EntryKind.REFUND, 8)]


def test_partial_refund_gives_back_only_that_much() -> None:
    transition = committed(10, 8).plan_refund(3)
    assert transition.after.refunded_amount == 3
    assert kinds(transition) == [(EntryKind.REFUND, 3)]


@pytest.mark.parametrize("amount", [0, -1, 9])
def test_refund_outside_one_to_the_committed_amount_is_refused(amount: int) -> None:
    with pytest.raises(AmountExceedsReservation) as refused:
        committed(10, 8).plan_refund(amount)
    assert "committed 8" in refused.value.message


@pytest.mark.parametrize("amount", [None, 3])
def test_repeating_a_refund_plans_nothing(amount: int | None) -> None:
    reservation = refunded(10, 8, 3)
    transition = reservation.plan_refund(amount)
    assert transition.after is reservation
    assert not transition.changes_anything


def test_a_second_refund_with_another_amount_is_refused() -> None:
    with pytest.raises(ReservationAlreadyRefunded) as refused:
        refunded(10, 8, 3).plan_refund(2)
    assert refused.value.reason == "RESERVATION_ALREADY_REFUNDED"
    assert "3 credits" in refused.value.message


@pytest.mark.parametrize("make", [pending, cancelled, expired])
def test_refund_of_a_reservation_never_committed_is_refused(make: Callable[[], Reservation]) -> None:
    with pytest.raises(ReservationNotCommitted) as refused:
        make().plan_refund(None)
    assert refused.value.reason == "RESERVATION_NOT_COMMITTED"


# --- Errors carry stable reasons and metadata ---


def test_domain_errors_have_stable_reasons_and_useful_metadata() -> None:
    owner = uuid.uuid4()
    reservation = pending()
    assert AccountNotFound(owner).reason == "ACCOUNT_NOT_FOUND"
    assert AccountNotFound(owner).metadata == {"owner_id": str(owner)}
    assert NoAccountToReserveFrom(owner).reason == "ACCOUNT_NOT_FOUND"
    insufficient = InsufficientCredits(owner, requested=5, available=2)
    assert insufficient.reason == "INSUFFICIENT_CREDITS"
    assert insufficient.metadata == {"owner_id": str(owner), "requested": "5", "available": "2"}
    assert RequestIdReused("grant-1").metadata == {"request_id": "grant-1"}
    assert RequestIdReused("grant-1").reason == "REQUEST_ID_REUSED"
    assert ReservationIdReused(reservation).reason == "RESERVATION_ID_REUSED"
    assert ReservationIdReused(reservation).metadata == {"reservation_id": str(reservation.reservation_id)}
    assert ReservationNotFound(reservation.reservation_id).reason == "RESERVATION_NOT_FOUND"
    for error_type in (
        ReservationNotPending,
        ReservationExpired,
        ReservationAlreadyCommitted,
        ReservationNotCommitted,
        ReservationAlreadyRefunded,
        AmountExceedsReservation,
    ):
        assert issubclass(error_type, ReservationStateError)
        assert error_type.reason.isupper()
        assert len(error_type.reason) <= 63


# --- Any sequence of operations keeps the books straight ---

Operation = tuple[str, int | None]
operations = st.lists(
    st.tuples(
        st.sampled_from(["commit", "cancel", "expire", "refund"]),
        st.one_of(st.none(), st.integers(min_value=-2, max_value=25)),
    ),
    max_size=8,
)


def apply(reservation: Reservation, operation: Operation) -> Transition | None:
    """The planned transition, or None when the state machine refuses it."""
    name, amount = operation
    try:
        if name == "commit":
            return reservation.plan_commit(amount)
        if name == "cancel":
            return reservation.plan_cancel()
        if name == "refund":
            return reservation.plan_refund(amount)
        if reservation.status is not ReservationStatus.PENDING:
            return None  # the sweeper only ever expires pending holds
        return reservation.plan_expiry()
    except ReservationStateError:
        return None


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(min_value=1, max_value=20), steps=operations)
def test_any_sequence_of_transitions_conserves_credits(amount: int, steps: list[Operation]) -> None:
    """Replays movements on the buckets of one reservation (starting right after its reserve
    entry) and checks, after every step, what the database invariants check per account."""
    reservation = pending(amount)
    available, held, spent = 0, amount, 0  # relative to before the reserve: available went -amount
    for step in steps:
        transition = apply(reservation, step)
        if transition is None:
            continue
        for movement in transition.movements:
            delta_available, delta_held, delta_spent, delta_granted = movement.deltas()
            available, held, spent = available + delta_available, held + delta_held, spent + delta_spent
            assert delta_granted == 0
        reservation = transition.after
        assert held >= 0
        assert spent >= 0
        assert available + held + spent == amount
        assert held == (amount if reservation.status is ReservationStatus.PENDING else 0)
        assert spent == reservation.committed_amount - reservation.refunded_amount
        assert 0 <= reservation.refunded_amount <= reservation.committed_amount <= reservation.amount
        assert (reservation.release_reason is not None) == (reservation.status is ReservationStatus.RELEASED)
        # Idempotency: repeating what just happened changes nothing more.
        repeat = apply(reservation, step)
        assert repeat is None or not repeat.changes_anything
