"""The benchmark's smoke mode, run as `make bench` runs it (a real subprocess), so it cannot rot.

It asserts what the benchmark asserts about correctness, never a speed: every call it made ended
exactly one way, the books of both designs are straight after every scenario, and the only
refusal is the lost race for a slot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = (("spread", 1), ("spread", 4), ("hot", 4), ("contended", 4))
DESIGNS = ("services", "baseline")
# The smoke run takes a few seconds per scenario and design; this bounds a hang, not a speed.
SMOKE_TIMEOUT_S = 150


@pytest.mark.slow
def test_smoke_run_of_the_benchmark_keeps_every_guarantee(postgres_server_url: str, tmp_path: Path) -> None:
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--quiet",
            "--out",
            str(tmp_path),
            "--postgres-url",
            postgres_server_url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert finished.returncode == 0, f"stdout:\n{finished.stdout}\nstderr:\n{finished.stderr[-5000:]}"
    [result_file] = tmp_path.glob("*.json")
    report = json.loads(result_file.read_text())

    assert report["ok"] is True
    assert report["options"]["smoke"] is True
    assert [(run["scenario"], run["concurrency"]) for run in report["runs"]] == list(RUNS)
    for run in report["runs"]:
        name = run["scenario"]
        for design in DESIGNS:
            result = run[design]
            where = f"{name}@{run['concurrency']}/{design}"
            assert result["violations"] == [], where
            assert result["errors"] == {} and result["totals"]["errors"] == {}, where
            totals = result["totals"]
            finished_calls = totals["acknowledged"] + sum(totals["refused"].values())
            assert finished_calls == totals["attempted"] > 0, where
            assert result["attempted"] == result["acknowledged"] + sum(result["refused"].values()), where
            assert set(totals["refused"]) <= {"SLOT_UNAVAILABLE"}, where
            assert totals["acknowledged_paid"] == totals["acknowledged"] > 0, where
            if name != "contended":
                assert totals["refused"] == {}, where  # every call wanted a slot nobody else wanted
        assert run["ratio"] is not None
    for name in ("booking", "credit"):
        assert report["runs"][0]["services"]["peak_rss_kib"][name] > 0

    [chart] = tmp_path.glob("*.svg")
    root = ElementTree.parse(chart).getroot()  # noqa: S314  # the file the run just wrote, not untrusted input
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "ratio" in finished.stdout and "SLOT_UNAVAILABLE" in finished.stdout
