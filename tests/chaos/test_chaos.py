"""The chaos harness in CI: the quick mode holds every invariant under its faults, and a
deliberately broken build (no reconciler) makes the harness fail, naming what broke.

Each run picks a fresh seed (or CHAOS_SEED) and prints it; a failure's message is the whole
summary, with the command that replays it.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from booking_service.config import CRASH_POINTS, BookingSettings
from devstack.postgres import server_url_from_environment
from tests.chaos.faults import FaultKind, PlannedFault, plan_faults
from tests.chaos.harness import ChaosConfig, run_chaos
from tests.support.auth import auth_environment
from tests.support.stack import ROOT

# The bar for the quick mode: on two cores, in under four minutes.
QUICK_LIMIT_S = 240.0
BROKEN_RUN_TIMEOUT_S = 150.0


def seed() -> int:
    chosen = int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**31))
    print(f"chaos seed {chosen}")
    return chosen


def test_the_reconciler_is_on_unless_switched_off() -> None:
    base = {"BOOKING_DATABASE_URL": "postgresql://example/booking", **auth_environment()}
    assert BookingSettings.from_environment(base).reconciler_enabled
    assert not BookingSettings.from_environment({**base, "BOOKING_RECONCILER_ENABLED": "false"}).reconciler_enabled


def test_the_fault_plan_is_a_function_of_the_seed_and_meets_the_quick_minimums() -> None:
    config = ChaosConfig.quick(seed=42)

    def plan(seed_value: int) -> list[PlannedFault]:
        return list(
            plan_faults(
                config.fault_mix,
                config.crash_points,
                config.crash_exposures,
                (3.0, config.load_s - 5.0),
                random.Random(seed_value),
                ["booking-0", "booking-1", "credit-0", "credit-1"],
                2,
            )
        )

    assert plan(1) == plan(1)
    assert plan(1) != plan(2)
    kinds = [fault.kind for fault in plan(1)]
    assert kinds.count(FaultKind.SIGKILL) >= config.minimum_sigkills
    assert kinds.count(FaultKind.DATABASE_RESTART) >= config.minimum_database_restarts
    assert {fault.target for fault in plan(1) if fault.kind is FaultKind.CRASH_POINT} == set(CRASH_POINTS)


@pytest.mark.slow
@pytest.mark.timeout(QUICK_LIMIT_S + 60)
async def test_quick_mode_holds_every_invariant_under_kills_outages_and_a_database_restart() -> None:
    if server_url_from_environment(os.environ) is not None:
        pytest.skip(
            "DATABASE_URL is set: the chaos harness cannot restart an external server, so the quick mode's "
            "database-restart fault is impossible; CI runs it on its own embedded PostgreSQL"
        )
    started = time.monotonic()
    report = await run_chaos(ChaosConfig.quick(seed()), progress=print)
    took_s = time.monotonic() - started
    summary = report.render()
    print(summary)
    assert report.passed, summary
    assert report.tally.total_tried >= 500, summary
    assert report.faults is not None
    counts = report.faults.counts()
    assert counts[FaultKind.SIGKILL.value] >= 10, summary
    assert counts[FaultKind.DATABASE_RESTART.value] >= 1, summary
    assert report.violated == [], summary
    assert took_s < QUICK_LIMIT_S, f"the quick mode took {took_s:.0f} s\n{summary}"


@pytest.mark.slow
@pytest.mark.timeout(BROKEN_RUN_TIMEOUT_S + 30)
async def test_a_build_without_its_reconciler_fails_the_harness_naming_the_stuck_holds() -> None:
    # Through the command line, as a developer would run it: the exit status and the message.
    chosen = seed()
    command = [sys.executable, "-m", "tests.chaos", "--no-reconciler", "--seed", str(chosen)]
    result = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BROKEN_RUN_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    kept = re.search(r"process logs kept in (\S+)", output)
    if kept is not None:
        shutil.rmtree(Path(kept.group(1)).parent, ignore_errors=True)
    assert result.returncode == 1, output
    assert "reconciler OFF (deliberately broken build)" in output, output
    assert "FAIL no_hold_outlives_bound" in output, output
    assert re.search(r"has been PENDING for [\d.]+ s \(bound [\d.]+ s\); session: False, refusal: none", output), output
    assert f"RESULT: FAIL (seed {chosen}): invariant violated: no_hold_outlives_bound" in output, output
    assert f"--no-reconciler --seed {chosen}" in output, output  # how to replay it
    # Everything else held: the harness names exactly what the missing reconciler broke.
    assert "FAIL credit_books_balance" not in output, output
    assert "HARNESS ERROR" not in output, output
    # And it left nothing running: no database server of its own.
    assert kept is not None
    leftovers = await asyncio.to_thread(
        subprocess.run, ["pgrep", "-f", Path(kept.group(1)).parent.name], capture_output=True, check=False
    )
    assert leftovers.stdout == b"", leftovers.stdout
