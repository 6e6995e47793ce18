"""Background loops with bounds: every pass does a bounded batch, errors are logged, never fatal.

A pass that fails because a dependency is away (the database restarting, a connection the server
terminated, a timeout, an UNAVAILABLE from another service) is an outage, not a bug: the first
such failure is logged once at warning with its reason, the passes after it quietly retry, and
only an outage that lasts `PERSISTENT_OUTAGE_S` is logged again, at error, once; the first pass
that works again logs `worker_recovered`. Any other failure is a bug and logged with its
traceback at every pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from service_kit.errors import Unavailable
from service_kit.interceptor import DATABASE_UNAVAILABLE_ERRORS
from service_kit.server import Worker

log = structlog.get_logger()

# An outage longer than a CloudNativePG failover (tens of seconds) needs a person.
PERSISTENT_OUTAGE_S = 60.0
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (*DATABASE_UNAVAILABLE_ERRORS, TimeoutError, Unavailable)


@dataclass
class OutageLog:
    """What one worker has said about its current outage, so that it says each thing once."""

    worker: str
    persistent_after_s: float = PERSISTENT_OUTAGE_S
    clock: Callable[[], float] = time.monotonic
    started_s: float | None = None
    failed_passes: int = 0
    reported_persistent: bool = False

    def failed(self, error: BaseException) -> None:
        now_s = self.clock()
        self.failed_passes += 1
        if self.started_s is None:
            self.started_s = now_s
            log.warning("worker_dependency_unavailable", worker=self.worker, reason=_reason(error))
        elif not self.reported_persistent and now_s - self.started_s >= self.persistent_after_s:
            self.reported_persistent = True
            log.error(
                "worker_dependency_unavailable_persists",
                worker=self.worker,
                reason=_reason(error),
                outage_s=round(now_s - self.started_s, 1),
                failed_passes=self.failed_passes,
            )

    def succeeded(self) -> None:
        if self.started_s is None:
            return
        log.info(
            "worker_recovered",
            worker=self.worker,
            outage_s=round(self.clock() - self.started_s, 1),
            failed_passes=self.failed_passes,
        )
        self.started_s, self.failed_passes, self.reported_persistent = None, 0, False


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    text = str(error).strip()
    kind = type(error).__name__
    detail = f"{kind}: {text}" if text else kind
    return f"{reason} ({detail})" if isinstance(reason, str) else detail


def periodic(
    name: str, interval_s: float, step: Callable[[], Awaitable[bool]], *, outage: OutageLog | None = None
) -> Worker:
    """A worker running `step` every `interval_s`; when `step` says more work is waiting (it
    filled its batch) the next pass starts at once. A failing pass is logged (see the module's
    docstring) and retried later. `outage`: its log of outages (tests give it their own clock)."""
    assert interval_s > 0
    outages = outage if outage is not None else OutageLog(name)

    async def run() -> None:
        while True:
            more_waiting = False
            try:
                more_waiting = await step()
            except asyncio.CancelledError:
                raise
            except TRANSIENT_ERRORS as error:
                outages.failed(error)
            except Exception:  # a worker outlives a failed pass; the next one retries
                log.exception("worker_pass_failed", worker=name)
            else:
                outages.succeeded()
            await asyncio.sleep(0 if more_waiting else interval_s)

    run.__name__ = name
    return run
