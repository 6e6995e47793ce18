"""What must hold after a chaos run, checked from outside with SQL on both databases.

Nothing the services say about themselves is trusted: each invariant reads the credit schema
(accounts, reservations, the ledger) and the booking schema (sessions, the recorded answers of
requests, the outbox) directly, and holds them to DESIGN.md and to what the clients were told
(`ClientRecord`s). Each returns every offending row in words; the report shows the first few.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from tests.chaos.workload import BookingRecord, CancelState, ClientRecord
from tests.support.invariants import credit_invariant_violations

QUERY_TIMEOUT_S = 30.0

_RESERVATIONS_SQL = """
SELECT reservation_id, owner_id, amount, committed_amount, refunded_amount, status, release_reason, reference,
       extract(epoch FROM now() - created_at)::float8 AS age_s
  FROM credit.reservations
"""
_GRANTS_SQL = "SELECT owner_id, request_id, granted_delta FROM credit.ledger_entries WHERE kind = 'grant'"
_REFUNDS_SQL = """
SELECT reservation_id, count(*) AS entries, -sum(spent_delta) AS amount
  FROM credit.ledger_entries WHERE kind = 'refund' GROUP BY reservation_id
"""
_ACCOUNTS_SQL = "SELECT owner_id, granted FROM credit.accounts"
_SESSIONS_SQL = """
SELECT booking_id, request_id, client_id, therapist_id, starts_at, status, payment_status, cancelled_by,
       cancel_reason, refunded_credits, credit_cost, series_id, series_index
  FROM booking.sessions
"""
_REFUSALS_SQL = "SELECT request_key, refusal_reason FROM booking.request_answers WHERE refusal_reason IS NOT NULL"
# A booking's hold names its calendar ("therapist:<id>/booking:<id>"); the previous version's
# holds were "booking:<id>".
BOOKING_HOLD_PREFIXES = ("therapist:", "booking:")
_DEAD_EVENTS_SQL = "SELECT kind, booking_id, attempts, last_error FROM booking.outbox WHERE status = 'dead'"
_OVERLAPS_SQL = """
SELECT a.therapist_id, a.booking_id AS first, b.booking_id AS second, a.blocked AS first_blocked,
       b.blocked AS second_blocked
  FROM booking.sessions a
  JOIN booking.sessions b
    ON a.therapist_id = b.therapist_id AND a.booking_id < b.booking_id AND a.blocked && b.blocked
 WHERE a.status = 'confirmed' AND b.status = 'confirmed'
