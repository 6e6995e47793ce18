"""Several booking processes on one database (DESIGN.md, "Scale"): correctness must not depend
on which replica serves a call, because every lock and every decision lives in PostgreSQL.

Real processes, real sockets, real PostgreSQL; the load is bounded and truly concurrent
(asyncio.gather over separate calls, spread over both replicas). Afterwards the books are
checked from outside, through SQL on both databases.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from booking.v1 import booking_pb2
from booking_service.requests import request_key
from credit.v1 import credit_pb2
from service_kit.errors import error_details
from tests.support.auth import OPERATOR_ID
from tests.support.processes import FAST_RECOVERY, Stack, log_events, running_stack, wait_exit, wait_for
from tests.support.world import World, future_hour, grant

pytestmark = pytest.mark.timeout(120)

COST = 10
CALL_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 15.0
SESSION_MINUTES = 50

# Load: every client makes one request; a small set of overlapping slots per therapist.
CLIENTS = 40
CLIENT_CREDITS = 20
THERAPISTS = 2
# 50-minute sessions starting 0, 30 and 60 minutes past the hour: 0 and 60 fit together, 30
# collides with both, so a therapist ends with {0, 60} or {30}.
SLOT_OFFSETS_MIN = (0, 30, 60)
# Holds with no decision, as coordinators that died after Reserve leave them.
ORPHAN_HOLDS = 10
# The refusals that contention may legitimately produce.
CLEAN_REFUSALS = {
    (grpc.StatusCode.FAILED_PRECONDITION, "SLOT_UNAVAILABLE"),
    (grpc.StatusCode.ABORTED, "BOOKING_ABORTED"),
    (grpc.StatusCode.ABORTED, "CALENDAR_BUSY"),
}

# The graceful-shutdown load: workers booking distinct slots one after another.
SHUTDOWN_WORKERS = 8
SHUTDOWN_REQUESTS_PER_WORKER = 12
SHUTDOWN_AFTER_OKS = 12
SHUTDOWN_CREDITS = SHUTDOWN_REQUESTS_PER_WORKER * COST


@dataclass(frozen=True)
class Outcome:
    request: booking_pb2.CreateBookingRequest
    replica: int
    code: grpc.StatusCode
    reason: str | None
    booking_id: str | None


async def book(stack: Stack, replica: int, request: booking_pb2.CreateBookingRequest) -> Outcome:
    try:
        response = await stack.booking_stub(replica).CreateBooking(request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        return Outcome(request, replica, details.code, details.reason, None)
    return Outcome(request, replica, grpc.StatusCode.OK, None, response.booking.booking_id)


async def funded_clients(stack: Stack, count: int, credits: int) -> list[str]:
    clients = [str(uuid.uuid4()) for _ in range(count)]
    await asyncio.gather(*(grant(stack.credit_stub(), client, credits) for client in clients))
    return clients


async def orphan_holds(stack: Stack, count: int) -> dict[str, str]:
    """Reservation id -> owner: funded accounts each with one PENDING hold that names a booking
    (and its therapist's calendar) but has no session, which is what a coordinator dying after
    Reserve leaves behind."""
    owners = await funded_clients(stack, count, COST)
    holds = {str(uuid.uuid4()): owner for owner in owners}
    therapist_id = uuid.uuid4()
    await asyncio.gather(
        *(
            stack.credit_stub().ReserveCredits(
                credit_pb2.ReserveCreditsRequest(
                    reservation_id=reservation_id,
                    owner_id=owner,
                    amount=COST,
                    reference=f"therapist:{therapist_id}/booking:{reservation_id}",
                ),
                timeout=CALL_TIMEOUT_S,
            )
            for reservation_id, owner in holds.items()
        )
    )
    return holds


async def confirmed_sessions(stack: Stack, therapist_ids: list[str]) -> dict[str, tuple[str, str, datetime]]:
    """booking_id -> (client_id, therapist_id, starts_at) of every confirmed session."""
    rows = await stack.booking_db.fetch(
        """SELECT booking_id, client_id, therapist_id, starts_at FROM booking.sessions
            WHERE status = 'confirmed' AND therapist_id = ANY($1::uuid[])""",
        [uuid.UUID(t) for t in therapist_ids],
    )
    return {str(r["booking_id"]): (str(r["client_id"]), str(r["therapist_id"]), r["starts_at"]) for r in rows}


async def overlapping_sessions(stack: Stack, therapist_ids: list[str]) -> list[tuple[str, str]]:
    rows = await stack.booking_db.fetch(
        """SELECT a.booking_id AS first, b.booking_id AS second
             FROM booking.sessions a
             JOIN booking.sessions b
               ON a.therapist_id = b.therapist_id AND a.booking_id < b.booking_id AND a.blocked && b.blocked
            WHERE a.status = 'confirmed' AND b.status = 'confirmed' AND a.therapist_id = ANY($1::uuid[])""",
        [uuid.UUID(t) for t in therapist_ids],
    )
    return [(str(r["first"]), str(r["second"])) for r in rows]


async def ledger_kinds(stack: Stack, reservation_ids: list[str]) -> dict[str, Counter[str]]:
    rows = await stack.credit_db.fetch(
        "SELECT reservation_id, kind FROM credit.ledger_entries WHERE reservation_id = ANY($1::uuid[])",
        [uuid.UUID(r) for r in reservation_ids],
    )
    kinds: dict[str, Counter[str]] = {r: Counter() for r in reservation_ids}
    for row in rows:
        kinds[str(row["reservation_id"])][row["kind"]] += 1
    return kinds


async def sessions_and_holds_agree(stack: Stack, owners: list[str]) -> list[str]:
    """Across the two databases: a spent hold has a session of its cost (the session is the commit
    decision); a released hold has none; none is left pending. Returns the disagreements in words."""
    holds = await stack.credit_db.fetch(
        """SELECT reservation_id, status, committed_amount FROM credit.reservations
            WHERE owner_id = ANY($1::uuid[]) AND (reference LIKE 'therapist:%' OR reference LIKE 'booking:%')""",
        [uuid.UUID(o) for o in owners],
    )
    sessions = {
        row["booking_id"]: row
        for row in await stack.booking_db.fetch(
            "SELECT booking_id, status, credit_cost FROM booking.sessions WHERE booking_id = ANY($1::uuid[])",
            [h["reservation_id"] for h in holds],
        )
    }
    wrong = []
    for hold in holds:
        rid, status = hold["reservation_id"], hold["status"]
        session = sessions.get(rid)
        if status == "committed" and session is None:
            wrong.append(f"{rid}: committed without a session")
        if status == "committed" and session is not None and hold["committed_amount"] != session["credit_cost"]:
            wrong.append(f"{rid}: committed {hold['committed_amount']} for a session costing {session['credit_cost']}")
        if status == "released" and session is not None:
            wrong.append(f"{rid}: released with session {session}")
        if status == "pending":
            wrong.append(f"{rid}: still pending")
    return wrong


def _offset_min(base: datetime, start: datetime) -> int:
    return int((start - base).total_seconds() // 60)


# --- 5. two replicas under concurrent load ---


def assert_refusals_were_true(
    outcomes: list[Outcome], confirmed: dict[str, tuple[str, str, datetime]], base: datetime
) -> int:
    """Each therapist ended with a maximal set of its contested slots ({0, 60} or {30}), and
    every SLOT_UNAVAILABLE overlaps a confirmed session of that therapist. Returns how many
    refusals were for a session booked through the other replica."""
    booked = {o.booking_id: o for o in outcomes if o.booking_id is not None}
    # therapist -> [(minutes past the base hour, replica that booked it)]
    taken: dict[str, list[tuple[int, int]]] = {o.request.therapist_id: [] for o in outcomes}
    for booking_id, (client, therapist, start) in confirmed.items():
        request = booked[booking_id].request
        assert (client, therapist) == (request.client_id, request.therapist_id)
        taken[therapist].append((_offset_min(base, start), booked[booking_id].replica))
    aborted = {o.request.therapist_id for o in outcomes if o.reason in ("BOOKING_ABORTED", "CALENDAR_BUSY")}
    for therapist, held_slots in taken.items():
        offsets = sorted(offset for offset, _ in held_slots)
        # Maximal unless some request for this therapist was aborted (lock timeout, or the
        # reconciler judging a very slow call stale): then a slot may stay free.
        assert offsets in ([0, 60], [30]) or (therapist in aborted and offsets in ([], [0], [60])), (
            therapist,
            held_slots,
        )
    cross_replica = 0
    for outcome in outcomes:
        if outcome.reason != "SLOT_UNAVAILABLE":
            continue
        wanted = _offset_min(base, outcome.request.start_time.ToDatetime(tzinfo=UTC))
        holders = [r for offset, r in taken[outcome.request.therapist_id] if abs(wanted - offset) < SESSION_MINUTES]
        assert holders, f"{outcome} refused a slot nobody holds"
        cross_replica += any(r != outcome.replica for r in holders)
    return cross_replica


async def assert_charged_once(
    stack: Stack, confirmed: dict[str, tuple[str, str, datetime]], clients: list[str]
) -> None:
    """Every confirmed session paid and its hold committed for exactly its cost; a winner spent
    one session's cost, everyone else nothing; nothing held."""
    await wait_for(lambda: _all_paid(stack, list(confirmed)), timeout_s=RECOVERY_TIMEOUT_S, what="all paid")
    for booking_id in confirmed:
        hold = await stack.reservation(booking_id)
        assert hold is not None and (hold["status"], hold["committed_amount"]) == ("committed", COST), hold
    winners = Counter(client for client, _, _ in confirmed.values())
    assert max(winners.values(), default=0) <= 1
    total_spent = 0
    for client in clients:
        _, held, spent, granted = await stack.buckets(client)
        assert (held, spent, granted) == (0, COST * winners[client], CLIENT_CREDITS), client
        total_spent += spent
    assert total_spent == len(confirmed) * COST


async def assert_orphans_released_once(stack: Stack, orphans: dict[str, str]) -> None:
    """Released (cancelled) exactly once, answered BOOKING_ABORTED, by whichever replica got there."""
    kinds = await ledger_kinds(stack, list(orphans))
    for reservation_id, owner in orphans.items():
        hold = await stack.reservation(reservation_id)
        assert hold is not None and (hold["status"], hold["release_reason"]) == ("released", "cancelled"), hold
        assert await stack.refusal(uuid.UUID(reservation_id)) == "BOOKING_ABORTED"
        assert kinds[reservation_id] == Counter({"reserve": 1, "release": 1}), kinds[reservation_id]
        assert await stack.buckets(owner) == (COST, 0, 0, COST)
    released_by = {e.get("reservation_id") for p in stack.bookings for e in stack.events(p, "reconciler_released")}
    assert set(orphans) <= released_by, stack.logs()


async def test_two_replicas_under_concurrent_load_never_double_book_and_charge_exactly_once(
    postgres_server_url: str, tmp_path: Path
) -> None:
    # Holds older than 2 s are stale: the orphans below soon are, a live booking call hardly ever.
    recovery = {**FAST_RECOVERY, "BOOKING_RECONCILE_AFTER_S": "2"}
    async with running_stack(postgres_server_url, tmp_path, booking_replicas=2, booking_env=recovery) as stack:
        therapists = [
            await World.create(stack.booking_stub(i % 2), stack.credit_stub(), credits=0, credit_cost=COST)
            for i in range(THERAPISTS)
        ]
        therapist_ids = [t.therapist_id for t in therapists]
        clients = await funded_clients(stack, CLIENTS, CLIENT_CREDITS)
        # Both replicas' reconcilers find these stale during the load and race to release them.
        orphans = await orphan_holds(stack, ORPHAN_HOLDS)
        base = future_hour(6, 10)

        # Client i: replica i % 2, therapist (i // 2) % 2, slot (i // 4) % 3, so that every
        # (therapist, slot) is contested through both replicas at once.
        requests = [
            (
                i % 2,
                therapists[(i // 2) % THERAPISTS].booking_request(
                    base + timedelta(minutes=SLOT_OFFSETS_MIN[(i // 4) % len(SLOT_OFFSETS_MIN)]), client_id=client
                ),
            )
            for i, client in enumerate(clients)
        ]
        outcomes = await asyncio.gather(*(book(stack, replica, request) for replica, request in requests))

        unexpected = [o for o in outcomes if o.code != grpc.StatusCode.OK and (o.code, o.reason) not in CLEAN_REFUSALS]
        assert unexpected == [], unexpected
        everyone = clients + list(orphans.values())
        await stack.wait_settled(everyone, timeout_s=RECOVERY_TIMEOUT_S)

        confirmed = await confirmed_sessions(stack, therapist_ids)
        assert set(confirmed) == {o.booking_id for o in outcomes if o.booking_id is not None}
        assert await overlapping_sessions(stack, therapist_ids) == []
        # The replicas saw each other's bookings: slots booked through one were refused through the other.
        assert assert_refusals_were_true(outcomes, confirmed, base) >= 1
        # And the race was real: refusals came after credits were held (past the pre-check,
        # refused under the therapist's lock, then cancelled), not only from the pre-check.
        refused_after_hold = await stack.credit_db.fetchval(
            """SELECT count(*) FROM credit.reservations
                WHERE status = 'released' AND release_reason = 'cancelled' AND owner_id = ANY($1::uuid[])""",
            [uuid.UUID(c) for c in clients],
        )
        assert refused_after_hold >= 1

        await assert_charged_once(stack, confirmed, clients)
        await assert_orphans_released_once(stack, orphans)
        assert await sessions_and_holds_agree(stack, everyone) == []
        assert await stack.credit_violations(everyone) == []


async def _all_paid(stack: Stack, booking_ids: list[str]) -> bool:
    unpaid = await stack.booking_db.fetchval(
        "SELECT count(*) FROM booking.sessions WHERE booking_id = ANY($1::uuid[]) AND payment_status <> 'paid'",
        [uuid.UUID(b) for b in booking_ids],
    )
    return int(unpaid) == 0


# --- 6. a graceful SIGTERM of one replica in the middle of load ---


async def test_sigterm_during_load_drains_cleanly_and_a_retry_elsewhere_books_each_request_once(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(postgres_server_url, tmp_path, booking_replicas=2, booking_env=FAST_RECOVERY) as stack:
        doomed, survivor = stack.bookings
        therapist = await World.create(stack.booking_stub(1), stack.credit_stub(), credits=0, credit_cost=COST)
        clients = await funded_clients(stack, SHUTDOWN_WORKERS, SHUTDOWN_CREDITS)
        slots = iter(range(SHUTDOWN_WORKERS * SHUTDOWN_REQUESTS_PER_WORKER))
        outcomes: list[Outcome] = []

        async def worker(client: str) -> None:
            # Books distinct slots one after another through the doomed replica until a call fails.
            for _ in range(SHUTDOWN_REQUESTS_PER_WORKER):
                k = next(slots)
                start = future_hour(10 + k // 24, k % 24)
                outcome = await book(stack, 0, therapist.booking_request(start, client_id=client))
                outcomes.append(outcome)
                if outcome.code != grpc.StatusCode.OK:
                    return

        load = asyncio.gather(*(worker(client) for client in clients))
        try:
            await wait_for(
                lambda: sum(o.code == grpc.StatusCode.OK for o in outcomes) >= SHUTDOWN_AFTER_OKS,
                timeout_s=RECOVERY_TIMEOUT_S,
                interval_s=0.01,
                what=f"{SHUTDOWN_AFTER_OKS} bookings before the SIGTERM",
            )
            stack.terminate(doomed)
            assert await wait_exit(doomed) == 0, stack.logs()
        finally:
            await asyncio.wait_for(load, CALL_TIMEOUT_S * 2)
        assert stack.events(doomed, "shutdown_finished")
        # Calls the doomed replica had in flight when the signal came ran to completion.
        events = log_events(doomed)
        started_at = next(i for i, e in enumerate(events) if e.get("event") == "shutdown_started")
        drained = [
            e for e in events[started_at:] if e.get("event") == "rpc_finished" and e.get("rpc") == "CreateBooking"
        ]
        assert all(e["grpc_code"] == "OK" for e in drained), drained

        codes = Counter((o.code.name, o.reason) for o in outcomes)
        failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
        for outcome in failed:
            # Refused at the door (UNAVAILABLE), or a call that reached gRPC core during the drain
            # but never the handler, which core cancels: in both cases nothing was done for it.
            assert outcome.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), codes
            if outcome.code == grpc.StatusCode.CANCELLED:
                key = request_key(OPERATOR_ID, outcome.request.request_id)
                assert (await stack.session(key), await stack.refusal(key)) == (None, None), outcome
        assert failed, f"the load ended before the SIGTERM: {codes}"
        booked = {o.booking_id for o in outcomes if o.booking_id is not None}

        # A call refused by the draining replica is retried (same request_id) on the survivor.
        retried = await asyncio.gather(*(book(stack, 1, o.request) for o in failed))
        assert all(o.code == grpc.StatusCode.OK for o in retried), retried
        booked |= {o.booking_id for o in retried if o.booking_id is not None}

        # Every request booked exactly once, every booking paid, and the books straight once
        # the survivor's reconciler has resolved whatever the drained replica left held.
        await stack.wait_settled(clients, timeout_s=RECOVERY_TIMEOUT_S)
        confirmed = await confirmed_sessions(stack, [therapist.therapist_id])
        assert set(confirmed) == booked
        assert len(confirmed) == len(outcomes)
        await wait_for(lambda: _all_paid(stack, list(confirmed)), timeout_s=RECOVERY_TIMEOUT_S, what="all paid")
        per_client = Counter(client for client, _, _ in confirmed.values())
        for client in clients:
            assert await stack.buckets(client) == (
                SHUTDOWN_CREDITS - per_client[client] * COST,
                0,
                per_client[client] * COST,
                SHUTDOWN_CREDITS,
            )
        assert await sessions_and_holds_agree(stack, clients) == []
        assert await stack.credit_violations(clients) == []
        assert survivor.process is not None and survivor.process.poll() is None
