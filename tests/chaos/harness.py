"""The chaos harness: a bank-style invariant test of the whole deployment under faults.

It starts real processes: its own embedded PostgreSQL (it restarts the database, so it never
uses a shared server), two credit replicas and two booking replicas (tests/support/processes.py).
Many concurrent clients (workload.py) then grant, book (some on the same slots), cancel and
reschedule with request ids, retrying as real clients do, while a seeded scheduler (faults.py)
kills processes, stops the credit service, terminates database connections, restarts the
database and makes booking replicas die at the protocol's crash points. When the faults stop,
the clients finish, the system's own recovery (reconciler, outbox) gets a bounded time to
settle, and then every invariant (invariants.py) is checked from outside with SQL.

`run_chaos` returns a `ChaosReport`; `ChaosReport.render()` is the summary: operations tried,
acknowledged, refused by reason, unknown; faults by kind; each invariant with its result; the
seed to replay the run. Everything is bounded: the load, the fault plan, the settling, every
call; every process (and the database) is stopped at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import shutil
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import asyncpg

from booking_service.config import CRASH_POINTS
from devstack.postgres import EmbeddedPostgres, server_url_from_environment
from tests.chaos import invariants
from tests.chaos.faults import FaultInjector, FaultKind, HarnessError, PlannedFault, plan_faults, uninterrupted
from tests.chaos.invariants import InvariantResult
from tests.chaos.workload import (
    CREDIT_COST,
    INITIAL_CREDITS,
    SESSION_MINUTES,
    Calendar,
    Client,
    ClientRecord,
    Tally,
    Therapist,
    attempts_for,
)
from tests.support.processes import Stack, is_running, log_events, running_stack
from tests.support.world import World

T = TypeVar("T")

# The booking replicas resolve a stale hold within about two and a half seconds (older than 2 s,
# looked for every 0.3 s), deliver the outbox every 0.2 s, give up on a credit call after 1.5 s
# and re-lease an outbox event a killed replica had taken after 5 s rather than 30.
RECONCILE_AFTER_S = 2.0
BOOKING_ENV: dict[str, str | None] = {
    "BOOKING_RECONCILE_AFTER_S": str(RECONCILE_AFTER_S),
    "BOOKING_RECONCILE_INTERVAL_S": "0.3",
    "BOOKING_OUTBOX_INTERVAL_S": "0.2",
    "BOOKING_OUTBOX_LEASE_S": "5",
    "BOOKING_CREDIT_CALL_TIMEOUT_S": "1.5",
    "BOOKING_DATABASE_COMMAND_TIMEOUT_S": "5",
}
CREDIT_ENV: dict[str, str | None] = {"CREDIT_DATABASE_COMMAND_TIMEOUT_S": "5"}
BOOKING_REPLICAS = 2
CREDIT_REPLICAS = 2
THERAPISTS = 3
# The prober: the fault injector's own client, which books once on a crash-point replica and
# walks away; funded for every probe of the longest plan.
PROBER_CREDITS = 1000
# How much after the planned load the clients may go on to let the fault plan finish.
FAULT_OVERRUN_S = 45.0
WARMUP_S = 3.0
FAULT_TAIL_S = 5.0
SETTLE_POLL_S = 0.5
CHECK_ATTEMPTS = 5
# Answered booking requests sent again after the run, so many at a time.
ASK_AGAIN_CONCURRENCY = 8
SHOWN_VIOLATIONS = 5

_UNSETTLED_SQL = {
    "credit": "SELECT count(*) FROM credit.reservations WHERE status = 'pending'",
    "booking": "SELECT count(*) FROM booking.sessions WHERE payment_status IN ('committing', 'refunding')",
}


@dataclass(frozen=True)
class ChaosConfig:
    mode: str  # quick, full, broken
    seed: int
    load_s: float
    clients: int
    fault_mix: dict[FaultKind, int]
    crash_points: tuple[str, ...]
    crash_exposures: tuple[str, ...]  # cycled over the crash points: "open", "probe-only"
    settle_timeout_s: float
    # A hold still PENDING this long after it was made is a violation.
    hold_bound_s: float
    minimum_operations: int
    minimum_sigkills: int
    minimum_database_restarts: int
    reconciler_enabled: bool = True
    progress_interval_s: float = 5.0

    @classmethod
    def quick(cls, seed: int) -> ChaosConfig:
        """Bounded for CI: about two and a half minutes on two cores, all told."""
        return cls(
            mode="quick",
            seed=seed,
            load_s=90.0,
            clients=12,
            fault_mix={
                FaultKind.SIGKILL: 12,
                FaultKind.CREDIT_OUTAGE: 1,
                FaultKind.CONNECTIONS_TERMINATED: 2,
                FaultKind.DATABASE_RESTART: 1,
                FaultKind.CRASH_POINT: 3,
            },
            crash_points=CRASH_POINTS,
            crash_exposures=("probe-only", "open"),
            settle_timeout_s=45.0,
            hold_bound_s=RECONCILE_AFTER_S + 8.0,
            minimum_operations=500,
            minimum_sigkills=10,
            minimum_database_restarts=1,
        )

    @classmethod
    def full(cls, seed: int) -> ChaosConfig:
        """`make chaos`: five minutes of load, more clients, about three times the faults."""
        return cls(
            mode="full",
            seed=seed,
            load_s=300.0,
            clients=24,
            fault_mix={
                FaultKind.SIGKILL: 30,
                FaultKind.CREDIT_OUTAGE: 4,
                FaultKind.CONNECTIONS_TERMINATED: 6,
                FaultKind.DATABASE_RESTART: 4,
                FaultKind.CRASH_POINT: 9,
            },
            crash_points=CRASH_POINTS,
            crash_exposures=("probe-only", "open"),
            settle_timeout_s=60.0,
            hold_bound_s=RECONCILE_AFTER_S + 8.0,
            minimum_operations=1500,
            minimum_sigkills=25,
            minimum_database_restarts=3,
        )

    @classmethod
    def broken(cls, seed: int) -> ChaosConfig:
        """The deliberately broken build: booking replicas without their reconciler, and a short
        load whose crash points (after reserve, with a prober that never retries) leave holds
        that only the reconciler would release. The run must FAIL, naming that invariant."""
        return cls(
            mode="broken",
            seed=seed,
            load_s=20.0,
            clients=6,
            fault_mix={FaultKind.CRASH_POINT: 2, FaultKind.SIGKILL: 1},
            crash_points=("after_reserve",),
            crash_exposures=("probe-only",),
            settle_timeout_s=8.0,
            hold_bound_s=RECONCILE_AFTER_S + 6.0,
            minimum_operations=0,
            minimum_sigkills=0,
            minimum_database_restarts=0,
            reconciler_enabled=False,
        )

    @property
    def replay(self) -> str:
        flags = {"quick": " --quick", "full": "", "broken": " --no-reconciler"}[self.mode]
        return f"python -m tests.chaos{flags} --seed {self.seed} --duration-s {self.load_s:g} --clients {self.clients}"


@dataclass(frozen=True)
class Minimum:
    name: str
    required: int
    achieved: int
    note: str = ""

    @property
    def met(self) -> bool:
        return self.achieved >= self.required and not self.note


@dataclass
class ChaosReport:
    config: ChaosConfig
    tally: Tally
    faults: FaultInjector | None = None
    invariants: list[InvariantResult] = field(default_factory=list)
    minimums: list[Minimum] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unknown_bookings: str = ""
    # Error-level lines of the service processes (INTERNAL answers, failed worker passes), counted
    # by kind: not an invariant, but each is an error path the faults reached.
    server_errors: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    log_dir: Path | None = None

    @property
    def violated(self) -> list[str]:
        return [result.name for result in self.invariants if not result.passed]

    @property
    def passed(self) -> bool:
        checked = bool(self.invariants)
        return self.error is None and checked and not self.violated and all(m.met for m in self.minimums)

    def failure_reasons(self) -> list[str]:
        reasons = []
        if self.error is not None:
            reasons.append(f"harness error: {self.error}")
        if not self.invariants and self.error is None:
            reasons.append("no invariant was checked")
        reasons.extend(f"invariant violated: {name}" for name in self.violated)
        reasons.extend(
            f"minimum not met: {m.name} {m.achieved} < {m.required}{f' ({m.note})' if m.note else ''}"
            for m in self.minimums
            if not m.met
        )
        return reasons

    def render(self) -> str:
        return "\n".join(_render(self))


def _render(report: ChaosReport) -> Iterator[str]:
    config, tally = report.config, report.tally
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.timings_s.items())
    yield f"=== chaos summary: {config.mode} mode, seed {config.seed} ({timings}) ==="
    reconciler = "on" if config.reconciler_enabled else "OFF (deliberately broken build)"
    yield (
        f"setup: {BOOKING_REPLICAS} booking + {CREDIT_REPLICAS} credit replicas, {config.clients} clients, "
        f"reconciler {reconciler}"
    )
    acknowledged, refused, unknown = (sum(c.values()) for c in (tally.acknowledged, tally.refused, tally.unknown))
    yield (
        f"operations: tried {tally.total_tried}, acknowledged {acknowledged}, refused {refused}, "
        f"unknown outcome {unknown}"
    )
    for operation in sorted(tally.tried):
        yield (
            f"  {operation:<11} tried {tally.tried[operation]:>5}  acknowledged {tally.acknowledged[operation]:>5}  "
            f"refused {tally.refused_by_operation[operation]:>4}  unknown {tally.unknown_by_operation[operation]:>4}"
        )
    yield f"  retried requests {tally.retried_requests} ({tally.retry_attempts} retries with the same request id)"
    yield "  refused by reason: " + (_counts(tally.refused) or "none")
    yield "  unknown outcome by last error: " + (_counts(tally.unknown) or "none")
    yield f"  unanswered booking requests, afterwards: {report.unknown_bookings or 'not checked'}"
    yield from _render_faults(report)
    yield f"server errors logged: {sum(report.server_errors.values())}" + ("" if report.server_errors else " (none)")
    for line, count in report.server_errors.most_common(SHOWN_VIOLATIONS):
        yield f"  {count:>4} x {line}"
    if report.minimums:
        yield "minimums:"
        for m in report.minimums:
            status = "MET" if m.met else "NOT MET"
            yield f"  {status:<7} {m.name}: {m.achieved} (at least {m.required}){f' - {m.note}' if m.note else ''}"
    yield from _render_invariants(report.invariants)
    for note in report.notes:
        yield f"note: {note}"
    if report.error is not None:
        yield f"HARNESS ERROR: {report.error}"
    if report.passed:
        yield f"RESULT: PASS (seed {config.seed})"
    else:
        yield f"RESULT: FAIL (seed {config.seed}): " + "; ".join(report.failure_reasons())
    if report.log_dir is not None:
        yield f"process logs kept in {report.log_dir}"
    yield f"replay: {config.replay}  (the same seed replays the fault plan and every client's choices; timing differs)"


def _render_invariants(results: list[InvariantResult]) -> Iterator[str]:
    yield "invariants:"
    if not results:
        yield "  not checked"
    for result in results:
        yield f"  {'PASS' if result.passed else 'FAIL'} {result.name}: {result.description} [{result.checked}]"
        for violation in result.violations[:SHOWN_VIOLATIONS]:
            yield f"         - {violation}"
        if len(result.violations) > SHOWN_VIOLATIONS:
            yield f"         ... and {len(result.violations) - SHOWN_VIOLATIONS} more"


def _render_faults(report: ChaosReport) -> Iterator[str]:
    injector = report.faults
    if injector is None:
        yield "faults: none injected"
        return
    counts = injector.counts()
    yield f"faults: {sum(counts.values())} injected"
    details: dict[str, str] = {}
    kills = Counter(e.detail.split(" ", 1)[0] for e in injector.events if e.kind is FaultKind.SIGKILL)
    details[FaultKind.SIGKILL] = _counts(kills)
    outages = Counter(e.detail.split(" ", 1)[0] for e in injector.events if e.kind is FaultKind.CREDIT_OUTAGE)
    details[FaultKind.CREDIT_OUTAGE] = _counts(outages)
    details[FaultKind.CONNECTIONS_TERMINATED] = f"{injector.terminated_backends} backends"
    restarts = [e for e in injector.events if e.kind is FaultKind.DATABASE_RESTART]
    details[FaultKind.DATABASE_RESTART] = ", ".join(f"{e.took_s:.1f} s" if e.counted else e.detail for e in restarts)
    reached = _counts(injector.crash_points_reached)
    missed = _counts(injector.crash_points_missed)
    details[FaultKind.CRASH_POINT] = f"reached: {reached or 'none'}" + (f"; not reached: {missed}" if missed else "")
    for kind in FaultKind:
        yield f"  {kind.value:<23} {counts[kind.value]:>3}  ({details[kind] or '-'})"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common())


# --- running ---


class _Cleanup:
    """What must be stopped however the run ends, even from a signal handler or `finally` in
    the CLI after the event loop is gone: the service processes and the embedded database."""

    def __init__(self) -> None:
        self.stack: Stack | None = None
        self.postgres: EmbeddedPostgres | None = None

    def now(self) -> None:
        if self.stack is not None:
            for process in self.stack.processes:
                with contextlib.suppress(Exception):
                    self.stack.thaw(process)
                    process.kill()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                self.postgres.stop()


CLEANUP = _Cleanup()


async def run_chaos(
    config: ChaosConfig, progress: Callable[[str], None] = print, *, keep_logs: bool = False
) -> ChaosReport:
    """One whole run; never raises for what it finds (see the report), only for cancellation.
    The processes' logs are kept (their folder named in the report) when the run fails, or always
    with `keep_logs`."""
    report = ChaosReport(config, Tally())
    began = time.monotonic()
    # The harness's own observer pools log a traceback each time they fail to reconnect while the
    # database restarts: expected here, and noise in the progress output.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    work_dir = Path(tempfile.mkdtemp(prefix="therapy-chaos-"))
    external = server_url_from_environment(os.environ)
    postgres = None if external is not None else EmbeddedPostgres(work_dir / "pg" / "data")
    CLEANUP.postgres = postgres
    interrupted = False
    try:
        if postgres is not None:
            progress(f"starting embedded PostgreSQL in {postgres.data_dir}")
            server_url = await uninterrupted(postgres.start)
        else:
            assert external is not None
            server_url = external
            report.notes.append(
                "DATABASE_URL is set: the run used that server, which it cannot restart; the database-restart "
                "fault did not happen and its minimum is not met"
            )
        await _run_on(server_url, postgres, work_dir / "logs", config, report, progress)
    except HarnessError as error:
        report.error = str(error)
    except Exception as error:  # noqa: BLE001  # a harness bug still ends with a summary and a verdict
        report.error = f"{error!r}\n{traceback.format_exc()}"
    except asyncio.CancelledError:
        interrupted = True  # nobody will read a summary: keep nothing unless asked to
        raise
    finally:
        report.timings_s["total"] = time.monotonic() - began
        if postgres is not None:
            try:
                await uninterrupted(postgres.stop)
                CLEANUP.postgres = None
            except Exception as error:  # noqa: BLE001  # reported; the CLI's last resort tries again
                report.error = report.error or f"the embedded PostgreSQL did not stop: {error}"
        if CLEANUP.postgres is None:  # never remove the data of a server still running
            shutil.rmtree(work_dir / "pg", ignore_errors=True)
        if (report.passed or interrupted) and not keep_logs and CLEANUP.postgres is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            report.log_dir = work_dir / "logs"
    return report


async def _run_on(
    server_url: str,
    postgres: EmbeddedPostgres | None,
    log_dir: Path,
    config: ChaosConfig,
    report: ChaosReport,
    progress: Callable[[str], None],
) -> None:
    booking_env = {**BOOKING_ENV, "BOOKING_RECONCILER_ENABLED": "true" if config.reconciler_enabled else "false"}
    started = time.monotonic()
    async with running_stack(
        server_url,
        log_dir,
        booking_replicas=BOOKING_REPLICAS,
        credit_replicas=CREDIT_REPLICAS,
        booking_env=booking_env,
        credit_env=CREDIT_ENV,
    ) as stack:
        CLEANUP.stack = stack
        report.timings_s["start"] = time.monotonic() - started
        await _exercise(stack, server_url, postgres, config, report, progress)
    CLEANUP.stack = None  # only once the stack ended every process; else the last resort does


async def _exercise(
    stack: Stack,
    server_url: str,
    postgres: EmbeddedPostgres | None,
    config: ChaosConfig,
    report: ChaosReport,
    progress: Callable[[str], None],
) -> None:
    master = random.Random(config.seed)
    calendar = await _calendar(stack)
    clients = await _clients(stack, calendar, config, master, report.tally)
    prober = Client(
        ClientRecord(str(uuid.uuid4()), attempts_per_request=1),
        random.Random(master.random()),
        stack.booking_stub(),
        stack.credit_stub(),
        calendar,
        report.tally,
    )
    await prober.grant(PROBER_CREDITS)
    records = [c.record for c in clients] + [prober.record]

    probes = itertools.count()

    async def probe(replica: int) -> None:
        therapist, start = calendar.probe_slot(next(probes))
        await prober.book(therapist, start, via=stack.booking_stub(replica))

    injector = FaultInjector(
        stack=stack,
        postgres=postgres,
        server_url=server_url,
        database_names=(_database_name(stack.credit_database_url), _database_name(stack.booking_database_url)),
        probe=probe,
        log=progress,
    )
    report.faults = injector
    names = [f"booking-{i}" for i in range(BOOKING_REPLICAS)] + [f"credit-{i}" for i in range(CREDIT_REPLICAS)]
    plan = plan_faults(
        config.fault_mix,
        config.crash_points,
        config.crash_exposures,
        (WARMUP_S, max(WARMUP_S + 1.0, config.load_s - FAULT_TAIL_S)),
        random.Random(master.random()),
        names,
        BOOKING_REPLICAS,
    )
    progress(f"load: {config.clients} clients for {config.load_s:g} s, {len(plan)} faults planned (seed {config.seed})")
    await _load(stack, clients, injector, plan, config, report, progress)

    for line in await injector.restore():
        report.notes.append(line)
    settle_began = time.monotonic()
    settled = await _settle(stack, config.settle_timeout_s)
    report.timings_s["settle"] = time.monotonic() - settle_began
    if settled:
        report.notes.append(f"settled in {report.timings_s['settle']:.1f} s: no hold pending, no payment in flight")
    else:
        report.notes.append(f"did NOT settle within {config.settle_timeout_s:g} s: {await _unsettled(stack)}")
    asked_again = await _ask_again([*clients, prober])
    snapshot = await _with_retries(lambda: invariants.read_snapshot(stack.credit_db, stack.booking_db))
    report.invariants = [
        *invariants.check_all(snapshot, records, config.hold_bound_s),
        invariants.answers_stand(records, asked_again),
    ]
    report.unknown_bookings = invariants.unknown_outcomes(snapshot, records)
    report.minimums = _minimums(config, report, injector, postgres is not None)
    report.server_errors = _server_errors(stack)


async def _ask_again(clients: list[Client]) -> dict[str, str]:
    """Every answered booking request sent once more, once the run has settled: request id -> the
    answer (a request has one answer, so it must be the one the client got)."""
    gate = asyncio.Semaphore(ASK_AGAIN_CONCURRENCY)

    async def ask(client: Client, request_id: str) -> tuple[str, str]:
        async with gate:
            return request_id, await client.ask_again(client.record.answered_requests[request_id])

    asked = [ask(client, request_id) for client in clients for request_id in client.record.answered_requests]
    return dict(await asyncio.gather(*asked))


async def _calendar(stack: Stack) -> Calendar:
    therapists = []
    for index in range(THERAPISTS):
        world = await World.create(
            stack.booking_stub(index % BOOKING_REPLICAS),
            stack.credit_stub(),
            credits=0,
            credit_cost=CREDIT_COST,
            duration_minutes=SESSION_MINUTES,
        )
        therapists.append(Therapist(world.therapist_id, world.session_type_id))
    return Calendar.starting_now(tuple(therapists))


async def _clients(
    stack: Stack, calendar: Calendar, config: ChaosConfig, master: random.Random, tally: Tally
) -> list[Client]:
    clients = []
    for _ in range(config.clients):
        rng = random.Random(master.random())
        record = ClientRecord(str(uuid.UUID(int=rng.getrandbits(128), version=4)), attempts_for(rng))
        clients.append(Client(record, rng, stack.booking_stub(), stack.credit_stub(), calendar, tally))
    await asyncio.gather(*(client.grant(INITIAL_CREDITS) for client in clients))
    return clients


def _database_name(url: str) -> str:
    return url.split("?", 1)[0].rsplit("/", 1)[1]


async def _load(
    stack: Stack,
    clients: list[Client],
    injector: FaultInjector,
    plan: list[PlannedFault],
    config: ChaosConfig,
    report: ChaosReport,
    progress: Callable[[str], None],
) -> None:
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    hard_stop_at = started_at + config.load_s + FAULT_OVERRUN_S
    faults = asyncio.ensure_future(injector.run(plan, started_at, hard_stop_at))

    def keep_going() -> bool:
        now = loop.time()
        if now >= hard_stop_at:
            return False
        enough_operations = report.tally.total_tried >= config.minimum_operations
        return now < started_at + config.load_s or not faults.done() or not enough_operations

    reporter = asyncio.ensure_future(_report_progress(stack, injector, report.tally, started_at, config, progress))
    workers = [asyncio.ensure_future(client.run(keep_going)) for client in clients]
    try:
        await asyncio.gather(faults, *workers)
    finally:
        for task in (faults, *workers):
            task.cancel()
        await asyncio.gather(faults, *workers, return_exceptions=True)
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    report.timings_s["load"] = loop.time() - started_at
    progress(f"load over after {report.timings_s['load']:.1f} s: {report.tally.line()}")


async def _report_progress(
    stack: Stack,
    injector: FaultInjector,
    tally: Tally,
    started_at: float,
    config: ChaosConfig,
    progress: Callable[[str], None],
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(config.progress_interval_s)
        up = sum(is_running(p) for p in stack.processes)
        counts = injector.counts()
        faults = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet"
        busy = f" | now: {injector.current}" if injector.current else ""
        progress(
            f"[{loop.time() - started_at:6.1f} s] {tally.line()} | faults {sum(counts.values())}: {faults} | "
            f"processes up {up}/{len(stack.processes)}{busy}"
        )


async def _unsettled(stack: Stack) -> str:
    credit = await stack.credit_db.fetchval(_UNSETTLED_SQL["credit"])
    booking = await stack.booking_db.fetchval(_UNSETTLED_SQL["booking"])
    return f"{credit} holds pending, {booking} sessions with a payment in flight"


async def _settle(stack: Stack, timeout_s: float) -> bool:
    """Until no hold is PENDING and no payment is in flight (the reconciler and the outbox did
    their work), or the timeout: False then, and the invariants say what was left."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(*_TRANSIENT):
            credit = await stack.credit_db.fetchval(_UNSETTLED_SQL["credit"])
            booking = await stack.booking_db.fetchval(_UNSETTLED_SQL["booking"])
            if credit == 0 and booking == 0:
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(SETTLE_POLL_S)


