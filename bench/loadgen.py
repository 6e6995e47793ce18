"""The load generator, a process of its own: `python -m bench.loadgen --design services ...`.

It sets up a scenario's therapists and clients (through the public RPCs for the services, through
SQL for the baseline), then keeps `--concurrency` calls in flight for `--duration-s` seconds, each
booking a slot the scenario chooses, and writes what happened as JSON to `--result-file`. While
it runs it prints a progress line to stderr about once a second. Every loop is bounded by the
duration, every call by a deadline.

The first `--warmup-s` seconds are counted apart (connections, caches and pools fill up then) and
left out of the rates and latencies, but not out of the totals the correctness checks use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
import grpc
import uvloop
from google.protobuf import timestamp_pb2

from bench import baseline, scenarios
from booking.v1 import booking_pb2, booking_pb2_grpc
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit.auth import ADMIN, AUTHORIZATION_HEADER, CLIENT, load_private_key, mint_token
from service_kit.errors import error_details

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

DESIGNS = ("services", "baseline")
CALL_TIMEOUT_S = 10.0
SETUP_CALL_TIMEOUT_S = 10.0
SETUP_CONCURRENCY = 16
PROGRESS_INTERVAL_S = 1.0
# Lines on stdout around the measured window (progress goes to stderr, the result to a file).
MEASURE_START = "MEASURE_START"
MEASURE_END = "MEASURE_END"
HANDSHAKE_TIMEOUT_S = 10.0
SLOT_UNAVAILABLE = "SLOT_UNAVAILABLE"
# Tokens outlive any bounded run; the set-up acts as an operator with the admin role.
TOKEN_TTL_S = 6 * 3600
ADMIN_SUBJECT = "00000000-0000-4000-8000-0000000be7c0"
# Codes of an answered refusal: the service decided, and said why. Anything else is an error.
_REFUSAL_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)


@dataclass(frozen=True)
class Outcome:
    """One call's result: booked (with the id), refused (with the reason) or failed."""

    booking_id: str | None = None
    paid: bool = False
    refusal: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class World:
    therapist_ids: list[str]
    session_type_ids: list[str]
    client_ids: list[str]


class Target(Protocol):
    async def setup(self, shape: scenarios.Shape) -> World: ...
    async def book(self, worker: int, request_id: str, client_id: str, therapist: int, start: datetime) -> Outcome: ...
    async def close(self) -> None: ...


class Tokens:
    """Bearer tokens signed with the run's key (docs/security.md): an admin's for the set-up, and
    each client's own for its bookings (a client may book only for itself), made once."""

    def __init__(self, key_file: Path, issuer: str, audience: str) -> None:
        self._key = load_private_key(key_file, "--token-key-file")
        self._issuer = issuer
        self._audience = audience
        self._by_subject: dict[str, tuple[tuple[str, str]]] = {}
        self.admin = self._mint(ADMIN_SUBJECT, (ADMIN,))

    def _mint(self, subject: str, roles: tuple[str, ...]) -> tuple[tuple[str, str]]:
        token = mint_token(
            self._key, subject=subject, roles=roles, issuer=self._issuer, audience=self._audience, ttl_s=TOKEN_TTL_S
        )
        return ((AUTHORIZATION_HEADER, f"Bearer {token}"),)

    def client(self, client_id: str) -> tuple[tuple[str, str]]:
        metadata = self._by_subject.get(client_id)
        if metadata is None:
            metadata = self._by_subject[client_id] = self._mint(client_id, (CLIENT,))
        return metadata


