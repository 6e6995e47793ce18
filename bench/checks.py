"""Correctness of a scenario's run, judged from outside through SQL, for each design.

The load generator's own counts are checked against each other (every call attempted ended
exactly one way) and against the databases: no two confirmed sessions overlap, the credit books
hold (tests/support/invariants.py, the same checker the test suite uses), every acknowledged
booking is confirmed and PAID, its request never also answered with a refusal, with a committed
reservation of its cost, every hold without a session was released, and each client's spent credits equal the cost
of its sessions. Refusals must carry an expected reason; errors must not happen at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import asyncpg

from bench import baseline
from tests.support.invariants import credit_invariant_violations

# A lost race for a slot is the one refusal a scenario expects.
EXPECTED_REFUSALS = frozenset({"SLOT_UNAVAILABLE"})
# The outbox may still be delivering a run's side effects (notifications, video rooms) when it ends.
SETTLE_TIMEOUT_S = 120.0
SETTLE_POLL_S = 0.2

_SESSIONS_SQL = """
SELECT s.booking_id, s.client_id, s.credit_cost, s.status, s.payment_status, a.refusal_reason AS refused
  FROM booking.sessions s LEFT JOIN booking.request_answers a ON a.request_key = s.booking_id
 WHERE s.therapist_id = ANY($1::uuid[])
"""
_OVERLAPS_SQL = """
SELECT count(*) FROM booking.sessions a JOIN booking.sessions b
    ON a.therapist_id = b.therapist_id AND a.booking_id < b.booking_id AND a.blocked && b.blocked
 WHERE a.therapist_id = ANY($1::uuid[]) AND a.status = 'confirmed' AND b.status = 'confirmed'
"""
_UNSETTLED_SESSIONS_SQL = """
SELECT count(*) FROM booking.sessions WHERE therapist_id = ANY($1::uuid[]) AND payment_status = 'committing'
"""
_RESERVATIONS_SQL = """
SELECT reservation_id, owner_id, amount, committed_amount, status, reference
  FROM credit.reservations WHERE owner_id = ANY($1::uuid[])
"""
_PENDING_SQL = "SELECT count(*) FROM credit.reservations WHERE owner_id = ANY($1::uuid[]) AND status = 'pending'"
_OUTBOX_PENDING_SQL = "SELECT count(*) FROM booking.outbox WHERE status = 'pending'"
_OUTBOX_DEAD_SQL = "SELECT count(*) FROM booking.outbox WHERE status = 'dead'"
_SPENT_SQL = "SELECT owner_id, spent FROM credit.accounts WHERE owner_id = ANY($1::uuid[])"


def count_violations(result: dict[str, Any]) -> list[str]:
    """The load generator's counts agree with each other; refusals are expected ones; no errors."""
    found = []
    totals = result["totals"]
    finished = totals["acknowledged"] + sum(totals["refused"].values()) + sum(totals["errors"].values())
    if finished != totals["attempted"]:
        found.append(f"{totals['attempted']} calls attempted but {finished} acknowledged, refused or failed")
    if len(result["booked_ids"]) != totals["acknowledged"] or len(set(result["booked_ids"])) != len(
        result["booked_ids"]
    ):
        found.append(f"{totals['acknowledged']} acknowledged but {len(set(result['booked_ids']))} distinct booking ids")
    if totals["acknowledged_paid"] != totals["acknowledged"]:
        found.append(f"{totals['acknowledged'] - totals['acknowledged_paid']} acknowledged bookings not PAID")
    unexpected = {reason: n for reason, n in totals["refused"].items() if reason not in EXPECTED_REFUSALS}
    if unexpected:
        found.append(f"unexpected refusal reasons: {unexpected}")
    if totals["errors"]:
        found.append(f"errors: {totals['errors']}")
    return found


def _uuids(values: list[str]) -> list[uuid.UUID]:
    return [uuid.UUID(v) for v in values]