"""


@dataclass(frozen=True)
class InvariantResult:
    name: str
    description: str
    checked: str  # what was looked at, e.g. "412 bookings"
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass
class Snapshot:
    """Both databases, read once after the run has settled."""

    credit_violations: list[str]
    reservations: dict[uuid.UUID, asyncpg.Record]
    grants: list[asyncpg.Record]
    refunds: dict[uuid.UUID, asyncpg.Record]
    granted: dict[uuid.UUID, int]
    sessions: dict[uuid.UUID, asyncpg.Record]
    refusals: dict[uuid.UUID, str]  # request key -> the refusal recorded as the request's answer
    dead_events: list[asyncpg.Record]
    overlaps: list[asyncpg.Record]
    # Sessions of single bookings by request id, and the occurrences of series by request id.
    sessions_by_request: dict[str, list[asyncpg.Record]] = field(default_factory=dict)
    series_by_request: dict[str, list[asyncpg.Record]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_request: dict[str, list[asyncpg.Record]] = defaultdict(list)
        series: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for session in self.sessions.values():
            (by_request if session["series_id"] is None else series)[session["request_id"]].append(session)
        self.sessions_by_request = dict(by_request)
        self.series_by_request = dict(series)


async def read_snapshot(credit_db: asyncpg.Pool, booking_db: asyncpg.Pool) -> Snapshot:
    async with credit_db.acquire() as connection:
        credit_violations = await credit_invariant_violations(connection, None)
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            reservations = await connection.fetch(_RESERVATIONS_SQL, timeout=QUERY_TIMEOUT_S)
            grants = await connection.fetch(_GRANTS_SQL, timeout=QUERY_TIMEOUT_S)
            refunds = await connection.fetch(_REFUNDS_SQL, timeout=QUERY_TIMEOUT_S)
            accounts = await connection.fetch(_ACCOUNTS_SQL, timeout=QUERY_TIMEOUT_S)
    async with booking_db.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        sessions = await connection.fetch(_SESSIONS_SQL, timeout=QUERY_TIMEOUT_S)
        refusals = await connection.fetch(_REFUSALS_SQL, timeout=QUERY_TIMEOUT_S)
        dead_events = await connection.fetch(_DEAD_EVENTS_SQL, timeout=QUERY_TIMEOUT_S)
        overlaps = await connection.fetch(_OVERLAPS_SQL, timeout=QUERY_TIMEOUT_S)
    return Snapshot(
        credit_violations=credit_violations,
        reservations={r["reservation_id"]: r for r in reservations},
        grants=list(grants),
        refunds={r["reservation_id"]: r for r in refunds},
        granted={r["owner_id"]: r["granted"] for r in accounts},
        sessions={s["booking_id"]: s for s in sessions},
        refusals={r["request_key"]: r["refusal_reason"] for r in refusals},
        dead_events=list(dead_events),
        overlaps=list(overlaps),
    )


def check_all(snapshot: Snapshot, clients: Sequence[ClientRecord], hold_bound_s: float) -> list[InvariantResult]:
    bookings = [b for client in clients for b in client.bookings.values()]
    checks: list[Callable[[], InvariantResult]] = [
        lambda: credit_books_balance(snapshot),
        lambda: no_overlapping_sessions(snapshot),
        lambda: no_hold_outlives_bound(snapshot, hold_bound_s),
        lambda: acknowledged_bookings_paid(snapshot, bookings),
        lambda: acknowledged_cancellations_refunded_once(snapshot, bookings),
        lambda: one_booking_per_request_id(snapshot, clients),
        lambda: refused_bookings_made_nothing(snapshot, clients),
        lambda: acknowledged_reschedules_hold(snapshot, bookings),
        lambda: sessions_and_holds_agree(snapshot),
        lambda: grants_match_acknowledgements(snapshot, clients),
        lambda: series_whole(snapshot, clients),
    ]
    return [check() for check in checks]


def credit_books_balance(snapshot: Snapshot) -> InvariantResult:
    return InvariantResult(
        "credit_books_balance",
        "every account: available + held + spent == granted, nothing negative, the ledger sums to the balances, "
        "each reservation matches its own ledger entries",
        f"{len(snapshot.granted)} accounts, {len(snapshot.reservations)} reservations",
        snapshot.credit_violations,
    )


def no_overlapping_sessions(snapshot: Snapshot) -> InvariantResult:
    return InvariantResult(
        "no_overlapping_sessions",
        "no two confirmed sessions of one therapist overlap",
        f"{sum(s['status'] == 'confirmed' for s in snapshot.sessions.values())} confirmed sessions",
        [
            f"therapist {row['therapist_id']}: sessions {row['first']} {row['first_blocked']} and "
            f"{row['second']} {row['second_blocked']} overlap"
            for row in snapshot.overlaps
        ],
    )


def no_hold_outlives_bound(snapshot: Snapshot, bound_s: float) -> InvariantResult:
    pending = [r for r in snapshot.reservations.values() if r["status"] == "pending"]
    return InvariantResult(
        "no_hold_outlives_bound",
        f"no credit hold stays PENDING longer than {bound_s:g} s (stale holds are the reconciler's to resolve)",
        f"{len(pending)} pending of {len(snapshot.reservations)} reservations",
        [
            f"reservation {r['reservation_id']} ({r['reference']}) of account {r['owner_id']} has been PENDING "
            f"for {r['age_s']:.1f} s (bound {bound_s:g} s); session: {r['reservation_id'] in snapshot.sessions}, "
            f"refusal: {snapshot.refusals.get(r['reservation_id'], 'none')}"
            for r in sorted(pending, key=lambda r: -r["age_s"])
            if r["age_s"] > bound_s
        ],
    )


def _paid_violation(snapshot: Snapshot, booking_id: uuid.UUID, cost: int) -> str | None:
    """Why a confirmed session is not properly paid, or None."""
    session = snapshot.sessions[booking_id]
    reservation = snapshot.reservations.get(booking_id)
    if session["payment_status"] != "paid":
        return f"session {booking_id} is confirmed but its payment is {session['payment_status']}"
    if reservation is None:
        return f"session {booking_id} is paid but has no reservation"
    shape = (reservation["status"], reservation["committed_amount"], reservation["refunded_amount"])
    if shape != ("committed", cost, 0) or reservation["owner_id"] != session["client_id"]:
        return (
            f"session {booking_id} (client {session['client_id']}, cost {cost}) is paid but its reservation is "
            f"{reservation['status']} (committed {reservation['committed_amount']}, refunded "
            f"{reservation['refunded_amount']}) from account {reservation['owner_id']}"
        )
    return None


def acknowledged_bookings_paid(snapshot: Snapshot, bookings: Sequence[BookingRecord]) -> InvariantResult:
    found = []
    payment_failed = 0
    for booking in bookings:
        booking_id = uuid.UUID(booking.booking_id)
        session = snapshot.sessions.get(booking_id)
        if session is None:
            found.append(f"acknowledged booking {booking_id} (request {booking.request_id}) does not exist")
            continue
        if session["request_id"] != booking.request_id or str(session["client_id"]) != booking.client_id:
            found.append(
                f"acknowledged booking {booking_id} belongs to request {session['request_id']} of client "
                f"{session['client_id']}, not to {booking.request_id} of {booking.client_id}"
            )
        if session["status"] == "confirmed":
            problem = _paid_violation(snapshot, booking_id, session["credit_cost"])
            if problem is not None:
                found.append(problem)
        elif session["cancel_reason"] == "payment_failed" and session["cancelled_by"] == "system":
            payment_failed += 1  # the hold expired before its commit: reported, and checked below
        elif booking.cancel is CancelState.NONE:
            found.append(
                f"acknowledged booking {booking_id} was cancelled ({session['cancelled_by']}, "
                f"{session['cancel_reason']}) though no cancellation was ever sent for it"
            )
    checked = f"{len(bookings)} acknowledged bookings"
    if payment_failed:
        checked += f"; {payment_failed} cancelled by the system for PAYMENT_FAILED"
    return InvariantResult(
        "acknowledged_bookings_paid",
        "every acknowledged booking exists for its request, and is confirmed and PAID with its reservation "
        "COMMITTED for its cost, or was cancelled (by an acknowledged or unanswered cancellation, or by the "
        "system for PAYMENT_FAILED)",
        checked,
        found,
    )


def _refund_violations(snapshot: Snapshot, booking_id: uuid.UUID, expected_refund: int | None) -> list[str]:
    """A cancelled session's refund: made exactly once, for its refunded_credits."""
    session = snapshot.sessions[booking_id]
    refunded = session["refunded_credits"]
    entries = snapshot.refunds.get(booking_id)
    count, amount = (0, 0) if entries is None else (entries["entries"], entries["amount"])
    reservation = snapshot.reservations.get(booking_id)
    found = []
    if expected_refund is not None and refunded != expected_refund:
        found.append(
            f"booking {booking_id}: the cancellation acknowledged a refund of {expected_refund}, stored {refunded}"
        )
    if count > 1:
        found.append(f"booking {booking_id}: refunded {count} times (ledger total {amount}), not once")
    if refunded > 0:
        if (count, amount) != (1, refunded):
            found.append(f"booking {booking_id}: refund of {refunded} has {count} ledger entries totalling {amount}")
        if session["payment_status"] != "refunded":
            found.append(f"booking {booking_id}: refund of {refunded} but payment is {session['payment_status']}")
        if reservation is None or (reservation["status"], reservation["refunded_amount"]) != ("refunded", refunded):
            state = None if reservation is None else (reservation["status"], reservation["refunded_amount"])
            found.append(f"booking {booking_id}: refund of {refunded} but its reservation is {state}")
    elif count:
        found.append(f"booking {booking_id}: no refund due but {count} refund entries ({amount})")
    return found


