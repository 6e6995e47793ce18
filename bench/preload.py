"""What a large marketplace holds after a few years, loaded with bulk SQL into the two services'
databases: `python -m bench --preload` (docs/performance.md, "Large tables"), or alone:

    python -m bench.preload --booking-url URL --credit-url URL [--size large|smoke] [--tag NAME]

The shapes are those the second edition of the booking protocol writes. Per booking: its session
(with its request's fingerprint), its video room, one delivered `booking_event` outbox row, and
in the credit database its hold (reservation id = booking id, reference naming the therapist)
with two ledger entries (reserve, commit), or three when it was cancelled (and refunded). Per
client: an account, a grant before its first booking and, for every other client, a top-up.
Requests refused without a booking keep their answer in `booking.request_answers`. At the `large`
size that is 2,000 therapists, 200,000 clients, 1,000,000 sessions, 1,000,000 outbox rows,
1,000,000 reservations and 2,400,000 ledger entries, over three years up to a quarter ahead.

Every constraint holds on what is loaded. The rows go in with triggers off
(`session_replication_role = replica`: the ledger's trigger would update an account per entry),
so the accounts are written with the ledger's sums, and what triggers would have checked is
checked afterwards: every foreign key by an anti-join, and the credit books by the invariants
checker of the test suite (tests/support/invariants.py), over every account. CHECK, unique and
exclusion constraints are enforced as the rows go in. Ids are random-looking UUIDs (version 4
shaped, from an md5 of the tag and a row number), so the two databases agree on them without
talking, and two loads with different tags never collide.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from tests.support.invariants import credit_invariant_violations

# Rows per INSERT statement, so that progress shows and no statement runs for minutes.
CHUNK_ROWS = 250_000
# The history spans this far back, and confirmed sessions this far ahead.
HISTORY = timedelta(days=3 * 365)
AHEAD = timedelta(days=90)
SESSION_MINUTES = 50
ZONES = ("Europe/London", "Europe/Berlin", "America/New_York", "America/Los_Angeles", "Australia/Sydney")
# Every tenth booking was cancelled by its client early enough to be refunded in full.
CANCELLED_EVERY = 10
# A request refused without a booking, per this many bookings, by reason.
REFUSALS = (
    ("SLOT_UNAVAILABLE", "the slot is no longer available"),
    ("INSUFFICIENT_CREDITS", "the client has too few credits for this session"),
    ("SLOT_UNAVAILABLE", "the slot is no longer available"),
    ("OUTSIDE_AVAILABILITY", "the therapist is not available at that time"),
)
# Clients are spread over the sessions by a stride prime to any client count we use.
CLIENT_STRIDE = 7919

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    therapists: int
    clients: int
    sessions: int
    # Requests refused without a booking (kept in booking.request_answers).
    refusals: int

    def __post_init__(self) -> None:
        assert 1 <= self.therapists <= self.sessions and self.clients >= 1, self
        assert self.clients == 1 or self.clients % CLIENT_STRIDE != 0, self
        # Sessions of one therapist sit at least two hours apart: they never overlap.
        assert self.step >= timedelta(hours=2), f"too many sessions per therapist: {self}"

    @property
    def per_therapist(self) -> int:
        return math.ceil(self.sessions / self.therapists)

    @property
    def step(self) -> timedelta:
        return (HISTORY + AHEAD) / self.per_therapist

    @property
    def ledger_entries(self) -> int:
        grants = self.clients + self.clients // 2
        return grants + 2 * self.sessions + self.sessions // CANCELLED_EVERY


LARGE = Sizes(therapists=2000, clients=200_000, sessions=1_000_000, refusals=50_000)
SMOKE = Sizes(therapists=20, clients=400, sessions=4000, refusals=200)
SIZES = {"large": LARGE, "smoke": SMOKE}


@dataclass(frozen=True)
class Loaded:
    """What a load wrote, by table, and how long it took."""

    rows: dict[str, int]
    seconds: float


def _uuid(tag: str, kind: str, index: str) -> str:
    """SQL for the UUID of row `index` (an SQL expression) of a kind: the same in both databases."""
    return f"pg_temp.preload_uuid('{tag}:{kind}:' || ({index})::text)"


_UUID_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.preload_uuid(seed text) RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(set_byte(set_byte(b, 6, (get_byte(b, 6) & 15) | 64), 8, (get_byte(b, 8) & 63) | 128), 'hex')::uuid
      FROM decode(md5(seed), 'hex') AS b
$$"""


