"""Mutual TLS on real servers over real sockets, with certificates made here (tests/support/pki.py).

- A credit server with mutual TLS (in-process, on a fresh database): a client with a certificate
  from the CA gets through the handshake to the authentication layer; a client without one, with
  one from another CA, in plaintext, or not trusting the server, is refused in the handshake, and
  no RPC reaches the server (its own metrics say so). The real grpcurl binary works against it
  with -cacert/-cert/-key, and reflection is served behind the TLS.
- Its plaintext health port answers SERVING, serves nothing but health (no reflection, no
  service), and reports the graceful shutdown; the TLS port refuses plaintext health checks.
- Both services as processes, the booking service calling credit over mutual TLS: a booking is
  made and paid end to end; the same booking process without its client certificate, or with one
  from another CA, cannot reach credit (CREDIT_SERVICE_UNAVAILABLE). Their logs say mtls and hold
  no key.
- Configuration errors: exit code 2 and a message that names the variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from booking.v1 import booking_pb2
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2, credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.server import start as start_credit
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from devstack.gateway import UpstreamTls
from service_kit.errors import error_details
from service_kit.server import Runtime
from tests.support.auth import authorized_channel, token
from tests.support.gateway import request_json, running_gateway
from tests.support.pki import Leaf, Pki, make_pki
from tests.support.processes import Stack, StackTls, log_events, running_stack
from tests.support.stack import GRPCURL, ROOT, fresh_database, server_environment, wait_serving
from tests.support.world import World, future_hour

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

pytestmark = pytest.mark.timeout(120)

CALL_TIMEOUT_S = 5.0
GRPCURL_TIMEOUT_S = 20.0
CONFIG_ERROR_EXIT_CODE = 2
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def tls_database_url(postgres_server_url: str) -> str:
    return await fresh_database(postgres_server_url, "credit_tls")


def credit_tls_settings(database_url: str, pki: Pki, *, mutual: bool = True, **extra: str) -> CreditSettings:
    env = server_environment(
        "CREDIT",
        database_url,
        CREDIT_TLS_CERT_FILE=str(pki.server.certificate_file),
        CREDIT_TLS_KEY_FILE=str(pki.server.key_file),
        **{"CREDIT_HEALTH_ADDRESS": "127.0.0.1:0", **extra},
    )
    if mutual:
        env["CREDIT_TLS_CLIENT_CA_FILE"] = str(pki.ca.certificate_file)
    return CreditSettings.from_environment(env)


@contextlib.asynccontextmanager
async def running_credit(settings: CreditSettings) -> AsyncIterator[Runtime]:
    """An in-process credit server, SERVING on its health port; stopped (again) at the end."""
    runtime = await start_credit(settings)
    try:
        await wait_serving(f"127.0.0.1:{runtime.health_port}", CREDIT_SERVICE_NAME)
        yield runtime
    finally:
        await runtime.stop()  # returns at once when the test stopped it already


@pytest.fixture(scope="module")
async def mtls_credit(tls_database_url: str, pki: Pki) -> AsyncIterator[Runtime]:
    async with running_credit(credit_tls_settings(tls_database_url, pki)) as runtime:
        yield runtime


def address(runtime: Runtime) -> str:
    return f"127.0.0.1:{runtime.port}"


def health_address(runtime: Runtime) -> str:
    return f"127.0.0.1:{runtime.health_port}"


def credentials(roots: bytes, leaf: Leaf | None) -> grpc.ChannelCredentials:
    if leaf is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=leaf.key_pem, certificate_chain=leaf.certificate_pem
    )


@contextlib.asynccontextmanager
async def credit_stub(
    target: str,
    channel_credentials: grpc.ChannelCredentials | None,
    *,
    with_token: bool = True,
    server_name: str | None = None,
) -> AsyncIterator[CreditServiceAsyncStub]:
    """A stub over TLS with `channel_credentials` (None: plaintext), checking `server_name` in
    the server's certificate if given; calls carry the operator's token unless `with_token` is false."""
    channel_options = [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]
    if with_token:
        channel = authorized_channel(target, options=channel_options, credentials=channel_credentials)
    elif channel_credentials is None:
        channel = grpc.aio.insecure_channel(target, options=channel_options)
    else:
        channel = grpc.aio.secure_channel(target, channel_credentials, options=channel_options)
    async with channel:
        yield credit_pb2_grpc.CreditServiceStub(channel)


async def get_balance_error(stub: CreditServiceAsyncStub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=str(uuid.uuid4())), timeout=CALL_TIMEOUT_S)
    return raised.value


def calls_started(runtime: Runtime, method: str) -> float:
    """What the server's own metrics count of calls to `method` that reached the interceptor."""
    labels = {"grpc_type": "unary", "grpc_service": CREDIT_SERVICE_NAME, "grpc_method": method}
    return runtime.registry.get_sample_value("grpc_server_started_total", labels) or 0.0