def acknowledged_cancellations_refunded_once(snapshot: Snapshot, bookings: Sequence[BookingRecord]) -> InvariantResult:
    found = []
    cancelled = [b for b in bookings if b.cancel is CancelState.ACKNOWLEDGED]
    for booking in cancelled:
        booking_id = uuid.UUID(booking.booking_id)
        session = snapshot.sessions.get(booking_id)
        if session is None:
            found.append(f"cancelled booking {booking_id} does not exist")
            continue
        if session["status"] != "cancelled":
            found.append(f"booking {booking_id}: its cancellation was acknowledged but it is {session['status']}")
            continue
        if booking.refunded_credits != booking.credit_cost:
            found.append(
                f"booking {booking_id}: cancelled days ahead by its client, refunded {booking.refunded_credits} "
                f"of {booking.credit_cost} (the policy refunds in full)"
            )
        found.extend(_refund_violations(snapshot, booking_id, booking.refunded_credits))
    return InvariantResult(
        "acknowledged_cancellations_refunded_once",
        "every acknowledged cancellation holds, and its refund was made exactly once for the amount it "
        "acknowledged (one refund ledger entry, payment REFUNDED)",
        f"{len(cancelled)} acknowledged cancellations",
        found,
    )


def one_booking_per_request_id(snapshot: Snapshot, clients: Sequence[ClientRecord]) -> InvariantResult:
    found = [
        f"request {request_id} made {len(sessions)} sessions: {[str(s['booking_id']) for s in sessions]}"
        for request_id, sessions in snapshot.sessions_by_request.items()
        if len(sessions) > 1
    ]
    for booking_id, session in snapshot.sessions.items():
        refusal = snapshot.refusals.get(booking_id)
        if refusal is not None:
            found.append(
                f"request {session['request_id']} made session {booking_id} and was also answered {refusal}: "
                "a request has one answer"
            )
    requests = sum(len(c.bookings) + len(c.booking_requests_unknown) + len(c.booking_requests_refused) for c in clients)
    return InvariantResult(
        "one_booking_per_request_id",
        "every request id made at most one session, and a request that made one was never also answered "
        "with a refusal (a request has one answer)",
        f"{requests} booking requests, {len(snapshot.sessions)} sessions",
        found,
    )


