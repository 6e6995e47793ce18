"""python -m bench: the two-service design against the single-transaction baseline.

    python -m bench [--runs spread@1,spread@4,spread@32,hot@32,contended@32] [--duration-s 15]
                    [--smoke] [--out bench-results/]
    python -m bench --concurrency 32 --scenarios spread,hot     (each scenario at that concurrency)

By default a sweep: the spread scenario at 1, 4 and 32 clients, hot and contended at 32, each
run against the services and then the baseline, in one process on one PostgreSQL. Exits 0 when
every correctness check passed, 1 when one failed (the table says which); speed is reported,
never judged by the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from bench import checks, report, scenarios
from bench.loadgen import MEASURE_END, MEASURE_START
from bench.stack import ROOT, TOKEN_AUDIENCE, TOKEN_ISSUER, BenchStack

DESIGNS = ("services", "baseline")
# The issue's sweep (docs/performance.md): a lone booking, a few, and a crowd, and the crowd on one
# therapist (hot) and on a few slots (contended).
DEFAULT_RUNS = "spread@1,spread@4,spread@32,hot@32,contended@32"
SMOKE_RUNS = "spread@1,spread@4,hot@4,contended@4"
DEFAULT_DURATION_S = 15.0
SMOKE_DURATION_S = 1.5
SMOKE_WARMUP_S = 0.3
# Beyond the run itself: starting the process, setting up the scenario, the last calls' deadlines.
LOADGEN_GRACE_S = 90.0
# Before each run, how idle the machine is (it is shared with other work), and when to warn.
IDLE_SAMPLE_S = 0.5
BUSY_IDLE_FRACTION = 0.8


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=None, help=f"scenario@clients, comma-separated (default {DEFAULT_RUNS})")
    parser.add_argument("--concurrency", type=int, default=None, help="instead of --runs: every scenario at this")
    parser.add_argument("--scenarios", default=None, help="with --concurrency: comma-separated (default all)")
    parser.add_argument("--duration-s", type=float, default=None, help="measured seconds per run (default 15)")
    parser.add_argument("--warmup-s", type=float, default=None, help="unmeasured seconds first (default 2)")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated: services,baseline")
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all, low concurrency")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and SVG")
    parser.add_argument("--postgres-url", help="an existing PostgreSQL server (default: an embedded one)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs (kept on failure)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for both services over their defaults (repeatable): BOOKING_DATABASE_POOL_MAX_SIZE=20",
    )
    arguments = parser.parse_args(argv)
    if any("=" not in setting for setting in arguments.service_env):
        parser.error("--service-env takes NAME=VALUE")
    arguments.service_env = dict(setting.split("=", 1) for setting in arguments.service_env)
    smoke = arguments.smoke
    if arguments.duration_s is None:
        arguments.duration_s = SMOKE_DURATION_S if smoke else DEFAULT_DURATION_S
    if arguments.warmup_s is None:
        arguments.warmup_s = SMOKE_WARMUP_S if smoke else 2.0
    if arguments.concurrency is not None or arguments.scenarios is not None:
        if arguments.runs is not None:
            parser.error("give --runs, or --concurrency with --scenarios, not both")
        names = arguments.scenarios or ",".join(scenarios.SCENARIO_NAMES)
        clients = arguments.concurrency or 32
        arguments.runs = ",".join(f"{name.strip()}@{clients}" for name in names.split(",") if name.strip())
    elif arguments.runs is None:
        arguments.runs = SMOKE_RUNS if smoke else DEFAULT_RUNS
    try:
        arguments.runs = [_run_spec(text) for text in arguments.runs.split(",") if text.strip()]
    except ValueError as error:
        parser.error(f"--runs: {error}")
    arguments.designs = [d.strip() for d in arguments.designs.split(",") if d.strip()]
    if not arguments.runs:
        parser.error("--runs: give at least one scenario@clients")
    if set(arguments.designs) - set(DESIGNS) or not arguments.designs:
        parser.error(f"--designs: choose from {', '.join(DESIGNS)}")
    if not 0 < arguments.duration_s <= 3600 or not 0 <= arguments.warmup_s <= 600:
        parser.error("--duration-s must be in (0, 3600] and --warmup-s in [0, 600]")
    return arguments


def _run_spec(text: str) -> tuple[str, int]:
    """ "spread@32" as ("spread", 32)."""
    name, _, clients = text.strip().partition("@")
    if name not in scenarios.SCENARIO_NAMES:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(scenarios.SCENARIO_NAMES)}")
    if not clients.isdigit() or not 1 <= int(clients) <= 1024:
        raise ValueError(f"{text.strip()!r}: give scenario@clients, clients between 1 and 1024")
    return name, int(clients)


async def _postgres_facts(server_url: str) -> dict[str, str]:
    connection = await asyncpg.connect(server_url, timeout=10)
    try:
        rows = await connection.fetch(
            """SELECT name, setting || coalesce(' ' || unit, '') AS value FROM pg_settings
                WHERE name IN ('server_version', 'shared_buffers', 'max_connections', 'synchronous_commit',
                               'fsync', 'wal_level', 'max_wal_size')"""
        )
    finally:
        await connection.close()
    return {row["name"]: row["value"] for row in rows}


async def _run_loadgen(
    arguments: argparse.Namespace, stack: BenchStack, design: str, scenario: str, concurrency: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-run-") as folder:
        result_file = Path(folder) / "result.json"
        command = [
            sys.executable,
            "-m",
            "bench.loadgen",
            f"--design={design}",
            f"--scenario={scenario}",
            f"--concurrency={concurrency}",
            f"--duration-s={arguments.duration_s}",
            f"--warmup-s={arguments.warmup_s}",
            f"--result-file={result_file}",
            "--handshake",
        ]
        if design == "services":
            assert stack.booking is not None and stack.credit is not None
            command += [
                f"--booking-target={stack.booking.address}",
                f"--credit-target={stack.credit.address}",
                f"--token-key-file={stack.token_key_file}",
                f"--token-issuer={TOKEN_ISSUER}",
                f"--token-audience={TOKEN_AUDIENCE}",
            ]
        else:
            command += [f"--database-url={stack.baseline_url}"]
        if arguments.quiet:
            command.append("--quiet")
        # Progress goes to our stderr as it comes, the measured window's edges to our pipe, and
        # the result comes back through the file.
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT
        )
        snapshots: dict[str, dict[str, dict[int, float]]] = {}
        try:
            async with asyncio.timeout(arguments.warmup_s + arguments.duration_s + LOADGEN_GRACE_S):
                assert process.stdout is not None
                async for line in process.stdout:
                    marker = line.decode(errors="replace").strip()
                    if marker in (MEASURE_START, MEASURE_END):
                        snapshots[marker] = stack.cpu_snapshot(process.pid)
                    if marker == MEASURE_END:
                        assert process.stdin is not None
                        process.stdin.write(b"done\n")
                        await process.stdin.drain()
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if code != 0:
            raise RuntimeError(f"the load generator for {design}/{scenario} exited with {code}")
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
        if len(snapshots) == 2:
            result["cpu_s"] = _cpu_spent(snapshots[MEASURE_START], snapshots[MEASURE_END])
            result["cpu_s"]["loadgen"] = result["loadgen_cpu_s"]  # its own count, exactly the window
        return result


def _cpu_spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float | None]:
    spent: dict[str, float | None] = {}
    for component, pids in before.items():
        common = pids.keys() & after[component].keys()
        spent[component] = round(sum(after[component][p] - pids[p] for p in common), 3) if common else None
    return spent


def _cpu_per_call(result: dict[str, Any], design: str) -> dict[str, float | None]:
    """CPU milliseconds per finished call of the measured window, by component, and their total
    (the baseline's total leaves out the idle services). Robust where rates are not: on a shared
    machine other work slows a run down, but barely changes what each call costs."""
    spent = result.get("cpu_s") or {}
    calls = result["acknowledged"] + sum(result["refused"].values()) + sum(result["errors"].values())
    per_call: dict[str, float | None] = {
        name: None if seconds is None or not calls else round(seconds * 1000 / calls, 3)
        for name, seconds in spent.items()
    }
    counted = ("booking", "credit", "postgres", "loadgen") if design == "services" else ("postgres", "loadgen")
    parts = [per_call.get(name) for name in counted]
    per_call["total"] = None if any(p is None for p in parts) else round(sum(p or 0.0 for p in parts), 3)
    return per_call


async def _measure(
    arguments: argparse.Namespace, stack: BenchStack, design: str, scenario: str, concurrency: int
) -> dict[str, Any]:
    idle = await asyncio.to_thread(report.cpu_idle_fraction, IDLE_SAMPLE_S)
    if idle is not None and idle < BUSY_IDLE_FRACTION:
        print(
            f"warning: the CPUs were only {idle:.0%} idle before {design}/{scenario}@{concurrency}: "
            "other load skews the figures",
            file=sys.stderr,
        )
    peaks_reset = stack.reset_peaks() if design == "services" else False
    result = await _run_loadgen(arguments, stack, design, scenario, concurrency)
    result["cpu_idle_before"] = idle
    violations = checks.count_violations(result)
    if design == "services":
        result["peak_rss_kib"] = stack.peaks_kib()
        result["peak_rss_since"] = "this run" if peaks_reset else "process start"
        violations += await checks.services_violations(stack.booking_url, stack.credit_url, result)
        if not stack.all_running():
            violations.append("a service process exited during the run")
    else:
        violations += await checks.baseline_violations(stack.baseline_url, result)
    result["cpu_ms_per_call"] = _cpu_per_call(result, design)
    result["violations"] = violations
    result["therapists"] = len(result["world"]["therapist_ids"])
    result["clients"] = len(result["world"]["client_ids"])
    del result["world"], result["booked_ids"]  # large, and only the checks need them
    return result


async def run(arguments: argparse.Namespace) -> int:
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    document: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "machine": report.machine(),
        "options": {
            "runs": [f"{scenario}@{concurrency}" for scenario, concurrency in arguments.runs],
            "duration_s": arguments.duration_s,
            "warmup_s": arguments.warmup_s,
            "designs": arguments.designs,
            "smoke": arguments.smoke,
            "service_env": arguments.service_env,
        },
        "runs": [],
    }
    stack = BenchStack(
        postgres_url=arguments.postgres_url, keep_logs=arguments.keep_logs, service_env=arguments.service_env
    )
    async with stack:
        document["postgres"] = await _postgres_facts(stack.server_url)
        for scenario, concurrency in arguments.runs:
            run_results: dict[str, Any] = {"scenario": scenario, "concurrency": concurrency}
            for design in arguments.designs:
                run_results[design] = await _measure(arguments, stack, design, scenario, concurrency)
            document["runs"].append(run_results)
        failed = any(run[design]["violations"] for run in document["runs"] for design in arguments.designs)
        if failed:
            stack.keep_logs = True
            print(f"services' logs kept in {stack.log_dir}", file=sys.stderr)
    for run_results in document["runs"]:
        run_ratio = report.ratio(run_results)
        run_results["ratio"] = None if run_ratio is None else round(run_ratio, 4)
    document["must_show"] = report.must_show(document)
    document["ok"] = not failed
    json_path = arguments.out / f"{stamp}.json"
    svg_path = arguments.out / f"{stamp}.svg"
    report.write_json(document, json_path)
    report.write_svg(document, svg_path)
    print(report.table(document))
    print(report.summary(document))
    print(f"results: {json_path}  chart: {svg_path}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(run(arguments))
    return 130


if __name__ == "__main__":
    sys.exit(main())