class ServicesTarget:
    """The two services, through the booking service's public API (grpc.aio)."""

    def __init__(self, booking_target: str, credit_target: str, tokens: Tokens) -> None:
        self._booking_channel = grpc.aio.insecure_channel(booking_target, options=[("grpc.enable_retries", 0)])
        self._credit_channel = grpc.aio.insecure_channel(credit_target)
        self._booking: BookingServiceAsyncStub = booking_pb2_grpc.BookingServiceStub(self._booking_channel)
        self._credit: CreditServiceAsyncStub = credit_pb2_grpc.CreditServiceStub(self._credit_channel)
        self._tokens = tokens
        self._world: World | None = None

    async def setup(self, shape: scenarios.Shape) -> World:
        limit = asyncio.Semaphore(SETUP_CONCURRENCY)
        therapists = await asyncio.gather(*(self._therapist(limit) for _ in range(shape.therapists)))
        clients = [str(uuid.uuid4()) for _ in range(shape.clients)]
        for client in clients:
            self._tokens.client(client)  # signed now, not while measuring
        await asyncio.gather(*(self._grant(limit, client) for client in clients))
        self._world = World([t for t, _ in therapists], [s for _, s in therapists], clients)
        return self._world

    async def _therapist(self, limit: asyncio.Semaphore) -> tuple[str, str]:
        async with limit:
            created = await self._booking.CreateTherapist(
                booking_pb2.CreateTherapistRequest(
                    request_id=str(uuid.uuid4()),
                    therapist=booking_pb2.Therapist(
                        display_name="Dr. Bench",
                        time_zone="UTC",
                        booking_horizon_days=scenarios.HORIZON_DAYS,
                    ),
                ),
                timeout=SETUP_CALL_TIMEOUT_S,
                metadata=self._tokens.admin,
            )
            therapist_id = created.therapist.therapist_id
            await self._booking.SetWeeklySchedule(
                booking_pb2.SetWeeklyScheduleRequest(
                    therapist_id=therapist_id,
                    windows=[
                        booking_pb2.WeeklyWindow(
                            day_of_week=day,  # type: ignore[arg-type]  # DayOfWeek numbers 1..7
                            window=booking_pb2.TimeWindow(start_time="00:00", end_time="24:00"),
                        )
                        for day in range(1, 8)
                    ],
                ),
                timeout=SETUP_CALL_TIMEOUT_S,
                metadata=self._tokens.admin,
            )
            session_type = await self._booking.CreateSessionType(
                booking_pb2.CreateSessionTypeRequest(
                    therapist_id=therapist_id,
                    request_id=str(uuid.uuid4()),
                    session_type=booking_pb2.SessionType(
                        name="Bench session",
                        duration_minutes=scenarios.SLOT_MINUTES,
                        credit_cost=scenarios.CREDIT_COST,
                        # Slots are SLOT_MINUTES apart from a whole hour: on this grid of starts.
                        start_step_minutes=scenarios.SLOT_MINUTES,
                    ),
                ),
                timeout=SETUP_CALL_TIMEOUT_S,
                metadata=self._tokens.admin,
            )
            return therapist_id, session_type.session_type.session_type_id

    async def _grant(self, limit: asyncio.Semaphore, client_id: str) -> None:
        async with limit:
            await self._credit.GrantCredits(
                credit_pb2.GrantCreditsRequest(
                    request_id=str(uuid.uuid4()),
                    owner_id=client_id,
                    amount=scenarios.CLIENT_CREDITS,
                    kind=credit_pb2.GRANT_KIND_PURCHASE,
                ),
                timeout=SETUP_CALL_TIMEOUT_S,
                metadata=self._tokens.admin,
            )

    async def book(self, worker: int, request_id: str, client_id: str, therapist: int, start: datetime) -> Outcome:
        assert self._world is not None
        start_time = timestamp_pb2.Timestamp()
        start_time.FromDatetime(start)
        request = booking_pb2.CreateBookingRequest(
            request_id=request_id,
            client_id=client_id,
            therapist_id=self._world.therapist_ids[therapist],
            session_type_id=self._world.session_type_ids[therapist],
            start_time=start_time,
        )
        try:
            response = await self._booking.CreateBooking(
                request, timeout=CALL_TIMEOUT_S, metadata=self._tokens.client(client_id)
            )
        except grpc.aio.AioRpcError as failure:
            details = error_details(failure)
            if details.code in _REFUSAL_CODES and details.reason:
                return Outcome(refusal=details.reason)
            return Outcome(error=f"{details.code.name}:{details.reason or '-'}")
        booking = response.booking
        return Outcome(booking_id=booking.booking_id, paid=booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID)

    async def close(self) -> None:
        await self._booking_channel.close()
        await self._credit_channel.close()


class BaselineTarget:
    """The single PL/pgSQL function, through asyncpg: one connection per worker, held for the run."""

    def __init__(self, database_url: str, concurrency: int) -> None:
        self._database_url = database_url
        self._concurrency = concurrency
        self._connections: list[asyncpg.Connection[asyncpg.Record]] = []
        self._world: World | None = None

    async def setup(self, shape: scenarios.Shape) -> World:
        self._connections = list(
            await asyncio.gather(*(asyncpg.connect(self._database_url) for _ in range(self._concurrency)))
        )
        therapists = [(uuid.uuid4(), uuid.uuid4()) for _ in range(shape.therapists)]
        clients = [uuid.uuid4() for _ in range(shape.clients)]
        await baseline.seed(
            self._connections[0],
            therapists,
            scenarios.SLOT_MINUTES,
            scenarios.CREDIT_COST,
            clients,
            scenarios.CLIENT_CREDITS,
        )
        self._world = World([str(t) for t, _ in therapists], [str(s) for _, s in therapists], [str(c) for c in clients])
        return self._world

    async def book(self, worker: int, request_id: str, client_id: str, therapist: int, start: datetime) -> Outcome:
        assert self._world is not None
        try:
            outcome, booking_id = await baseline.book(
                self._connections[worker],
                request_id,
                uuid.UUID(client_id),
                uuid.UUID(self._world.therapist_ids[therapist]),
                uuid.UUID(self._world.session_type_ids[therapist]),
                start,
            )
        except asyncpg.ExclusionViolationError:
            return Outcome(refusal=SLOT_UNAVAILABLE)  # the constraint, if ever the lock let one by
        except asyncpg.PostgresError as failure:
            return Outcome(error=f"SQLSTATE_{failure.sqlstate}")
        except TimeoutError:
            return Outcome(error="TIMEOUT")
        if outcome in ("booked", "repeated"):
            return Outcome(booking_id=str(booking_id), paid=True)  # paid in the same transaction
        return Outcome(refusal=outcome)

    async def close(self) -> None:
        await asyncio.gather(*(c.close(timeout=5) for c in self._connections), return_exceptions=True)