def _numbered(sizes: Sizes, first: int, last: int) -> str:
    """Bookings `first`..`last` by number: each one's therapist (t), its rank among the therapist's
    sessions (k), its client (c, spread by a stride), its cost and whether it was cancelled."""
    return f"""SELECT i, 1 + (i - 1) % {sizes.therapists} AS t, (i - 1) / {sizes.therapists} AS k,
                      1 + (i * {CLIENT_STRIDE}::bigint) % {sizes.clients} AS c,
                      1 + (1 + (i - 1) % {sizes.therapists}) % 4 AS cost, i % {CANCELLED_EVERY} = 3 AS cancelled
                 FROM generate_series({first}, {last}) AS i"""


def _plan(tag: str, sizes: Sizes, first: int, last: int) -> str:
    """The bookings `first`..`last`, one row each (both databases derive their rows from it): the
    numbers of `_numbered`, the ids, and the instants. Sessions of one therapist follow each other
    `step` apart, on whole hours."""
    step_s = int(sizes.step.total_seconds())
    return f"""
    CREATE TEMPORARY TABLE preload_plan AS
    SELECT i, t, c, booking_id, therapist_id, client_id, cost, cancelled, starts_at, created_at,
           CASE WHEN cancelled THEN least(created_at + interval '1 day', now()) END AS cancelled_at
      FROM (SELECT i, t, c, {_uuid(tag, "booking", "i")} AS booking_id, {_uuid(tag, "therapist", "t")} AS therapist_id,
                   {_uuid(tag, "client", "c")} AS client_id, cost, cancelled, starts_at,
                   least(starts_at - make_interval(days => 1 + i % 14), now() - interval '1 minute') AS created_at
              FROM (SELECT *, date_trunc('hour', now() - interval '{int(HISTORY.total_seconds())} seconds'
                                                 + make_interval(secs => k * {step_s})
                                                 + make_interval(hours => t % 8)) AS starts_at
                      FROM ({_numbered(sizes, first, last)}) numbered) timed) planned"""


async def _chunks(
    connection: asyncpg.Connection, tag: str, sizes: Sizes, inserts: dict[str, str], progress: Progress
) -> dict[str, int]:
    """Per chunk of bookings, makes its plan (preload_plan) once and runs each of `inserts` (by
    table) on it, with a progress line; the rows written, by table."""
    started = time.perf_counter()
    totals = dict.fromkeys(inserts, 0)
    for first in range(1, sizes.sessions + 1, CHUNK_ROWS):
        last = min(sizes.sessions, first + CHUNK_ROWS - 1)
        await connection.execute("DROP TABLE IF EXISTS preload_plan")
        await connection.execute(_plan(tag, sizes, first, last))
        for table, insert in inserts.items():
            totals[table] += int((await connection.execute(insert)).split()[-1])
        done = ", ".join(f"{table} {count:,}" for table, count in totals.items())
        progress(f"  {done}  ({time.perf_counter() - started:.0f} s)")
    await connection.execute("DROP TABLE preload_plan")
    return totals


async def _prepare(connection: asyncpg.Connection) -> None:
    await connection.execute(_UUID_FUNCTION)
    await connection.execute("SET session_replication_role = replica")


