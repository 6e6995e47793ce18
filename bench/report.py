"""The benchmark's report: a table on stdout, the ratio of the designs, JSON, and an SVG chart.

A report holds `runs`, each one scenario at one concurrency with a result per design. The chart is
plain SVG written with the standard library (no plotting dependency): bookings per second per run
for both designs, and the p50 and p99 latency of a booking.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

DESIGNS = ("services", "baseline")
COLORS = {"services": "#3b6fb6", "baseline": "#d9822b"}
LIGHT_COLORS = {"services": "#9db7db", "baseline": "#ecc095"}
# The targets of docs/performance.md: a lone booking (spread@1) answers within TARGET_LONE_P50_MS at
# the median for at most TARGET_LONE_CPU_MS of CPU (every process); at 32 clients (spread@32) the
# services reach TARGET_CROWD_RATIO of the baseline's bookings per second, with p99 within
# TARGET_CROWD_P99_MS, at most TARGET_CROWD_CPU_MS of CPU per booking, of which PostgreSQL at most
# TARGET_CROWD_POSTGRES_MS; contended shows no violation and no error but the slot reason.
TARGET_LONE_P50_MS = 5.0
TARGET_LONE_CPU_MS = 4.0
TARGET_CROWD_RATIO = 0.15
TARGET_CROWD_P99_MS = 100.0
TARGET_CROWD_CPU_MS = 3.0
TARGET_CROWD_POSTGRES_MS = 1.0


def machine() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def cpu_idle_fraction(sample_s: float = 1.0) -> float | None:
    """How idle the machine's CPUs were over `sample_s` (blocking): other load skews a benchmark,
    so each run records it, and warns when the machine was busy before it started."""
    try:
        idle_before, total_before = _cpu_times()
        time.sleep(sample_s)
        idle_after, total_after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return round((idle_after - idle_before) / max(1, total_after - total_before), 3)


def ratio(run: dict[str, Any]) -> float | None:
    services, baseline = run.get("services"), run.get("baseline")
    if not services or not baseline or not baseline["bookings_per_s"]:
        return None
    return float(services["bookings_per_s"]) / float(baseline["bookings_per_s"])


def label(run: dict[str, Any]) -> str:
    return f"{run['scenario']}@{run['concurrency']}"


def _find(report: dict[str, Any], scenario: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in report["runs"] if (r["scenario"], r["concurrency"]) == (scenario, concurrency)), None)


def _judged(value: float | None, bound: float, *, at_least: bool = False) -> dict[str, Any]:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {"value": value, "bound": bound, "met": met}


def must_show(report: dict[str, Any]) -> dict[str, Any]:
    """The targets, judged on this run's spread@1 and spread@32 (absent runs: not judged). A smoke
    run is too short to judge anything."""
    targets: dict[str, Any] = {}
    if report["options"]["smoke"]:
        return targets
    lone = (_find(report, "spread", 1) or {}).get("services")
    if lone:
        cpu = lone["cpu_ms_per_call"]
        targets["lone_p50_ms"] = _judged(lone["latency_booked_ms"]["p50"], TARGET_LONE_P50_MS)
        targets["lone_cpu_ms"] = _judged(cpu.get("total"), TARGET_LONE_CPU_MS)
    crowd_run = _find(report, "spread", 32)
    crowd = (crowd_run or {}).get("services")
    if crowd_run and crowd:
        cpu = crowd["cpu_ms_per_call"]
        targets["crowd_ratio"] = _judged(ratio(crowd_run), TARGET_CROWD_RATIO, at_least=True)
        targets["crowd_p99_ms"] = _judged(crowd["latency_booked_ms"]["p99"], TARGET_CROWD_P99_MS)
        targets["crowd_cpu_ms"] = _judged(cpu.get("total"), TARGET_CROWD_CPU_MS)
        targets["crowd_postgres_ms"] = _judged(cpu.get("postgres"), TARGET_CROWD_POSTGRES_MS)
    contended = (_find(report, "contended", 32) or {}).get("services")
    if contended:
        targets["contended_clean"] = {
            "value": not contended["violations"],
            "bound": True,
            "met": not contended["violations"],
        }
    return targets


def _cell(value: Any, width: int, digits: int = 1) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return text.rjust(width)


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _cpu_parts(result: dict[str, Any], design: str) -> str:
    cpu = result.get("cpu_ms_per_call") or {}
    names = ("booking", "credit", "postgres", "loadgen") if design == "services" else ("postgres", "loadgen")
    return " + ".join(_cell(cpu.get(name), 1, 2).strip() for name in names)


def table(report: dict[str, Any]) -> str:
    """One line per run and design, in the order of the sweep, then the ratio of the designs.
    CPU is milliseconds per finished call of every process involved: for the services booking +
    credit + PostgreSQL + the load generator, for the baseline PostgreSQL + the load generator."""
    header = (
        f"{'run':<14} {'design':<9} {'bookings/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/call':>11}  "
        f"{'(booking + credit + postgres + load)':<38} {'MiB b/c':>9}  refusals / errors / checks"
    )
    lines = [header, "-" * len(header)]
    for run in report["runs"]:
        for design in DESIGNS:
            result = run.get(design)
            if result is None:
                continue
            latency = result["latency_booked_ms"]
            peaks = result.get("peak_rss_kib") or {}
            memory = "/".join(_cell(_mib(peaks.get(name)), 1, 0).strip() for name in ("booking", "credit"))
            refusals = ", ".join(f"{reason} {n}" for reason, n in sorted(result["refused"].items())) or "none"
            errors = ", ".join(f"{reason} {n}" for reason, n in sorted(result["errors"].items())) or "no errors"
            checks = "checks ok" if not result["violations"] else f"{len(result['violations'])} VIOLATIONS"
            lines.append(
                f"{label(run) if design == DESIGNS[0] or 'services' not in run else '':<14} {design:<9} "
                f"{_cell(result['bookings_per_s'], 10)} {_cell(latency['p50'], 8, 2)} {_cell(latency['p99'], 8, 2)} "
                f"{_cell((result.get('cpu_ms_per_call') or {}).get('total'), 11, 2)}  "
                f"{'(' + _cpu_parts(result, design) + ')':<38} {memory:>9}  {refusals} / {errors} / {checks}"
            )
        run_ratio = ratio(run)
        if run_ratio is not None:
            lines.append(f"{'':<14} {'ratio':<9} {run_ratio * 100:9.1f}% of the baseline's bookings per second")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    words = {True: "met", False: "NOT met", None: "not judged"}
    names = {
        "lone_p50_ms": "spread@1, p50 ms",
        "lone_cpu_ms": "spread@1, CPU ms per booking",
        "crowd_ratio": "spread@32, share of the baseline's bookings/s",
        "crowd_p99_ms": "spread@32, p99 ms",
        "crowd_cpu_ms": "spread@32, CPU ms per booking",
        "crowd_postgres_ms": "spread@32, PostgreSQL CPU ms per booking",
    }
    lines = []
    for key, name in names.items():
        target = report["must_show"].get(key)
        if target is None or target["value"] is None:
            continue
        relation = ">=" if key == "crowd_ratio" else "<="
        lines.append(f"target {name}: {target['value']:.3g} ({relation} {target['bound']:g}: {words[target['met']]})")
    contended = report["must_show"].get("contended_clean")
    if contended is not None:
        lines.append(f"contended@32: {'clean' if contended['met'] else 'VIOLATIONS (see above)'}")
    for run in report["runs"]:
        for design in DESIGNS:
            for violation in (run.get(design) or {}).get("violations", []):
                lines.append(f"VIOLATION {label(run)}/{design}: {violation}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --- SVG ---


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return float(step * exponent)
    return float(10 * exponent)


def _format(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _panel(
    x: float,
    y: float,
    width: float,
    height: float,
    title: str,
    groups: list[str],
    series: list[tuple[str, str]],
    values: dict[str, dict[str, float | None]],
) -> list[str]:
    """A grouped bar chart: one group per scenario, one bar per (label, color) series."""
    top = max([v for g in values.values() for v in g.values() if v is not None] or [1.0])
    ceiling = _nice_ceiling(top)
    plot_x, plot_y, plot_w, plot_h = x + 60, y + 40, width - 80, height - 90
    parts = [f'<text x="{x + width / 2}" y="{y + 20}" text-anchor="middle" class="title">{escape(title)}</text>']
    for tick in range(6):
        tick_value = ceiling * tick / 5
        ty = plot_y + plot_h - plot_h * tick / 5
        parts.append(f'<line x1="{plot_x}" y1="{ty:.1f}" x2="{plot_x + plot_w}" y2="{ty:.1f}" class="grid"/>')
        parts.append(f'<text x="{plot_x - 6}" y="{ty + 4:.1f}" text-anchor="end">{_format(tick_value)}</text>')
    group_w = plot_w / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(series))
    for gi, group in enumerate(groups):
        gx = plot_x + gi * group_w + group_w * 0.1
        for si, (label, color) in enumerate(series):
            value = values.get(group, {}).get(label)
            if value is None:
                continue
            bar_h = plot_h * value / ceiling
            bx, by = gx + si * bar_w, plot_y + plot_h - bar_h
            parts.append(
                f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bar_w * 0.92:.1f}" height="{bar_h:.1f}" fill="{color}">'
                f"<title>{escape(f'{group} {label}: {value:.2f}')}</title></rect>"
            )
            parts.append(
                f'<text x="{bx + bar_w * 0.46:.1f}" y="{by - 4:.1f}" text-anchor="middle" class="value">'
                f"{_format(value)}</text>"
            )
        parts.append(
            f'<text x="{gx + group_w * 0.4:.1f}" y="{plot_y + plot_h + 18}" text-anchor="middle">{escape(group)}</text>'
        )
    legend_y = y + height - 20
    for si, (label, color) in enumerate(series):
        lx = plot_x + si * (plot_w / max(1, len(series)))
        parts.append(f'<rect x="{lx:.1f}" y="{legend_y - 10}" width="12" height="12" fill="{color}"/>')
        parts.append(f'<text x="{lx + 16:.1f}" y="{legend_y}">{escape(label)}</text>')
    return parts


def svg(report: dict[str, Any]) -> str:
    groups = [label(run) for run in report["runs"]]
    throughput = {label(run): {d: (run.get(d) or {}).get("bookings_per_s") for d in DESIGNS} for run in report["runs"]}
    latency: dict[str, dict[str, float | None]] = {}
    for run in report["runs"]:
        name = label(run)
        latency[name] = {}
        for design in DESIGNS:
            result = run.get(design) or {}
            percentiles = result.get("latency_booked_ms") or {}
            latency[name][f"{design} p50"] = percentiles.get("p50")
            latency[name][f"{design} p99"] = percentiles.get("p99")
    heading = f"Booking benchmark (runs: scenario@clients), {report['started_at']}"
    width, height = 1000, 420
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" '
        f'viewBox="0 0 {width} {height + 30}" font-family="sans-serif" font-size="12">',
        "<style>.title{font-size:14px;font-weight:bold}.grid{stroke:#ddd}.value{font-size:10px}</style>",
        f'<rect width="{width}" height="{height + 30}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{escape(heading)}</text>',
    ]
    parts += _panel(
        0,
        30,
        width * 0.42,
        height,
        "bookings per second",
        groups,
        [(d, COLORS[d]) for d in DESIGNS],
        throughput,
    )
    latency_series = [
        ("services p50", LIGHT_COLORS["services"]),
        ("services p99", COLORS["services"]),
        ("baseline p50", LIGHT_COLORS["baseline"]),
        ("baseline p99", COLORS["baseline"]),
    ]
    parts += _panel(width * 0.42, 30, width * 0.58, height, "booking latency (ms)", groups, latency_series, latency)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_svg(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg(report), encoding="utf-8")