async def health_check(target: str, service: str = CREDIT_SERVICE_NAME) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' typing declares no methods
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # the real grpcurl binary from the venv
        [str(GRPCURL), "-max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT_S,
        check=False,
    )


# --- the mutual TLS port ---------------------------------------------------------------------------


async def test_a_client_with_a_certificate_from_the_ca_gets_through_to_authentication(
    mtls_credit: Runtime, pki: Pki
) -> None:
    good = credentials(pki.ca.certificate_pem, pki.client)
    # Through the handshake, then stopped by the token check: TLS is not authorization.
    async with credit_stub(address(mtls_credit), good, with_token=False) as stub:
        refused = error_details(await get_balance_error(stub))
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert refused.reason == "TOKEN_MISSING"
    # With a token too, the call runs: an unknown account.
    async with credit_stub(address(mtls_credit), good) as stub:
        answered = error_details(await get_balance_error(stub))
    assert answered.code == grpc.StatusCode.NOT_FOUND
    assert answered.reason == "ACCOUNT_NOT_FOUND"


@pytest.mark.parametrize(
    "client",
    ["no certificate", "certificate from another CA", "plaintext", "not trusting the server", "wrong server name"],
)
async def test_clients_without_a_trusted_certificate_are_refused_in_the_handshake(
    mtls_credit: Runtime, pki: Pki, client: str
) -> None:
    roots = pki.ca.certificate_pem
    channel_credentials: grpc.ChannelCredentials | None = {
        "no certificate": credentials(roots, None),
        "certificate from another CA": credentials(roots, pki.rogue_client),
        "plaintext": None,
        # The client checks the server too: a server its roots did not sign is refused.
        "not trusting the server": credentials(pki.rogue_ca.certificate_pem, pki.client),
        "wrong server name": credentials(roots, pki.client),
    }[client]
    server_name = "other.example" if client == "wrong server name" else None
    before = calls_started(mtls_credit, "GetBalance")
    # Every call carries a valid token: only the transport can be what refuses it.
    async with credit_stub(address(mtls_credit), channel_credentials, server_name=server_name) as stub:
        error = await get_balance_error(stub)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert calls_started(mtls_credit, "GetBalance") == before, "a refused client reached the server"


async def test_without_a_client_ca_the_port_is_tls_and_takes_clients_without_certificates(
    tls_database_url: str, pki: Pki
) -> None:
    async with running_credit(credit_tls_settings(tls_database_url, pki, mutual=False)) as runtime:
        async with credit_stub(address(runtime), credentials(pki.ca.certificate_pem, None)) as stub:
            answered = error_details(await get_balance_error(stub))
        assert answered.reason == "ACCOUNT_NOT_FOUND"
        async with credit_stub(address(runtime), None) as stub:
            assert (await get_balance_error(stub)).code() == grpc.StatusCode.UNAVAILABLE