async def load_booking(connection: asyncpg.Connection, tag: str, sizes: Sizes, progress: Progress) -> dict[str, int]:
    await _prepare(connection)
    rows: dict[str, int] = {}
    zones = "ARRAY[" + ", ".join(f"'{zone}'" for zone in ZONES) + "]"
    history_s = int(HISTORY.total_seconds())
    status = await connection.execute(
        f"""INSERT INTO booking.therapists
                   (therapist_id, request_id, display_name, time_zone, booking_horizon_days, created_at, updated_at)
            SELECT {_uuid(tag, "therapist", "t")}, 'preload-{tag}-therapist-' || t, 'Dr. Preload ' || t,
                   ({zones})[1 + t % {len(ZONES)}], 365,
                   now() - interval '{history_s} seconds' - interval '30 days',
                   now() - interval '{history_s} seconds' - interval '30 days'
              FROM generate_series(1, {sizes.therapists}) AS t"""
    )
    rows["booking.therapists"] = int(status.split()[-1])
    status = await connection.execute(
        f"""INSERT INTO booking.weekly_windows (therapist_id, weekday, start_minute, end_minute)
            SELECT {_uuid(tag, "therapist", "t")}, d, 9 * 60, 17 * 60
              FROM generate_series(1, {sizes.therapists}) AS t, generate_series(1, 5) AS d"""
    )
    rows["booking.weekly_windows"] = int(status.split()[-1])
    status = await connection.execute(
        f"""INSERT INTO booking.session_types
                   (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost, created_at)
            SELECT {_uuid(tag, "therapist", "t")}, {_uuid(tag, "therapist", "t")}, 'preload-{tag}-type-' || t,
                   'Session', {SESSION_MINUTES}, 1 + t % 4, now() - interval '{history_s} seconds' - interval '30 days'
              FROM generate_series(1, {sizes.therapists}) AS t"""
    )
    rows["booking.session_types"] = int(status.split()[-1])
    progress(f"  booking.therapists {sizes.therapists:,}, with schedules and session types")
    ends = f"p.starts_at + interval '{SESSION_MINUTES} minutes'"
    # Per booking: its session, its video room, and one event row (its last event, delivered).
    inserts = {
        "booking.sessions": f"""INSERT INTO booking.sessions
                   (booking_id, request_id, request_fingerprint, client_id, therapist_id, session_type_id, starts_at,
                    ends_at, blocked, time_zone, credit_cost, status, payment_status, cancelled_by, cancel_reason,
                    refunded_credits, cancelled_at, created_at, updated_at)
            SELECT p.booking_id, {_uuid(tag, "request", "p.i")}::text,
                   encode(sha256(convert_to('{tag}:request:' || p.i, 'UTF8')), 'hex'),
                   p.client_id, p.therapist_id, p.therapist_id, p.starts_at, {ends}, tstzrange(p.starts_at, {ends}),
                   t.time_zone, p.cost,
                   CASE WHEN p.cancelled THEN 'cancelled' ELSE 'confirmed' END,
                   CASE WHEN p.cancelled THEN 'refunded' ELSE 'paid' END,
                   CASE WHEN p.cancelled THEN 'client' END, CASE WHEN p.cancelled THEN 'no_longer_needed' END,
                   CASE WHEN p.cancelled THEN p.cost ELSE 0 END, p.cancelled_at, p.created_at,
                   coalesce(p.cancelled_at, p.created_at + interval '1 second')
              FROM preload_plan p JOIN booking.therapists t ON t.therapist_id = p.therapist_id""",
        "booking.video_rooms": """
            INSERT INTO booking.video_rooms (booking_id, room_name, state, url, created_at, updated_at)
            SELECT booking_id, room_name, CASE WHEN cancelled THEN 'deleted' ELSE 'ready' END,
                  CASE WHEN NOT cancelled THEN 'https://video.example/' || room_name END,
                  created_at, coalesce(cancelled_at, created_at + interval '2 seconds')
             FROM (SELECT *, 'booking-' || replace(booking_id::text, '-', '') AS room_name FROM preload_plan) p""",
        "booking.outbox": f"""INSERT INTO booking.outbox
                   (event_id, kind, booking_id, payload, status, attempts, next_attempt_at, created_at, updated_at)
            SELECT {_uuid(tag, "event", "p.i")}, 'booking_event', p.booking_id,
                   jsonb_build_object(
                       'type', CASE WHEN p.cancelled THEN 'booking.cancelled' ELSE 'booking.confirmed' END,
                       'occurred_at', coalesce(p.cancelled_at, p.created_at),
                       'data', jsonb_build_object(
                           'booking_id', p.booking_id, 'client_id', p.client_id, 'therapist_id', p.therapist_id,
                           'session_type_id', p.therapist_id, 'start_time', p.starts_at, 'end_time', {ends},
                           'status', CASE WHEN p.cancelled THEN 'cancelled' ELSE 'confirmed' END,
                           'credit_cost', p.cost)),
                   'delivered', 1, coalesce(p.cancelled_at, p.created_at) + interval '30 seconds',
                   coalesce(p.cancelled_at, p.created_at), coalesce(p.cancelled_at, p.created_at) + interval '1 second'
              FROM preload_plan p""",
    }
    rows |= await _chunks(connection, tag, sizes, inserts, progress)
    reasons = ", ".join(f"('{reason}', '{message}')" for reason, message in REFUSALS)
    status = await connection.execute(
        f"""INSERT INTO booking.request_answers
                   (request_key, fingerprint, refusal_reason, refusal_message, refusal_metadata, created_at)
            SELECT {_uuid(tag, "refused", "j")}, encode(sha256(convert_to('{tag}:refused:' || j, 'UTF8')), 'hex'),
                   r.reason, r.message, '{{}}'::jsonb,
                   now() - make_interval(secs => (j * 7907) % {history_s})
              FROM generate_series(1, {sizes.refusals}) AS j
              JOIN (SELECT row_number() OVER () - 1 AS n, reason, message FROM (VALUES {reasons}) v(reason, message)) r
                ON r.n = j % {len(REFUSALS)}"""
    )
    rows["booking.request_answers"] = int(status.split()[-1])
    progress(f"  booking.request_answers {rows['booking.request_answers']:,}")
    await connection.execute("SET session_replication_role = origin")
    return rows