def series_whole(snapshot: Snapshot, clients: Sequence[ClientRecord]) -> InvariantResult:
    """No all-or-nothing series was ever placed in part: its occurrences are placed in one
    transaction, so a series has no session rows or all of them; a refused series made none; an
    acknowledged one has exactly the sessions its client was told of, one per index."""
    found = []
    series = [s for client in clients for s in client.series.values()]
    for record in series:
        sessions = snapshot.series_by_request.get(record.request_id, [])
        indexes = sorted(s["series_index"] for s in sessions)
        if len({s["series_id"] for s in sessions}) > 1:
            found.append(f"series request {record.request_id} made sessions of several series")
        if len(indexes) != len(set(indexes)):
            found.append(f"series request {record.request_id} has an occurrence twice: {indexes}")
        if not record.skip_unavailable and sessions and len(sessions) != record.occurrences:
            found.append(
                f"all-or-nothing series {record.request_id} has {len(sessions)} of {record.occurrences} occurrences"
            )
        if record.told is not None and record.told.startswith("refused") and sessions:
            found.append(f"series {record.request_id} was {record.told} but has {len(sessions)} sessions")
        if record.told is not None and record.told.startswith("booked "):
            told = record.told.removeprefix("booked ").split(",")
            placed = sorted(str(s["booking_id"]) for s in sessions)
            if sorted(told) != placed:
                found.append(f"series {record.request_id} was told {told} but has sessions {placed}")
    return InvariantResult(
        "series_whole",
        "no all-or-nothing series is ever placed in part (its sessions are none or all of its occurrences), a "
        "refused series made no session, an acknowledged one has exactly the occurrences its client was told of",
        f"{len(series)} series requests, {sum(len(s) for s in snapshot.series_by_request.values())} occurrences",
        found,
    )


def refused_bookings_made_nothing(snapshot: Snapshot, clients: Sequence[ClientRecord]) -> InvariantResult:
    found = []
    refused = 0
    for client in clients:
        for request_id, reason in client.booking_requests_refused.items():
            refused += 1
            for session in snapshot.sessions_by_request.get(request_id, []):
                found.append(
                    f"request {request_id} was refused ({reason}) but made session {session['booking_id']} "
                    f"({session['status']}, {session['payment_status']})"
                )
    return InvariantResult(
        "refused_bookings_made_nothing",
        "a booking request answered with a refusal made no session",
        f"{refused} refused booking requests",
        found,
    )


def acknowledged_reschedules_hold(snapshot: Snapshot, bookings: Sequence[BookingRecord]) -> InvariantResult:
    found = []
    known = [b for b in bookings if b.start is not None]
    for booking in known:
        session = snapshot.sessions.get(uuid.UUID(booking.booking_id))
        if session is not None and session["starts_at"] != booking.start:
            found.append(
                f"booking {booking.booking_id} starts at {session['starts_at'].isoformat()}, but the client was "
                f"last told {_iso(booking.start)}"
            )
    return InvariantResult(
        "acknowledged_reschedules_hold",
        "every booking starts where its last acknowledged booking or reschedule put it",
        f"{len(known)} bookings with a known start",
        found,
    )