async def test_grpcurl_with_the_client_certificate_lists_the_services_through_tls(
    mtls_credit: Runtime, pki: Pki
) -> None:
    tls_flags = ["-cacert", str(pki.ca.certificate_file), "-cert", str(pki.client.certificate_file)]
    tls_flags += ["-key", str(pki.client.key_file)]
    listed = await asyncio.to_thread(grpcurl, *tls_flags, address(mtls_credit), "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {CREDIT_SERVICE_NAME, HEALTH, REFLECTION}

    # A named server, as in a cluster: the certificate carries `credit`.
    checked = await asyncio.to_thread(
        grpcurl, *tls_flags, "-servername", "credit", "-d", json.dumps({"service": CREDIT_SERVICE_NAME}),
        address(mtls_credit), f"{HEALTH}/Check",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}

    # A call: the TLS and the token together.
    balance = await asyncio.to_thread(
        grpcurl, *tls_flags, "-H", f"authorization: Bearer {token()}",
        "-d", json.dumps({"owner_id": str(uuid.uuid4())}), address(mtls_credit), f"{CREDIT_SERVICE_NAME}/GetBalance",
    )  # fmt: skip
    assert "ACCOUNT_NOT_FOUND" in balance.stderr, balance.stderr

    # Refused: grpcurl would retry the dial until its timeout, so a short one.
    refused = ("-connect-timeout", "2")
    without_certificate = await asyncio.to_thread(
        grpcurl, *refused, "-cacert", str(pki.ca.certificate_file), address(mtls_credit), "list"
    )
    assert without_certificate.returncode != 0
    plaintext = await asyncio.to_thread(grpcurl, *refused, "-plaintext", address(mtls_credit), "list")
    assert plaintext.returncode != 0
    assert CREDIT_SERVICE_NAME not in plaintext.stdout + without_certificate.stdout


@pytest.mark.parametrize("certificate", ["from the CA", "from another CA"])
async def test_the_gateway_reaches_a_mutual_tls_service_only_with_a_certificate_from_the_ca(
    mtls_credit: Runtime, pki: Pki, tmp_path: Path, certificate: str
) -> None:
    # The production overlay's gateway: the real Envoy, mutual TLS to the services.
    leaf = pki.client if certificate == "from the CA" else pki.rogue_client
    upstream_tls = UpstreamTls(
        ca_file=str(pki.ca.certificate_file),
        certificate_file=str(leaf.certificate_file),
        key_file=str(leaf.key_file),
        server_name="localhost",
    )
    async with running_gateway(
        tmp_path, booking_upstream="127.0.0.1:1", credit_upstream=address(mtls_credit), upstream_tls=upstream_tls
    ) as gateway:
        response = await request_json("GET", f"{gateway.url}/v1/accounts/{uuid.uuid4()}/balance")
    if leaf is pki.client:
        assert response.status == 404, response.text
        assert "ACCOUNT_NOT_FOUND" in response.text
    else:
        assert response.status == 503, response.text  # the handshake failed: no upstream


# --- the plaintext health port ---------------------------------------------------------------------


def health_protoset(directory: Path) -> Path:
    """grpc.health.v1 as a descriptor set, for grpcurl against a port without reflection."""
    file_set = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(file_set.file.add())
    path = directory / "health.protoset"
    path.write_bytes(file_set.SerializeToString())
    return path


async def test_the_health_port_answers_in_plaintext_and_serves_nothing_but_health(
    mtls_credit: Runtime, tmp_path: Path
) -> None:
    assert mtls_credit.health_port not in (0, mtls_credit.port)
    assert await health_check(health_address(mtls_credit)) == "SERVING"
    assert await health_check(health_address(mtls_credit), "") == "SERVING"

    # No service behind it, not even with a token.
    async with credit_stub(health_address(mtls_credit), None) as stub:
        assert (await get_balance_error(stub)).code() == grpc.StatusCode.UNIMPLEMENTED
    # No reflection either: grpcurl needs the health proto to talk to it, and then it works.
    listed = await asyncio.to_thread(grpcurl, "-plaintext", health_address(mtls_credit), "list")
    assert listed.returncode != 0
    assert CREDIT_SERVICE_NAME not in listed.stdout
    checked = await asyncio.to_thread(
        grpcurl, "-plaintext", "-protoset", str(health_protoset(tmp_path)),
        "-d", json.dumps({"service": CREDIT_SERVICE_NAME}), health_address(mtls_credit), f"{HEALTH}/Check",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}


async def test_the_tls_port_refuses_a_plaintext_health_check(mtls_credit: Runtime) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health_check(address(mtls_credit))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_health_port_reports_the_graceful_shutdown_and_closes_last(tls_database_url: str, pki: Pki) -> None:
    async with running_credit(credit_tls_settings(tls_database_url, pki)) as runtime:
        target = health_address(runtime)
        async with grpc.aio.insecure_channel(target) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=CREDIT_SERVICE_NAME))
            first = await asyncio.wait_for(watch.read(), CALL_TIMEOUT_S)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(runtime.stop())
            # The same HealthServicer as the TLS port: SIGTERM's NOT_SERVING reaches the probes here.
            second = await asyncio.wait_for(watch.read(), CALL_TIMEOUT_S)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_check(target)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # closed once the runtime stopped