async def load_credit(connection: asyncpg.Connection, tag: str, sizes: Sizes, progress: Progress) -> dict[str, int]:
    await _prepare(connection)
    rows: dict[str, int] = {}
    history_s = int(HISTORY.total_seconds())
    # Every client's bookings, summed once from their numbers alone (no ids to make): the grant
    # covers them all, and the account holds the sums.
    started = time.perf_counter()
    await connection.execute(
        f"""CREATE TEMPORARY TABLE preload_clients AS
            SELECT c, {_uuid(tag, "client", "c")} AS client_id, sum(cost) AS booked,
                   coalesce(sum(cost) FILTER (WHERE NOT cancelled), 0) AS spent
              FROM ({_numbered(sizes, 1, sizes.sessions)}) numbered
             GROUP BY c"""
    )
    # At sign-up, a purchase covering every booking to come, and for every other client a promotion.
    top_up = 10
    signed_up = f"now() - interval '{history_s} seconds' - interval '30 days'"
    status = await connection.execute(
        f"""INSERT INTO credit.accounts (owner_id, available, held, spent, granted, created_at, updated_at)
            SELECT client_id, booked + 20 + CASE WHEN c % 2 = 0 THEN {top_up} ELSE 0 END - spent, 0, spent,
                   booked + 20 + CASE WHEN c % 2 = 0 THEN {top_up} ELSE 0 END,
                   {signed_up}, now()
              FROM preload_clients"""
    )
    rows["credit.accounts"] = int(status.split()[-1])
    progress(f"  credit.accounts {rows['credit.accounts']:,}  ({time.perf_counter() - started:.0f} s)")
    # The ledger in time order, so that entry ids follow time as the service's do: the grants at
    # sign-up first, then the bookings' entries, chunk by chunk (each chunk's in time order).
    status = await connection.execute(
        f"""INSERT INTO credit.ledger_entries
                   (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, request_id, grant_kind,
                    created_at)
            SELECT client_id, 'grant', amount, 0, 0, amount, 'preload-{tag}-grant-' || c || '-' || n, kind, at
              FROM (SELECT c, client_id, 1 AS n, booked + 20 AS amount, 'purchase' AS kind, {signed_up} AS at
                      FROM preload_clients
                    UNION ALL
                    SELECT c, client_id, 2, {top_up}, 'promotion', {signed_up}
                      FROM preload_clients WHERE c % 2 = 0) g
             ORDER BY at, c, n"""
    )
    grants = int(status.split()[-1])
    # Per booking: its hold, and its ledger entries (reserve, commit, and refund if cancelled).
    inserts = {
        "credit.reservations": """INSERT INTO credit.reservations
                  (reservation_id, owner_id, amount, committed_amount, refunded_amount, status, reference, created_at,
                   updated_at, expires_at)
           SELECT booking_id, client_id, cost, cost, CASE WHEN cancelled THEN cost ELSE 0 END,
                  CASE WHEN cancelled THEN 'refunded' ELSE 'committed' END,
                  'therapist:' || therapist_id || '/booking:' || booking_id, created_at,
                  coalesce(cancelled_at, created_at + interval '1 second'), created_at + interval '1 hour'
             FROM preload_plan""",
        "credit.ledger_entries": """INSERT INTO credit.ledger_entries
                  (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, reservation_id, created_at)
           SELECT client_id, kind, available, held, spent, 0, booking_id, at
             FROM (SELECT client_id, booking_id, 'reserve' AS kind, -cost AS available, cost AS held, 0 AS spent,
                          created_at AS at
                     FROM preload_plan
                   UNION ALL
                   SELECT client_id, booking_id, 'commit', 0, -cost, cost, created_at + interval '1 second'
                     FROM preload_plan
                   UNION ALL
                   SELECT client_id, booking_id, 'refund', cost, 0, -cost, cancelled_at
                     FROM preload_plan WHERE cancelled) e
            ORDER BY at""",
    }
    rows |= await _chunks(connection, tag, sizes, inserts, progress)
    rows["credit.ledger_entries"] += grants
    await connection.execute("DROP TABLE preload_clients; SET session_replication_role = origin")
    return rows


