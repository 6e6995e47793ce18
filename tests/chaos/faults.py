"""The faults of a chaos run: planned from the seed, injected one after another, each counted.

Kinds (DESIGN.md's recovery promise is that none of them can lose or double a credit):
  * sigkill: SIGKILL of one service process (a booking or a credit replica), restarted after a
    moment on the same port and data;
  * credit_outage: every credit process stopped (SIGTERM) or frozen (SIGSTOP) for a few seconds;
  * connections_terminated: pg_terminate_backend on every connection to the two databases;
  * database_restart: a fast restart of the embedded PostgreSQL server (impossible on a server
    given by DATABASE_URL: the run says so and does not count it);
  * crash_point: a booking replica restarted with BOOKING_CRASH_POINTS set to one protocol step,
    which it dies at (exit 137) on its next booking; then restarted clean. A probe booking is sent
    straight to it, once and never retried, so the step is reached promptly. Two exposures: "open"
    (on its own port, where the clients' calls reach it too, and whichever booking gets there first
    dies with it, its client retrying elsewhere) and "probe-only" (on a port only the prober knows,
    so that the probe is certainly the booking that dies, and what it leaves behind has nobody to
    finish it but the system's own recovery: after "after_reserve", a hold with no decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from booking_service.config import CRASH_POINTS
from booking_service.service import CRASH_EXIT_CODE
from devstack.postgres import EmbeddedPostgres
from tests.support.processes import ProcessExited, Stack, is_running, wait_exit
from tests.support.stack import ServiceProcess, free_port

T = TypeVar("T")

# How long a killed process stays down before its restart, and an outage lasts.
DOWN_TIME_S = (0.2, 1.0)
OUTAGE_S = (2.0, 4.0)
# A crash-point replica that has not died this long after its probe is restarted clean anyway
# (the run then reports the point as not reached).
CRASH_WAIT_S = 10.0
PROBE_TIMEOUT_S = 15.0
# A restart that fails (the port was taken meanwhile, a slow start) is tried again a few times.
START_ATTEMPTS = 3
ADMIN_TIMEOUT_S = 10.0
# The gap the executor leaves between two faults at least, so that each one's effects show.
MIN_GAP_S = 0.5

_TERMINATE_SQL = """
SELECT count(pg_terminate_backend(pid))
  FROM pg_stat_activity
 WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid()
