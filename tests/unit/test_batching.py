"""The coalescer (service_kit/batching.py): batching, outcomes per item, bounds, cancellation."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service_kit.batching import BatchSettings, Coalescer, Overloaded
from service_kit.config import ConfigError
from service_kit.errors import Unavailable

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


class Recorder:
    """A batch function that records what it was sent and waits until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.contexts: list[str | None] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.contexts.append(_caller.get())
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [ValueError(f"odd {item}") if item % 2 else item * 10 for item in items]


def coalescer(run: Recorder, *, size: int = 4, in_flight: int = 1, queued: int = 8) -> Coalescer[int, int]:
    return Coalescer("test", run, max_batch_size=size, max_in_flight=in_flight, max_queued=queued)


async def test_a_lone_item_goes_at_once_and_concurrent_ones_ride_together() -> None:
    run = Recorder()
    batches = coalescer(run, size=3)
    first = asyncio.ensure_future(batches.submit(0))
    await run.started.wait()  # sent alone, without waiting for company
    rest = [asyncio.ensure_future(batches.submit(n)) for n in (2, 4, 6, 8)]
    await asyncio.sleep(0)
    assert run.batches == [[0]] and batches.queued == 4
    run.release.set()
    assert await asyncio.gather(first, *rest) == [0, 20, 40, 60, 80]
    # What queued behind the first batch went in batches of at most three, in order.
    assert run.batches == [[0], [2, 4, 6], [8]]


async def test_each_item_gets_its_own_outcome_and_a_batch_failure_reaches_all() -> None:
    run = Recorder()
    run.release.set()
    batches = coalescer(run)
    outcomes = await asyncio.gather(*(batches.submit(n) for n in (2, 3, 4)), return_exceptions=True)
    assert outcomes[0] == 20 and outcomes[2] == 40
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "odd 3"

    async def broken(items: Sequence[int]) -> list[int | Exception]:
        raise ConnectionError("the database went away")

    failing: Coalescer[int, int] = Coalescer("broken", broken, max_batch_size=4, max_in_flight=1, max_queued=8)
    outcomes = await asyncio.gather(*(failing.submit(n) for n in (1, 2)), return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)


async def test_a_caller_that_stops_waiting_is_not_sent_and_a_batch_nobody_waits_for_is_cancelled() -> None:
    run = Recorder()
    batches = coalescer(run)
    first = asyncio.ensure_future(batches.submit(0))
    await run.started.wait()
    gone = asyncio.ensure_future(batches.submit(2))
    kept = asyncio.ensure_future(batches.submit(4))
    await asyncio.sleep(0)
    gone.cancel()  # it waits in the queue: it must never reach the batch function
    first.cancel()  # the only caller of the batch in flight: that batch is cancelled
    await asyncio.sleep(0.01)
    assert run.cancelled == 1
    run.release.set()
    assert await kept == 40
    assert run.batches == [[0], [4]]


async def test_a_batch_still_wanted_by_one_caller_runs_on() -> None:
    run = Recorder()
    batches = coalescer(run)
    first = asyncio.ensure_future(batches.submit(0))
    await run.started.wait()
    waiting = [asyncio.ensure_future(batches.submit(n)) for n in (2, 4)]
    run.release.set()
    await first
    run.release.clear()
    run.started.clear()
    await run.started.wait()  # the batch [2, 4] is in flight
    waiting[0].cancel()
    await asyncio.sleep(0.01)
    assert run.cancelled == 0
    run.release.set()
    assert await waiting[1] == 40


