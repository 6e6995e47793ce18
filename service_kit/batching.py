"""Coalescing concurrent calls into batches: one round trip, one transaction, for many callers.

A call to another service or to the database costs about the same CPU whether it carries one
item or fifty (docs/performance.md): gRPC's per-call machinery, a database round trip, a commit's
WAL flush. A `Coalescer` lets concurrent callers submit one item each and runs them together:
while a batch is in flight, new items queue; when it returns, the next batch takes what queued.
An idle coalescer sends an item at once, so a lone caller waits for nothing (no timer, no
linger). Under load batches grow by themselves, up to `max_batch_size`.

Each item has its own outcome: the batch function returns one result or one exception per item,
in order. An exception from the batch function as a whole is every item's outcome.

Bounds (TIGER_STYLE): at most `max_in_flight` batches run at once, each of at most
`max_batch_size` items, and at most `max_queued` items wait; past that, `submit` refuses at once
with `Overloaded` (UNAVAILABLE: retry later) rather than queue without end.

A caller that stops waiting (its deadline, a cancellation) leaves nothing behind: a queued item
whose caller is gone is dropped before its batch is sent; a batch in flight whose every caller is
gone is cancelled, as a lone call is cancelled with its caller; an item sent in a batch that
others still wait for runs to its end and its result is dropped, exactly as a call whose answer
is lost. So every batch function must be safe for that, which all of ours are: each item is
idempotent or recoverable (docs/architecture.md).

Batches run in tasks of their own, owned here and cancelled by `close`, in an empty context:
nothing of one caller (its request id, its deadline) leaks into a batch that serves many.

With tracing on (service_kit/tracing.py), each batch is a span of its own, linked to the span of
every caller it carries and a child of the first one's (so a lone caller's trace holds its whole
call, and every caller's trace leads to the batch); its calls to the database or the credit
service are its children. With tracing off no span context is read or kept: `tracer` is None.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog

from service_kit import config, tracing
from service_kit.errors import Unavailable

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

log = structlog.get_logger()

I = TypeVar("I")  # noqa: E741  # an item, as in the typing docs' own examples
R = TypeVar("R")

# Told of every batch: (coalescer name, items in it, seconds it took).
BatchObserver = Callable[[str, int, float], None]


@dataclass(frozen=True)
class BatchSettings:
    """The bounds of a service's coalescers (`*_BATCH_*` settings)."""

    max_batch_size: int = 64
    # One batch in flight per step: while it is out, the next one fills. Measured against two
    # (docs/performance.md): on a loaded machine two in flight means twice as many batches of
    # half the size, and 25 % fewer bookings per second. A batch never waits for a therapist's
    # lock (booking.decide_bookings), so one slow booking does not hold up the others.
    max_in_flight: int = 1
    max_queued: int = 2048

    def bounds(self) -> dict[str, int]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_in_flight": self.max_in_flight,
            "max_queued": self.max_queued,
        }

    @classmethod
    def from_environment(cls, env: Mapping[str, str], prefix: str) -> BatchSettings:
        """`<PREFIX>_BATCH_MAX_SIZE`, `<PREFIX>_BATCH_MAX_IN_FLIGHT`, `<PREFIX>_BATCH_MAX_QUEUED`."""
        size = config.integer(env, f"{prefix}_BATCH_MAX_SIZE", cls.max_batch_size, minimum=1, maximum=100)
        return cls(
            max_batch_size=size,
            max_in_flight=config.integer(
                env, f"{prefix}_BATCH_MAX_IN_FLIGHT", cls.max_in_flight, minimum=1, maximum=16
            ),
            max_queued=config.integer(env, f"{prefix}_BATCH_MAX_QUEUED", cls.max_queued, minimum=size, maximum=100_000),
        )


DEFAULT_BATCHING = BatchSettings()


class Overloaded(Unavailable):
    """More items wait than the coalescer's bound allows: retrying later may work."""

    reason = "SERVICE_OVERLOADED"