async def _settle(
    booking: asyncpg.Connection[asyncpg.Record],
    credit: asyncpg.Connection[asyncpg.Record],
    therapists: list[uuid.UUID],
    clients: list[uuid.UUID],
    result: dict[str, Any],
) -> list[str]:
    """Waits (bounded) until no hold is pending, no session is still committing and the outbox
    has delivered everything: work the services finish after answering (an outbox retry, a
    deferred cancel, the side effects) gets its chance, and is done before the next run starts,
    so that no run pays for the one before it. Records how long that took in `result`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + SETTLE_TIMEOUT_S
    result["outbox_pending_after_run"] = await booking.fetchval(_OUTBOX_PENDING_SQL)
    while True:
        pending = await credit.fetchval(_PENDING_SQL, clients)
        committing = await booking.fetchval(_UNSETTLED_SESSIONS_SQL, therapists)
        outbox = await booking.fetchval(_OUTBOX_PENDING_SQL)
        if not pending and not committing and not outbox:
            result["settle_s"] = round(loop.time() - started, 2)
            dead = await booking.fetchval(_OUTBOX_DEAD_SQL)
            return [f"{dead} outbox events dead-lettered"] if dead else []
        if loop.time() >= deadline:
            return [
                f"after {SETTLE_TIMEOUT_S} s, {pending} holds still pending, {committing} sessions committing"
                f" and {outbox} outbox events undelivered"
            ]
        await asyncio.sleep(SETTLE_POLL_S)


async def services_violations(booking_url: str, credit_url: str, result: dict[str, Any]) -> list[str]:
    therapists = _uuids(result["world"]["therapist_ids"])
    clients = _uuids(result["world"]["client_ids"])
    booked = set(_uuids(result["booked_ids"]))
    booking = await asyncpg.connect(booking_url)
    credit = await asyncpg.connect(credit_url)
    try:
        found = await _settle(booking, credit, therapists, clients, result)
        found += await credit_invariant_violations(credit, clients)
        overlaps = await booking.fetchval(_OVERLAPS_SQL, therapists)
        if overlaps:
            found.append(f"{overlaps} pairs of confirmed sessions overlap")
        sessions = {row["booking_id"]: row for row in await booking.fetch(_SESSIONS_SQL, therapists)}
        reservations = {row["reservation_id"]: row for row in await credit.fetch(_RESERVATIONS_SQL, clients)}
        spent = {row["owner_id"]: row["spent"] for row in await credit.fetch(_SPENT_SQL, clients)}
    finally:
        await booking.close()
        await credit.close()
    found += _session_violations(sessions, reservations, booked, sum(result["totals"]["errors"].values()))
    found += _spent_violations(sessions, spent)
    return found


def _session_violations(
    sessions: dict[uuid.UUID, Any], reservations: dict[uuid.UUID, Any], booked: set[uuid.UUID], unanswered: int
) -> list[str]:
    found = []
    missing = booked - sessions.keys()
    if missing:
        found.append(f"{len(missing)} acknowledged bookings have no session, e.g. {next(iter(missing))}")
    confirmed = {b for b, row in sessions.items() if row["status"] == "confirmed"}
    not_ours = confirmed - booked
    if len(not_ours) > unanswered:
        found.append(f"{len(not_ours)} confirmed sessions were never acknowledged ({unanswered} calls unanswered)")
    problems: Counter[str] = Counter()
    for booking_id in booked & sessions.keys():
        row = sessions[booking_id]
        if (row["status"], row["payment_status"], row["refused"]) != ("confirmed", "paid", None):
            problems[f"acknowledged session {row['status']}/{row['payment_status']}/refused {row['refused']}"] += 1
        held = reservations.get(booking_id)
        if held is None or (held["status"], held["committed_amount"]) != ("committed", row["credit_cost"]):
            state = "none" if held is None else f"{held['status']} {held['committed_amount']}"
            problems[f"acknowledged session's reservation is {state}"] += 1
    for reservation_id, held in reservations.items():
        if reservation_id not in sessions and held["status"] != "released":
            problems[f"hold without a session is {held['status']}, not released"] += 1
    found.extend(f"{n} x {problem}" for problem, n in problems.items())
    return found


def _spent_violations(sessions: dict[uuid.UUID, Any], spent: dict[uuid.UUID, int]) -> list[str]:
    booked_cost: Counter[uuid.UUID] = Counter()
    for row in sessions.values():
        if row["status"] == "confirmed":
            booked_cost[row["client_id"]] += row["credit_cost"]
    wrong = [owner for owner in spent.keys() | booked_cost.keys() if spent.get(owner, 0) != booked_cost[owner]]
    if not wrong:
        return []
    owner = wrong[0]
    return [
        f"{len(wrong)} clients' spent credits differ from their sessions' cost, e.g. {owner}: "
        f"spent {spent.get(owner, 0)}, sessions {booked_cost[owner]}"
    ]


async def baseline_violations(baseline_url: str, result: dict[str, Any]) -> list[str]:
    connection = await asyncpg.connect(baseline_url)
    try:
        return await baseline.violations(
            connection,
            _uuids(result["world"]["therapist_ids"]),
            _uuids(result["world"]["client_ids"]),
            result["totals"]["acknowledged"],
            sum(result["totals"]["errors"].values()),
        )
    finally:
        await connection.close()