# What the triggers that were off would have checked: every foreign key, by an anti-join.
_BOOKING_FOREIGN_KEYS = """
SELECT (SELECT count(*) FROM booking.sessions s
         WHERE NOT EXISTS (SELECT 1 FROM booking.therapists t WHERE t.therapist_id = s.therapist_id)
            OR NOT EXISTS (SELECT 1 FROM booking.session_types y WHERE y.session_type_id = s.session_type_id))
     + (SELECT count(*) FROM booking.session_types y
         WHERE NOT EXISTS (SELECT 1 FROM booking.therapists t WHERE t.therapist_id = y.therapist_id))
     + (SELECT count(*) FROM booking.weekly_windows w
         WHERE NOT EXISTS (SELECT 1 FROM booking.therapists t WHERE t.therapist_id = w.therapist_id))
     + (SELECT count(*) FROM booking.video_rooms v
         WHERE NOT EXISTS (SELECT 1 FROM booking.sessions s WHERE s.booking_id = v.booking_id))
     + (SELECT count(*) FROM booking.request_answers a
         WHERE a.booking_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM booking.sessions s WHERE s.booking_id = a.booking_id))
"""
_CREDIT_FOREIGN_KEYS = """
SELECT (SELECT count(*) FROM credit.reservations r
         WHERE NOT EXISTS (SELECT 1 FROM credit.accounts a WHERE a.owner_id = r.owner_id))
     + (SELECT count(*) FROM credit.ledger_entries e
         WHERE NOT EXISTS (SELECT 1 FROM credit.accounts a WHERE a.owner_id = e.owner_id)
            OR (e.reservation_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM credit.reservations r WHERE r.reservation_id = e.reservation_id)))
"""


async def verify(booking: asyncpg.Connection, credit: asyncpg.Connection) -> list[str]:
    """What is wrong with the loaded data (an empty list: every constraint holds)."""

    async def credit_problems() -> list[str]:
        broken = await credit.fetchval(_CREDIT_FOREIGN_KEYS)
        found = [f"{broken} credit rows name a row that does not exist"] if broken else []
        return found + await credit_invariant_violations(credit)

    broken, found = await asyncio.gather(booking.fetchval(_BOOKING_FOREIGN_KEYS), credit_problems())
    return ([f"{broken} booking rows name a row that does not exist"] if broken else []) + found


async def load(booking_url: str, credit_url: str, sizes: Sizes, *, tag: str, progress: Progress) -> Loaded:
    """Loads `sizes` into both databases (already migrated), checks every constraint, and leaves
    them analysed and checkpointed, ready to measure. Raises if anything does not hold."""
    started = time.perf_counter()
    booking = await asyncpg.connect(booking_url)
    credit = await asyncpg.connect(credit_url)
    try:
        progress(
            f"preload {tag}: {sizes.sessions:,} bookings of {sizes.clients:,} clients"
            f" with {sizes.therapists:,} therapists"
        )
        # The two databases load side by side: two backends, two cores.
        booking_rows, credit_rows = await asyncio.gather(
            load_booking(booking, tag, sizes, progress), load_credit(credit, tag, sizes, progress)
        )
        rows = booking_rows | credit_rows
        progress("  checking every foreign key and the credit books ...")
        problems = await verify(booking, credit)
        if problems:
            raise AssertionError(f"the preloaded data breaks {len(problems)} constraints: {problems[:5]}")
        progress("  VACUUM ANALYZE, CHECKPOINT ...")
        await asyncio.gather(booking.execute("VACUUM ANALYZE"), credit.execute("VACUUM ANALYZE"))
        await booking.execute("CHECKPOINT")
    finally:
        await booking.close()
        await credit.close()
    loaded = Loaded(rows, round(time.perf_counter() - started, 1))
    progress(f"preload {tag}: done in {loaded.seconds:.0f} s")
    return loaded


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.preload", description=__doc__.splitlines()[0])
    parser.add_argument("--booking-url", required=True, help="the booking service's database (migrated)")
    parser.add_argument("--credit-url", required=True, help="the credit service's database (migrated)")
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--tag", default="bulk", help="names this load's rows (two loads need two tags)")
    arguments = parser.parse_args()
    loaded = asyncio.run(
        load(
            arguments.booking_url,
            arguments.credit_url,
            SIZES[arguments.size],
            tag=arguments.tag,
            progress=print_progress,
        )
    )
    for table, count in loaded.rows.items():
        print(f"{table:<26} {count:>10,}")


if __name__ == "__main__":
    main()
