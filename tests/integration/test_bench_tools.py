"""The benchmark's measuring tools still run (what they print is the figures of
docs/performance.md): a short run of each, and the profile's parser of py-spy's raw stacks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.profile import top_frames

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[0-9]+(\.[0-9]+)?"


def run_module(*arguments: str, timeout_s: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_grpc_floor_prints_the_cpu_of_a_call() -> None:
    output = run_module("bench.grpc_floor", "--duration-s", "1", "--concurrency", "4")
    match = re.search(rf"server ({NUMBER}) ms CPU/call, client ({NUMBER}) ms CPU/call", output)
    assert match is not None, output
    assert float(match.group(1)) > 0 and float(match.group(3)) > 0


def test_pg_costs_prints_every_statement() -> None:
    output = run_module("bench.pg_costs", "--items", "64")
    for label in (
        "SELECT 1",
        "INSERT one account row",
        "reserve_many, 1 per call",
        "reserve_many, 64",
        "baseline.book",
    ):
        assert re.search(rf"{re.escape(label)}.* ({NUMBER}) ms CPU/item", output), (label, output)


def test_profile_counts_each_frame_once_per_stack(tmp_path: Path) -> None:
    raw = tmp_path / "service.txt"
    raw.write_text("thread (1);main (a.py:1);f (a.py:2);f (a.py:2) 3\nthread (1);main (a.py:1);g (a.py:3) 1\n")
    frames = dict((frame, share) for share, frame in top_frames(raw))
    assert frames == {"main (a.py:1)": 1.0, "f (a.py:2)": 0.75, "g (a.py:3)": 0.25}
