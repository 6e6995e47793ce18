"""Where the services spend their CPU under load: `python -m bench.profile [--duration-s 10]`.

Runs the benchmark's spread scenario against the services (`python -m bench`, in a process of
its own), and once the load is running attaches py-spy to each service for `--duration-s`
seconds. It writes py-spy's raw stacks per service to `--out` and prints, per service, the frames
that the most samples passed through (docs/performance.md, "Where the CPU of a booking goes now").
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.stack import ROOT, child_pids

SERVICES = ("booking_service", "credit_service")
WARMUP_S = 8.0
SAMPLES_PER_S = 100
TOP_FRAMES = 25
FIND_TIMEOUT_S = 60.0


def service_pids(bench_pid: int) -> dict[str, int]:
    """The services the benchmark started (its children running `-m <service>`)."""
    found = {}
    for pid in child_pids(bench_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for service in SERVICES:
            if service.encode() in command:
                found[service] = pid
    return found


def top_frames(raw: Path) -> list[tuple[float, str]]:
    """(share of samples, frame) for the frames most samples passed through, from py-spy's raw
    format: one `frame;frame;...;frame count` line per distinct stack."""
    through: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")[1:]):  # the first is the thread
            through[frame] += int(count)
    return [(n / total, frame) for frame, n in through.most_common(TOP_FRAMES)] if total else []


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds of sampling (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "profile")
    arguments = parser.parse_args()
    if not 1 <= arguments.duration_s <= 120:
        parser.error("--duration-s must be between 1 and 120")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: `make venv` installs it with the dev tools", file=sys.stderr)
        return 2
    arguments.out.mkdir(parents=True, exist_ok=True)
    load_s = WARMUP_S + arguments.duration_s + 5
    bench = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench", "--designs", "services"),
            *("--runs", f"spread@{arguments.concurrency}"),
            *("--duration-s", str(load_s), "--quiet", "--out", str(arguments.out)),
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + FIND_TIMEOUT_S
        pids = service_pids(bench.pid)
        while len(pids) < len(SERVICES) and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.5)
            pids = service_pids(bench.pid)
        if len(pids) < len(SERVICES):
            print(f"the services did not start (found {sorted(pids)})", file=sys.stderr)
            return 1
        time.sleep(WARMUP_S + 5)  # the stack's own set-up, then the load's warm-up
        print(f"sampling {', '.join(sorted(pids))} for {arguments.duration_s:.0f} s", file=sys.stderr)
        samplers = {
            service: subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(pid), "--duration", str(int(arguments.duration_s))),
                    *("--rate", str(SAMPLES_PER_S), "--format", "raw", "--nonblocking", "--threads"),
                    *("--output", str(arguments.out / f"{service}.txt")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for service, pid in pids.items()
        }
        for sampler in samplers.values():
            sampler.wait(timeout=arguments.duration_s + 30)
        bench.wait(timeout=load_s + 120)
    finally:
        if bench.poll() is None:
            bench.terminate()
            bench.wait(timeout=30)
    for service in SERVICES:
        print(f"\n{service}: frames by share of samples ({arguments.out / f'{service}.txt'})")
        for share, frame in top_frames(arguments.out / f"{service}.txt"):
            print(f"  {share * 100:5.1f} %  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