"""


class FaultKind(enum.StrEnum):
    SIGKILL = "sigkill"
    CREDIT_OUTAGE = "credit_outage"
    CONNECTIONS_TERMINATED = "connections_terminated"
    DATABASE_RESTART = "database_restart"
    CRASH_POINT = "crash_point"


class HarnessError(RuntimeError):
    """The harness itself could not go on (a process that will not start again): no verdict."""


@dataclass(frozen=True)
class PlannedFault:
    at_s: float  # seconds after the load started
    kind: FaultKind
    target: str  # a process name ("booking-0", "credit-1"), a crash point, or ""
    variant: str = ""  # credit outage: "stopped" or "frozen"; crash point: "open" or "probe-only"
    down_s: float = 0.0
    replica: int = 0  # crash point: which booking replica


@dataclass(frozen=True)
class FaultEvent:
    at_s: float
    kind: FaultKind
    detail: str
    took_s: float
    counted: bool  # False: planned but it could not happen (reported, not counted)


def plan_faults(
    mix: dict[FaultKind, int],
    crash_points: Sequence[str],
    crash_exposures: Sequence[str],
    window_s: tuple[float, float],
    rng: random.Random,
    process_names: Sequence[str],
    booking_replicas: int,
) -> list[PlannedFault]:
    """A seeded, shuffled plan spread evenly over the window, with some jitter."""
    assert set(crash_points) <= set(CRASH_POINTS), crash_points
    assert set(crash_exposures) <= {"open", "probe-only"}, crash_exposures
    kinds = [kind for kind, count in mix.items() for _ in range(count)]
    rng.shuffle(kinds)
    start_s, end_s = window_s
    step_s = (end_s - start_s) / max(1, len(kinds))
    plan: list[PlannedFault] = []
    crash_index = 0
    outages = 0
    for index, kind in enumerate(kinds):
        at_s = start_s + step_s * (index + rng.uniform(0.0, 0.5))
        if kind is FaultKind.SIGKILL:
            plan.append(PlannedFault(at_s, kind, rng.choice(process_names), down_s=rng.uniform(*DOWN_TIME_S)))
        elif kind is FaultKind.CREDIT_OUTAGE:
            variant = "stopped" if outages % 2 == 0 else "frozen"
            outages += 1
            plan.append(PlannedFault(at_s, kind, "credit", variant, down_s=rng.uniform(*OUTAGE_S)))
        elif kind is FaultKind.CRASH_POINT:
            point = crash_points[crash_index % len(crash_points)]
            exposure = crash_exposures[crash_index % len(crash_exposures)]
            crash_index += 1
            plan.append(PlannedFault(at_s, kind, point, exposure, replica=rng.randrange(booking_replicas)))
        else:
            plan.append(PlannedFault(at_s, kind, ""))
    return plan


async def uninterrupted(action: Callable[[], T]) -> T:
    """Runs a blocking start or stop in a thread to its end even if the run is cancelled
    meanwhile: a cancelled await would leave the thread going (an initdb, a pg_ctl) while the
    cleanup raced it; the cancellation is passed on once the action is done."""
    work = asyncio.ensure_future(asyncio.to_thread(action))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


@dataclass
class FaultInjector:
    """Carries out a plan against a running stack; `events` says what happened, when."""

    stack: Stack
    postgres: EmbeddedPostgres | None  # None: an external server, which cannot be restarted
    server_url: str
    database_names: tuple[str, str]
    probe: Callable[[int], Awaitable[None]]  # one booking sent straight to booking replica i
    log: Callable[[str], None]
    events: list[FaultEvent] = field(default_factory=list)
    crash_points_reached: Counter[str] = field(default_factory=Counter)
    crash_points_missed: Counter[str] = field(default_factory=Counter)
    terminated_backends: int = 0
    current: str = ""

    def processes(self) -> dict[str, ServiceProcess]:
        named = {f"booking-{i}": p for i, p in enumerate(self.stack.bookings)}
        named.update({f"credit-{i}": p for i, p in enumerate(self.stack.credits)})
        return named

    def counts(self) -> Counter[str]:
        return Counter(event.kind.value for event in self.events if event.counted)

    async def run(self, plan: Sequence[PlannedFault], started_at: float, stop_at: float) -> None:
        """Injects the planned faults in order, each at its time or as soon as the previous one
        is over; stops planning new ones at `stop_at` (loop time)."""
        loop = asyncio.get_running_loop()
        for fault in plan:
            wait_s = started_at + fault.at_s - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if loop.time() >= stop_at:
                self.log(f"fault plan cut short at its time limit: {len(plan) - len(self.events)} not injected")
                return
            await self.inject(fault, loop.time() - started_at)
            await asyncio.sleep(MIN_GAP_S)

    async def inject(self, fault: PlannedFault, at_s: float) -> None:
        began = time.monotonic()
        self.current = f"{fault.kind.value} {fault.target}".strip()
        try:
            detail, counted = await self._dispatch(fault)
        finally:
            self.current = ""
        event = FaultEvent(at_s, fault.kind, detail, time.monotonic() - began, counted)
        self.events.append(event)
        wall = datetime.now(UTC).strftime("%H:%M:%S")  # to find it in the processes' logs
        self.log(f"fault {len(self.events)} at {wall} UTC: {fault.kind.value} {detail} ({event.took_s:.1f} s)")

    async def _dispatch(self, fault: PlannedFault) -> tuple[str, bool]:
        if fault.kind is FaultKind.SIGKILL:
            return await self._sigkill(fault.target, fault.down_s), True
        if fault.kind is FaultKind.CREDIT_OUTAGE:
            return await self._credit_outage(fault.variant, fault.down_s), True
        if fault.kind is FaultKind.CONNECTIONS_TERMINATED:
            return await self._terminate_connections(), True
        if fault.kind is FaultKind.DATABASE_RESTART:
            return await self._database_restart()
        return await self._crash_point(fault.target, fault.replica, probe_only=fault.variant == "probe-only"), True

    async def _sigkill(self, name: str, down_s: float) -> str:
        process = self.processes()[name]
        code = await self.stack.kill(process)
        await asyncio.sleep(down_s)
        await self._start(process)
        return f"{name} (exit {code}, down {down_s:.1f} s)"

    async def _credit_outage(self, variant: str, down_s: float) -> str:
        credits = self.stack.credits
        if variant == "frozen":
            for process in credits:
                self.stack.freeze(process)
            try:
                await asyncio.sleep(down_s)
            finally:
                for process in credits:
                    self.stack.thaw(process)
        else:
            await asyncio.gather(*(self.stack.stop(p) for p in credits))
            await asyncio.sleep(down_s)
            await asyncio.gather(*(self._start(p) for p in credits))
        return f"{variant} {down_s:.1f} s"

    async def _terminate_connections(self) -> str:
        connection = await asyncpg.connect(self.server_url, timeout=ADMIN_TIMEOUT_S)
        try:
            terminated = await connection.fetchval(_TERMINATE_SQL, list(self.database_names), timeout=ADMIN_TIMEOUT_S)
        finally:
            await connection.close(timeout=ADMIN_TIMEOUT_S)
        self.terminated_backends += int(terminated)
        return f"{terminated} backends"

    async def _database_restart(self) -> tuple[str, bool]:
        if self.postgres is None:
            return "impossible: DATABASE_URL names a server this harness cannot restart", False
        await uninterrupted(self.postgres.restart)
        return "fast restart", True

    async def _crash_point(self, point: str, replica: int, *, probe_only: bool) -> str:
        process = self.stack.bookings[replica]
        public_port = process.port
        await self.stack.stop(process)
        armed: dict[str, str | None] = {"BOOKING_CRASH_POINTS": point}
        if probe_only:
            # The same replica (its data, its log), on a port only the prober knows, for a while.
            process.port = free_port()
            armed["BOOKING_GRPC_ADDRESS"] = process.address
        try:
            # It may reach the point before it says SERVING (its outbox or reconciler did).
            with contextlib.suppress(ProcessExited):
                await self.stack.start(process, armed)
            code = await self._probe_until_exit(process, replica)
        finally:
            if is_running(process):
                await self.stack.stop(process)
            process.port = public_port
        await self._start(process, {"BOOKING_CRASH_POINTS": None, "BOOKING_GRPC_ADDRESS": process.address})
        reached = code == CRASH_EXIT_CODE
        (self.crash_points_reached if reached else self.crash_points_missed)[point] += 1
        outcome = "reached (exit 137)" if reached else f"NOT reached (exit {code})"
        exposure = "probe-only" if probe_only else "open"
        return f"{point} on booking-{replica} ({exposure}): {outcome}"

    async def _probe_until_exit(self, process: ServiceProcess, replica: int) -> int | None:
        """Sends the probe and waits for the process to die; its exit code (None: still alive)."""
        probe = asyncio.ensure_future(self.probe(replica))
        try:
            return await wait_exit(process, timeout_s=CRASH_WAIT_S)
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(probe, PROBE_TIMEOUT_S)

    async def _start(self, process: ServiceProcess, env: dict[str, str | None] | None = None) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self.stack.start(process, env)
                return
            except (ProcessExited, TimeoutError) as error:
                if attempt == START_ATTEMPTS:
                    raise HarnessError(f"{process.module} on {process.address} did not start again: {error}") from error
                if is_running(process):
                    await self.stack.kill(process)
                await asyncio.sleep(0.5)

    async def restore(self) -> list[str]:
        """Every process running again with its crash points off; what had to be done for it."""
        done = []
        for process in self.stack.processes:
            self.stack.thaw(process)
            armed = "BOOKING_CRASH_POINTS" in process.env
            if armed and is_running(process):
                await self.stack.stop(process)
            if not is_running(process):
                await self._start(process, {"BOOKING_CRASH_POINTS": None})
                done.append(f"{process.module} on {process.address} restarted after the faults")
        return done