@dataclass
class Stats:
    attempted: int = 0
    acknowledged: int = 0
    paid: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_booked_s: list[float] = field(default_factory=list)
    latencies_all_s: list[float] = field(default_factory=list)

    def record(self, outcome: Outcome, elapsed_s: float) -> None:
        self.latencies_all_s.append(elapsed_s)
        if outcome.booking_id is not None:
            self.acknowledged += 1
            self.paid += outcome.paid
            self.latencies_booked_s.append(elapsed_s)
        elif outcome.refusal is not None:
            self.refused[outcome.refusal] += 1
        else:
            self.errors[outcome.error or "UNKNOWN"] += 1

    @property
    def finished(self) -> int:
        return self.acknowledged + sum(self.refused.values()) + sum(self.errors.values())


def percentiles_ms(samples_s: list[float]) -> dict[str, float | None]:
    if not samples_s:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(samples_s)

    def at(fraction: float) -> float:
        # Nearest rank: the smallest sample with at least `fraction` of the samples at or below it.
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return round(ordered[index] * 1000, 3)

    return {
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


@dataclass
class Run:
    target: Target
    design: str
    scenario: str
    concurrency: int
    duration_s: float
    warmup_s: float
    seed: int
    quiet: bool
    handshake: bool = False
    warmup: Stats = field(default_factory=Stats)
    measured: Stats = field(default_factory=Stats)
    booked_ids: list[str] = field(default_factory=list)
    cpu_measured_s: float = 0.0  # this process's CPU time in the measured window
    _cpu_at_start: float = 0.0

    async def execute(self) -> dict[str, Any]:
        setup_started = time.perf_counter()
        shape = scenarios.shape(self.scenario, self.concurrency)
        world = await self.target.setup(shape)
        setup_s = time.perf_counter() - setup_started
        rng = random.Random(self.seed)
        picker = scenarios.SlotPicker(self.scenario, shape.therapists, rng)
        base = scenarios.first_slot_start(datetime.now(UTC))
        loop = asyncio.get_running_loop()
        started = loop.time()
        measure_from = started + self.warmup_s
        end = measure_from + self.duration_s
        progress = asyncio.create_task(self._progress(started, end))
        marker = asyncio.create_task(self._mark_measure_start(measure_from))
        try:
            await asyncio.gather(
                *(self._worker(w, world, picker, rng, base, measure_from, end) for w in range(self.concurrency))
            )
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        finished = loop.time()
        await marker
        self.cpu_measured_s = time.process_time() - self._cpu_at_start
        print(MEASURE_END, flush=True)
        if self.handshake:
            # The parent reads every process's CPU time now; our connections (and so PostgreSQL's
            # backends serving them) must still exist then. It answers with a line on stdin.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), HANDSHAKE_TIMEOUT_S)
        measured_s = max(1e-9, finished - measure_from)
        return self._result(world, setup_s, measured_s)

    async def _worker(
        self,
        worker: int,
        world: World,
        picker: scenarios.SlotPicker,
        rng: random.Random,
        base: datetime,
        measure_from: float,
        end: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < end:
            picked = picker.pick()
            if picked is None:
                return  # out of slots: far beyond any bounded run, but never a loop without end
            therapist, slot = picked
            stats = self.measured if now >= measure_from else self.warmup
            stats.attempted += 1
            client = world.client_ids[rng.randrange(len(world.client_ids))]
            call_started = time.perf_counter()
            outcome = await self.target.book(
                worker, str(uuid.uuid4()), client, therapist, scenarios.slot_start(base, slot)
            )
            stats.record(outcome, time.perf_counter() - call_started)
            if outcome.booking_id is not None:
                self.booked_ids.append(outcome.booking_id)
            if outcome.booking_id is not None or outcome.refusal == SLOT_UNAVAILABLE:
                picker.taken(slot)

    async def _mark_measure_start(self, measure_from: float) -> None:
        """Tells the parent (on stdout) when the measured window starts, so that it can read the
        CPU time of every process around exactly that window."""
        await asyncio.sleep(max(0.0, measure_from - asyncio.get_running_loop().time()))
        self._cpu_at_start = time.process_time()
        print(MEASURE_START, flush=True)

    async def _progress(self, started: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        label = f"{self.design}/{self.scenario}"
        last_done, last_time = 0, started
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            now = loop.time()
            done = self.warmup.finished + self.measured.finished
            booked = self.warmup.acknowledged + self.measured.acknowledged
            refused = sum(self.warmup.refused.values()) + sum(self.measured.refused.values())
            errors = sum(self.warmup.errors.values()) + sum(self.measured.errors.values())
            rate = (done - last_done) / max(1e-9, now - last_time)
            last_done, last_time = done, now
            if not self.quiet:
                print(
                    f"  {label:<20} {now - started:5.1f}/{end - started:.0f} s  done {done:7d}  booked {booked:7d}"
                    f"  {rate:8.1f} calls/s  refused {refused:6d}  errors {errors:4d}",
                    file=sys.stderr,
                    flush=True,
                )

    def _result(self, world: World, setup_s: float, measured_s: float) -> dict[str, Any]:
        measured, warmup = self.measured, self.warmup
        return {
            "design": self.design,
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "setup_s": round(setup_s, 3),
            "measured_s": round(measured_s, 3),
            "loadgen_cpu_s": round(self.cpu_measured_s, 3),
            "attempted": measured.attempted,
            "acknowledged": measured.acknowledged,
            "refused": dict(measured.refused),
            "errors": dict(measured.errors),
            "bookings_per_s": round(measured.acknowledged / measured_s, 2),
            "calls_per_s": round(measured.finished / measured_s, 2),
            "latency_booked_ms": percentiles_ms(measured.latencies_booked_s),
            "latency_all_ms": percentiles_ms(measured.latencies_all_s),
            "totals": {
                "attempted": measured.attempted + warmup.attempted,
                "acknowledged": measured.acknowledged + warmup.acknowledged,
                "acknowledged_paid": measured.paid + warmup.paid,
                "refused": dict(measured.refused + warmup.refused),
                "errors": dict(measured.errors + warmup.errors),
            },
            "world": {"therapist_ids": world.therapist_ids, "client_ids": world.client_ids},
            "booked_ids": self.booked_ids,
        }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--design", choices=DESIGNS, required=True)
    parser.add_argument("--scenario", choices=scenarios.SCENARIO_NAMES, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--booking-target", help="host:port of the booking service (services design)")
    parser.add_argument("--credit-target", help="host:port of the credit service (services design)")
    parser.add_argument("--database-url", help="the baseline's database (baseline design)")
    parser.add_argument("--token-key-file", type=Path, help="Ed25519 private key (PEM) the services trust")
    parser.add_argument("--token-issuer", default="therapy-booking-bench")
    parser.add_argument("--token-audience", default="therapy-booking")
    parser.add_argument("--result-file", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--handshake", action="store_true", help=f"after {MEASURE_END}, wait for a line on stdin before closing"
    )
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.concurrency <= 1024:
        parser.error("--concurrency must be between 1 and 1024")
    if not 0 < arguments.duration_s <= 3600 or not 0 <= arguments.warmup_s <= 600:
        parser.error("--duration-s must be in (0, 3600] and --warmup-s in [0, 600]")
    if arguments.design == "services" and not (
        arguments.booking_target and arguments.credit_target and arguments.token_key_file
    ):
        parser.error("the services design needs --booking-target, --credit-target and --token-key-file")
    if arguments.design == "baseline" and not arguments.database_url:
        parser.error("the baseline design needs --database-url")
    return arguments


async def main(arguments: argparse.Namespace) -> None:
    target: Target = (
        ServicesTarget(
            arguments.booking_target,
            arguments.credit_target,
            Tokens(arguments.token_key_file, arguments.token_issuer, arguments.token_audience),
        )
        if arguments.design == "services"
        else BaselineTarget(arguments.database_url, arguments.concurrency)
    )
    try:
        run = Run(
            target,
            arguments.design,
            arguments.scenario,
            arguments.concurrency,
            arguments.duration_s,
            arguments.warmup_s,
            arguments.seed,
            arguments.quiet,
            arguments.handshake,
        )
        result = await run.execute()
    finally:
        await target.close()
    arguments.result_file.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    uvloop.run(main(parse_arguments()))