async def test_a_health_port_that_cannot_listen_stops_the_start(tls_database_url: str, pki: Pki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = credit_tls_settings(tls_database_url, pki, CREDIT_HEALTH_ADDRESS=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start_credit(settings)


# --- both services as processes, booking calling credit over mutual TLS -----------------------------


def key_material(pki: Pki) -> list[str]:
    """Lines of every private key's PEM body: none may appear in any log."""
    lines = []
    for leaf in (pki.server, pki.client, pki.rogue_client):
        lines += [line for line in leaf.key_pem.decode().splitlines() if not line.startswith("-----")]
    return lines


def last_event(stack: Stack, process_index: int, event: str) -> dict[str, Any]:
    process = stack.processes[process_index]
    events = [e for e in log_events(process) if e.get("event") == event]
    assert events, f"no {event} in the log of {process.module}:\n{process.output()}"
    return events[-1]


async def test_booking_calls_credit_over_mutual_tls_end_to_end(
    postgres_server_url: str, tmp_path: Path, pki: Pki
) -> None:
    async with running_stack(postgres_server_url, tmp_path / "logs", tls=StackTls(pki)) as stack:
        world = await World.create(stack.booking_stub(0), stack.credit_stub(), credits=100, credit_cost=10)
        booking = (await world.booking.CreateBooking(world.booking_request(future_hour(3, 10)), timeout=10)).booking
        assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
        assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
        # Reserve and commit went to credit, over mutual TLS (the only port it has).
        assert await stack.buckets(world.client_id) == (90, 0, 10, 100)
        # What the kubelet sees: plaintext health on the health ports, nothing on the gRPC ports.
        for process, service in ((stack.credit, CREDIT_SERVICE_NAME), (stack.bookings[0], BOOKING_SERVICE_NAME)):
            assert await health_check(process.health_address, service) == "SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_check(process.address, service)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

        credit_started = last_event(stack, 0, "grpc_server_started")
        booking_started = last_event(stack, 1, "grpc_server_started")
        assert credit_started["transport"] == booking_started["transport"] == "mtls"
        assert credit_started["certificate_not_valid_after"]
        client = last_event(stack, 1, "credit_client_configured")
        assert client["transport"] == "mtls"
        assert client["server_name"] == "localhost"
        for index in (0, 1):
            assert last_event(stack, index, "health_server_started")["transport"] == "plaintext"

        # The same booking process without its client certificate, then with a rogue one.
        booking_process = stack.bookings[0]
        for overrides in (
            {"BOOKING_CREDIT_TLS_CERT_FILE": None, "BOOKING_CREDIT_TLS_KEY_FILE": None},
            {
                "BOOKING_CREDIT_TLS_CERT_FILE": str(pki.rogue_client.certificate_file),
                "BOOKING_CREDIT_TLS_KEY_FILE": str(pki.rogue_client.key_file),
            },
        ):
            await stack.restart(booking_process, overrides)
            request = world.booking_request(future_hour(4, 10))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                # Waits for the reconnect to the restarted booking process, not for credit.
                await stack.booking_stub(0).CreateBooking(request, timeout=10, wait_for_ready=True)
            refused = error_details(raised.value)
            assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "CREDIT_SERVICE_UNAVAILABLE")
            assert await stack.buckets(world.client_id) == (90, 0, 10, 100)  # nothing held

        logs = stack.logs()
        for line in key_material(pki):
            assert line not in logs
        assert "PRIVATE KEY" not in logs


# --- configuration errors --------------------------------------------------------------------------


CONFIGURATION_CASES = {
    # id: (module, variables -> a file of the test, what the error message starts with)
    "credit-cert-without-key": (
        "credit_service",
        {"CREDIT_TLS_CERT_FILE": "server.crt"},
        "CREDIT_TLS_KEY_FILE is required with CREDIT_TLS_CERT_FILE",
    ),
    "credit-cert-not-pem": (
        "credit_service",
        {"CREDIT_TLS_CERT_FILE": "garbage", "CREDIT_TLS_KEY_FILE": "server.key"},
        "CREDIT_TLS_CERT_FILE: ",
    ),
    "credit-client-ca-unreadable": (
        "credit_service",
        {
            "CREDIT_TLS_CERT_FILE": "server.crt",
            "CREDIT_TLS_KEY_FILE": "server.key",
            "CREDIT_TLS_CLIENT_CA_FILE": "missing",
        },
        "CREDIT_TLS_CLIENT_CA_FILE: cannot read",
    ),
    "booking-key-not-pem": (
        "booking_service",
        {"BOOKING_TLS_CERT_FILE": "server.crt", "BOOKING_TLS_KEY_FILE": "garbage"},
        "BOOKING_TLS_KEY_FILE: ",
    ),
    "booking-client-without-ca": (
        "booking_service",
        {"BOOKING_CREDIT_TLS_CERT_FILE": "client.crt", "BOOKING_CREDIT_TLS_KEY_FILE": "client.key"},
        "BOOKING_CREDIT_TLS_CERT_FILE needs BOOKING_CREDIT_TLS_CA_FILE",
    ),
    "booking-client-ca-not-pem": (
        "booking_service",
        {"BOOKING_CREDIT_TLS_CA_FILE": "garbage"},
        "BOOKING_CREDIT_TLS_CA_FILE: ",
    ),
}


@pytest.mark.parametrize(("module", "variables", "message"), CONFIGURATION_CASES.values(), ids=CONFIGURATION_CASES)
async def test_configuration_errors_exit_2_naming_the_variable(
    pki: Pki, tmp_path: Path, module: str, variables: Mapping[str, str], message: str
) -> None:
    files = {
        "server.crt": pki.server.certificate_file,
        "server.key": pki.server.key_file,
        "client.crt": pki.client.certificate_file,
        "client.key": pki.client.key_file,
        "missing": tmp_path / "missing.pem",
        "garbage": tmp_path / "garbage.pem",
    }
    files["garbage"].write_text("not PEM at all\n")
    prefix = "CREDIT" if module == "credit_service" else "BOOKING"
    # Nothing listens on port 1: the start must fail before it ever tries the database.
    env = server_environment(prefix, "postgresql://nobody@127.0.0.1:1/none")
    env |= {name: str(files[value]) for name, value in variables.items()}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", module],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == CONFIG_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert result.stderr.startswith(f"configuration error: {message}"), result.stderr
    assert "Traceback" not in result.stderr