async def test_the_queue_is_bounded() -> None:
    run = Recorder()
    batches = coalescer(run, size=2, queued=2)
    first = asyncio.ensure_future(batches.submit(0))
    await run.started.wait()
    queued = [asyncio.ensure_future(batches.submit(n)) for n in (2, 4)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        await batches.submit(6)
    assert refused.value.reason == "SERVICE_OVERLOADED"
    run.release.set()
    assert await asyncio.gather(first, *queued) == [0, 20, 40]


async def test_batches_in_flight_are_bounded() -> None:
    run = Recorder()
    batches = coalescer(run, size=1, in_flight=2)
    calls = [asyncio.ensure_future(batches.submit(n)) for n in (0, 2, 4)]
    await asyncio.sleep(0.01)
    assert run.batches == [[0], [2]]
    run.release.set()
    assert await asyncio.gather(*calls) == [0, 20, 40]


async def test_a_batch_runs_in_no_callers_context() -> None:
    run = Recorder()
    run.release.set()
    batches = coalescer(run)
    _caller.set("request-1")
    assert await batches.submit(2) == 20
    assert run.contexts == [None]


async def test_close_refuses_what_waits_and_cancels_what_runs() -> None:
    run = Recorder()
    batches = coalescer(run)
    running = asyncio.ensure_future(batches.submit(0))
    await run.started.wait()
    waiting = asyncio.ensure_future(batches.submit(2))
    await asyncio.sleep(0)
    await batches.close()
    with pytest.raises(Unavailable):
        await waiting
    with pytest.raises(asyncio.CancelledError):
        await running
    assert run.cancelled == 1
    with pytest.raises(Unavailable):
        await batches.submit(4)


def test_settings_are_read_with_bounds() -> None:
    assert BatchSettings.from_environment({}, "BOOKING") == BatchSettings()
    env = {"BOOKING_BATCH_MAX_SIZE": "8", "BOOKING_BATCH_MAX_IN_FLIGHT": "2", "BOOKING_BATCH_MAX_QUEUED": "64"}
    assert BatchSettings.from_environment(env, "BOOKING") == BatchSettings(8, 2, 64)
    with pytest.raises(ConfigError, match="BOOKING_BATCH_MAX_SIZE"):
        BatchSettings.from_environment({"BOOKING_BATCH_MAX_SIZE": "0"}, "BOOKING")
    with pytest.raises(ConfigError, match="BOOKING_BATCH_MAX_QUEUED"):
        BatchSettings.from_environment({"BOOKING_BATCH_MAX_SIZE": "50", "BOOKING_BATCH_MAX_QUEUED": "10"}, "BOOKING")


async def test_a_batch_function_that_answers_the_wrong_number_of_items_fails_its_callers() -> None:
    async def short(items: Sequence[int]) -> list[int | Exception]:
        return [1]

    batches: Coalescer[int, int] = Coalescer("short", short, max_batch_size=4, max_in_flight=1, max_queued=8)
    first = asyncio.ensure_future(batches.submit(1))
    rest = [asyncio.ensure_future(batches.submit(n)) for n in (2, 3)]
    assert await first == 1  # alone, one answer is the right number
    outcomes = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), timeout=5)
    assert all(isinstance(outcome, AssertionError) for outcome in outcomes)


async def test_untraced_batches_keep_no_span_context() -> None:
    # Tracing off (this process never installs it): nothing is read or kept per item.
    run = Recorder()
    batcher = coalescer(run)
    assert batcher.tracer is None
    first = asyncio.create_task(batcher.submit(2))
    await run.started.wait()
    second = asyncio.create_task(batcher.submit(4))
    await asyncio.sleep(0)
    assert [caller for _, _, caller in batcher._queue] == [None]
    run.release.set()
    assert list(await asyncio.gather(first, second)) == [20, 40]


async def test_a_traced_batch_is_linked_to_every_caller_and_a_child_of_the_first() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    run = Recorder()
    batcher = coalescer(run)
    batcher.tracer = tracer
    blocker = asyncio.create_task(batcher.submit(0))  # keeps the next two waiting together
    await run.started.wait()

    async def caller(item: int, name: str) -> tuple[int, int]:
        with tracer.start_as_current_span(name) as span:
            result = await batcher.submit(item)
            return result, span.get_span_context().span_id

    callers = [asyncio.create_task(caller(2, "first")), asyncio.create_task(caller(4, "second"))]
    await asyncio.sleep(0)
    run.release.set()
    results = await asyncio.gather(*callers)
    await blocker
    assert [result for result, _ in results] == [20, 40]
    (batch,) = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "batch test" and (s.attributes or {}).get("batch.size") == 2
    ]
    caller_ids = [span_id for _, span_id in results]
    assert [link.context.span_id for link in batch.links] == caller_ids
    assert batch.parent is not None and batch.parent.span_id == caller_ids[0]
