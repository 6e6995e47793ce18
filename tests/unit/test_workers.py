"""Background workers (service_kit/workers.py): a dependency's outage is logged once at warning
with its reason, again at error only when it persists, and its end once; a bug every time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping
from typing import Any

import asyncpg
from structlog.testing import capture_logs

from service_kit.errors import Unavailable
from service_kit.workers import OutageLog, periodic

PASS_S = 20.0  # what each pass costs on the fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


async def run_passes(outcomes: list[BaseException | None], clock: FakeClock) -> list[MutableMapping[str, Any]]:
    """Runs the worker through `outcomes` (an exception: that pass fails), then stops it."""
    remaining: Iterator[BaseException | None] = iter(outcomes)
    done = asyncio.Event()

    async def step() -> bool:
        clock.now_s += PASS_S
        outcome = next(remaining, None) if not done.is_set() else None
        if outcome is None and not _pending(remaining):
            done.set()
        if outcome is not None:
            raise outcome
        return False

    with capture_logs() as logs:
        worker = asyncio.create_task(periodic("outbox", 0.001, step, outage=OutageLog("outbox", 60.0, clock))())
        await asyncio.wait_for(done.wait(), 5)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    # Only this worker's lines: servers of other tests share the event loop and log meanwhile.
    return [entry for entry in logs if entry.get("worker") == "outbox"]


def _pending(iterator: Iterator[BaseException | None]) -> bool:
    return getattr(iterator, "__length_hint__", lambda: 0)() > 0


def restart() -> BaseException:
    return asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command")


async def test_a_short_outage_is_one_warning_with_its_reason_and_one_recovery() -> None:
    logs = await run_passes([restart(), ConnectionRefusedError(111, "Connection refused"), None], FakeClock())
    events = [(entry["log_level"], entry["event"]) for entry in logs]
    assert events == [("warning", "worker_dependency_unavailable"), ("info", "worker_recovered")]
    assert "AdminShutdownError: terminating connection" in str(logs[0]["reason"])
    assert "exc_info" not in logs[0]
    assert logs[1]["failed_passes"] == 2


async def test_an_outage_that_persists_is_an_error_once() -> None:
    outcomes: list[BaseException | None] = [Unavailable("the database is not ready yet", reason="DATABASE_UNAVAILABLE")]
    outcomes += [TimeoutError()] * 6
    logs = await run_passes([*outcomes, None], FakeClock())
    events = [(entry["log_level"], entry["event"]) for entry in logs]
    assert events == [
        ("warning", "worker_dependency_unavailable"),
        ("error", "worker_dependency_unavailable_persists"),
        ("info", "worker_recovered"),
    ]
    assert str(logs[0]["reason"]).startswith("DATABASE_UNAVAILABLE")
    assert logs[1]["outage_s"] == 60.0 and logs[2]["failed_passes"] == 7


async def test_a_bug_is_logged_with_its_traceback_at_every_pass() -> None:
    logs = await run_passes([KeyError("x"), KeyError("x"), None], FakeClock())
    assert [entry["event"] for entry in logs] == ["worker_pass_failed", "worker_pass_failed"]
    assert all(entry["log_level"] == "error" and entry.get("exc_info") for entry in logs)