_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


async def _with_retries(read: Callable[[], Awaitable[T]]) -> T:
    """A read after the faults, retried a few times should a connection still be broken."""
    for attempt in range(1, CHECK_ATTEMPTS + 1):
        try:
            return await read()
        except _TRANSIENT:
            if attempt == CHECK_ATTEMPTS:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


def _server_errors(stack: Stack) -> Counter[str]:
    found: Counter[str] = Counter()
    for process in stack.processes:
        for event in log_events(process):
            if event.get("level") not in ("error", "critical") or event.get("event") == "rpc_finished":
                continue  # rpc_finished repeats the error line that explains it
            exception = str(event.get("exception", "")).strip().splitlines()
            where = f" in {event['rpc']}" if "rpc" in event else ""
            cause = f": {exception[-1]}" if exception else ""
            found[f"{process.module} {event.get('event')}{where}{cause}"] += 1
    return found


def _minimums(config: ChaosConfig, report: ChaosReport, injector: FaultInjector, restartable: bool) -> list[Minimum]:
    counts = injector.counts()
    restart_note = "" if restartable or not config.minimum_database_restarts else "impossible: DATABASE_URL is set"
    points = set(config.crash_points) if config.fault_mix.get(FaultKind.CRASH_POINT) else set()
    return [
        Minimum("operations", config.minimum_operations, report.tally.total_tried),
        Minimum("crash points reached (distinct)", len(points), len(points & set(injector.crash_points_reached))),
        Minimum("sigkills", config.minimum_sigkills, counts[FaultKind.SIGKILL.value]),
        Minimum(
            "database restarts",
            config.minimum_database_restarts,
            counts[FaultKind.DATABASE_RESTART.value],
            restart_note,
        ),
    ]


def with_overrides(config: ChaosConfig, *, load_s: float | None, clients: int | None) -> ChaosConfig:
    return replace(
        config,
        load_s=config.load_s if load_s is None else load_s,
        clients=config.clients if clients is None else clients,
    )