class Coalescer(Generic[I, R]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[I]], Awaitable[Sequence[R | Exception]]],
        *,
        max_batch_size: int,
        max_in_flight: int,
        max_queued: int,
        observer: BatchObserver | None = None,
    ) -> None:
        assert max_batch_size >= 1 and max_in_flight >= 1 and max_queued >= max_batch_size
        self.name = name
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self._observer = observer
        # The batches' spans: the process's tracer, None when tracing is off.
        self.tracer: Tracer | None = tracing.current().batch_tracer()
        # Each item with its caller's future and, when traced, its caller's span.
        self._queue: deque[tuple[I, asyncio.Future[R], SpanContext | None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: I) -> R:
        """The item's outcome, once the batch that carried it returns."""
        if self._closed:
            raise Unavailable("the service is shutting down; retry later", reason="SERVICE_STOPPING")
        if len(self._queue) >= self._max_queued:
            raise Overloaded(f"too much work waiting ({self.name}); retry later", metadata={"queue": self.name})
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        caller = tracing.current_span_context() if self.tracer is not None else None
        self._queue.append((item, future, caller))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while len(self._tasks) < self._max_in_flight and self._queue:
            batch = self._take_batch()
            if not batch:
                return
            # An empty context: the batch serves many callers, none of whose context is its own.
            task = asyncio.get_running_loop().create_task(
                self._run(batch), name=f"batch:{self.name}", context=contextvars.Context()
            )
            self._tasks.add(task)
            task.add_done_callback(self._finished)
            futures = [future for _, future, _ in batch]
            abandon = functools.partial(_abandon_if_unwanted, task, futures)
            for future in futures:
                future.add_done_callback(abandon)

    def _take_batch(self) -> list[tuple[I, asyncio.Future[R], SpanContext | None]]:
        batch: list[tuple[I, asyncio.Future[R], SpanContext | None]] = []
        while self._queue and len(batch) < self._max_batch_size:
            entry = self._queue.popleft()
            if not entry[1].done():  # done: its caller stopped waiting, nothing was sent
                batch.append(entry)
        return batch

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._closed:
            self._start_batches()

    async def _run(self, batch: list[tuple[I, asyncio.Future[R], SpanContext | None]]) -> None:
        if self.tracer is None:
            await self._run_untraced(batch)
            return
        with self.tracer.start_as_current_span(
            f"batch {self.name}",
            attributes={"batch.name": self.name, "batch.size": len(batch)},
            **tracing.batch_span_options([caller for _, _, caller in batch]),
        ):
            await self._run_untraced(batch)

    async def _run_untraced(self, batch: list[tuple[I, asyncio.Future[R], SpanContext | None]]) -> None:
        started_s = time.perf_counter()
        try:
            results = await self._run_batch([item for item, _, _ in batch])
            if len(results) != len(batch):
                # A bug, but one that must not leave the callers waiting: it becomes their error.
                raise AssertionError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as error:  # noqa: BLE001  # every item's outcome: each caller renders it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            if self._observer is not None:
                self._observer(self.name, len(batch), time.perf_counter() - started_s)
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Cancels the batches in flight and refuses what still waits; for shutdown."""
        self._closed = True
        while self._queue:
            _, future, _ = self._queue.popleft()
            if not future.done():
                future.set_exception(
                    Unavailable("the service is shutting down; retry later", reason="SERVICE_STOPPING")
                )
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a batch's own failure went to its callers already
                log.exception("batch_failed_at_close", coalescer=self.name)


def _abandon_if_unwanted(task: asyncio.Task[None], futures: list[asyncio.Future[R]], _: asyncio.Future[R]) -> None:
    """Cancels a batch in flight once every caller it serves has stopped waiting (each was
    cancelled, or its deadline passed), as a lone call is cancelled with its caller: the call to
    the other service or the database is cancelled rather than left to run for nobody."""
    if not task.done() and all(future.cancelled() for future in futures):
        task.cancel()