def sessions_and_holds_agree(snapshot: Snapshot) -> InvariantResult:
    """DESIGN.md's recovery promise, over every session and every booking hold, acknowledged or not."""
    found = []
    for booking_id, session in snapshot.sessions.items():
        if session["status"] == "confirmed":
            problem = _paid_violation(snapshot, booking_id, session["credit_cost"])
            if problem is not None:
                found.append(problem)
        elif session["cancel_reason"] == "payment_failed":
            reservation = snapshot.reservations.get(booking_id)
            if session["payment_status"] != "refunded" or reservation is None or reservation["status"] != "released":
                found.append(f"session {booking_id} was cancelled unpaid but its hold is not released")
        else:
            found.extend(_refund_violations(snapshot, booking_id, None))
    for reservation_id, reservation in snapshot.reservations.items():
        refusal = snapshot.refusals.get(reservation_id)
        booking_hold = reservation["reference"].startswith(BOOKING_HOLD_PREFIXES)
        if refusal is not None and reservation["status"] != "released":
            found.append(
                f"reservation {reservation_id}: its request was refused ({refusal}) but it is {reservation['status']}"
            )
        if (
            booking_hold
            and reservation_id not in snapshot.sessions
            and reservation["status"] in ("committed", "refunded")
        ):
            found.append(f"reservation {reservation_id} was paid ({reservation['status']}) but has no session")
    found.extend(
        f"outbox event {e['kind']} of booking {e['booking_id']} dead after {e['attempts']} attempts: {e['last_error']}"
        for e in snapshot.dead_events
    )
    return InvariantResult(
        "sessions_and_holds_agree",
        "every session is paid exactly (confirmed: COMMITTED for its cost; cancelled: refunded once, or "
        "released if never paid); no payment without its session; the hold of every refused request is "
        "RELEASED; no outbox event dead-lettered",
        f"{len(snapshot.sessions)} sessions, {len(snapshot.refusals)} recorded refusals",
        found,
    )


def answers_stand(clients: Sequence[ClientRecord], asked_again: dict[str, str]) -> InvariantResult:
    """A request has one answer: every booking request a client got an answer to (a booking or a
    refusal), sent again once the run settled, got that very answer again."""
    found = []
    for client in clients:
        for request_id in client.answered_requests:
            told, again = client.answer_to(request_id), asked_again.get(request_id, "not asked")
            if again != told:
                found.append(f"request {request_id} of client {client.client_id} was answered {told!r}, then {again!r}")
    return InvariantResult(
        "answers_stand",
        "every answered booking request, sent again after the run, gets the answer its client got (the booking, "
        "or the same refusal)",
        f"{len(asked_again)} answered booking requests asked again",
        found,
    )


def grants_match_acknowledgements(snapshot: Snapshot, clients: Sequence[ClientRecord]) -> InvariantResult:
    found = []
    by_owner: dict[uuid.UUID, dict[str, int]] = defaultdict(dict)
    for grant in snapshot.grants:
        by_owner[grant["owner_id"]][grant["request_id"]] = grant["granted_delta"]
    unknown_total = unknown_applied = 0
    for client in clients:
        owner = uuid.UUID(client.client_id)
        ledger = by_owner.get(owner, {})
        for request_id, amount in client.grants_acknowledged.items():
            if ledger.get(request_id) != amount:
                found.append(
                    f"client {owner}: grant {request_id} of {amount} was acknowledged but the ledger has "
                    f"{ledger.get(request_id)}"
                )
        for request_id, amount in client.grants_unknown.items():
            unknown_total += 1
            if request_id in ledger:
                unknown_applied += 1
                if ledger[request_id] != amount:
                    found.append(
                        f"client {owner}: grant {request_id} asked {amount}, the ledger has {ledger[request_id]}"
                    )
        asked = client.grants_acknowledged.keys() | client.grants_unknown.keys()
        found.extend(
            f"client {owner}: the ledger has grant {request_id} that the client never asked for"
            for request_id in ledger.keys() - asked
        )
        expected = sum(client.grants_acknowledged.values()) + sum(
            amount for request_id, amount in client.grants_unknown.items() if request_id in ledger
        )
        granted = snapshot.granted.get(owner, 0)
        if granted != expected:
            found.append(
                f"client {owner}: granted {granted}, but its acknowledged grants and the unanswered ones that "
                f"took effect add up to {expected}"
            )
    acknowledged = sum(len(c.grants_acknowledged) for c in clients)
    return InvariantResult(
        "grants_match_acknowledgements",
        "each client's granted credits == its acknowledged grants + those unanswered grants the ledger shows "
        "(grants are idempotent by request id); no grant it never asked for",
        f"{len(clients)} clients, {acknowledged} acknowledged grants, {unknown_applied} of {unknown_total} "
        "unanswered grants took effect",
        found,
    )


def unknown_outcomes(snapshot: Snapshot, clients: Iterable[ClientRecord]) -> str:
    """What became of the booking requests that the clients never got an answer to."""
    outcomes: Counter[str] = Counter()
    for client in clients:
        for request_id in client.booking_requests_unknown:
            sessions = snapshot.sessions_by_request.get(request_id, [])
            outcomes["made a booking" if sessions else "made none"] += 1
    return ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())) or "none"


def _iso(instant: datetime | None) -> str:
    return "unknown" if instant is None else instant.isoformat()
