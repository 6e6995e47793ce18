"""Background loops with bounds: every pass does a bounded batch, errors are logged, never fatal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from service_kit.server import Worker

log = structlog.get_logger()


def periodic(name: str, interval_s: float, step: Callable[[], Awaitable[bool]]) -> Worker:
    """A worker running `step` every `interval_s`; when `step` says more work is waiting (it
    filled its batch) the next pass starts at once. A failing pass is logged and retried later.
    """
    assert interval_s > 0

    async def run() -> None:
        while True:
            more_waiting = False
            try:
                more_waiting = await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker outlives a failed pass; the next one retries
                log.exception("worker_pass_failed", worker=name)
            await asyncio.sleep(0 if more_waiting else interval_s)

    run.__name__ = name
    return run
