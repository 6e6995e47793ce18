"""python -m tests.chaos: run the chaos harness, print progress and the summary.

Exit status 0 when every invariant held and the minimum fault counts were met; 1 otherwise (the
summary names the failing invariants and the seed to replay); 130 when interrupted. Every process
it started, and its database, are stopped on the way out, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys

from tests.chaos.harness import CLEANUP, ChaosConfig, run_chaos, with_overrides

EXIT_INTERRUPTED = 130


def parse(argv: list[str]) -> tuple[ChaosConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the bounded CI mode (about 2.5 minutes)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a fresh random seed)")
    parser.add_argument("--duration-s", type=float, default=None, help="seconds of load (default: per mode)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default: per mode)")
    parser.add_argument(
        "--no-reconciler",
        action="store_true",
        help="the deliberately broken build: booking replicas without their reconciler and a short load "
        "that leaves holds only the reconciler releases; the run must FAIL",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs even when the run passes")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.duration_s is not None and not 5 <= args.duration_s <= 3600:
        parser.error("--duration-s must be between 5 and 3600")
    if args.clients is not None and not 1 <= args.clients <= 200:
        parser.error("--clients must be between 1 and 200")
    if args.no_reconciler:
        config = ChaosConfig.broken(seed)
    elif args.quick:
        config = ChaosConfig.quick(seed)
    else:
        config = ChaosConfig.full(seed)
    return with_overrides(config, load_s=args.duration_s, clients=args.clients), args.keep_logs


async def main(config: ChaosConfig, keep_logs: bool) -> int:
    task = asyncio.current_task()
    assert task is not None
    # Both signals cancel the run, whose `finally`s stop every process and the database; SIGINT
    # explicitly, because a shell starts background jobs with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    report = await run_chaos(config, progress=lambda line: print(line, flush=True), keep_logs=keep_logs)
    print(report.render(), flush=True)
    return 0 if report.passed else 1


def run(argv: list[str]) -> int:
    config, keep_logs = parse(argv)
    try:
        return asyncio.run(main(config, keep_logs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"interrupted; seed {config.seed}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            CLEANUP.now()  # whatever an interrupted run could not stop itself


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
