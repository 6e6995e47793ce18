"""The byte-level tier of hostile input: raw gRPC messages no protobuf library would send, to every
RPC of both services (and their health checks), with each role and with none.

Each corruption is a valid request's bytes with something appended or cut (tests/support/wire.py):
a string field that is not UTF-8, a tag with an impossible wire type, a value cut short, a number
past its type. The bytes go over a real HTTP/2 gRPC channel as a generic call (no serializer), so
nothing on the way repairs them. Invalid bytes in metadata go through a raw HTTP/2 connection (h2),
as gRPC's own client refuses to send them.

The rule checked for every answer: a documented status with an ErrorInfo reason of the service's
domain, never UNKNOWN or INTERNAL, no internal name in the message, BadRequest paths that name real
fields; bytes that are no message answer INVALID_ARGUMENT (INVALID_UTF8 naming the field, or
MALFORMED_REQUEST) to a caller allowed to make the call; no ERROR log line, from the services or
from grpc, for any of it; and no request that is not a message changes a row of either
database (those with numbers past their type may be valid requests, and may change rows).

The module runs its own pair of services on fresh databases with their workers all but idle, so
that a digest of every table before and after a batch of refused requests sees only what those
requests did.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import cast

import asyncpg
import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import structlog
from google.protobuf import descriptor
from grpc_health.v1 import health_pb2

from booking.v1 import booking_pb2
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from service_kit.auth import ADMIN, CLIENT, SERVICE, THERAPIST
from service_kit.errors import MAX_REASON_LENGTH, error_details
from service_kit.server import Runtime
from tests.integration.test_hostile_input import names_a_field, spares_of, valid_requests
from tests.support.auth import bearer, token
from tests.support.pair import own_services
from tests.support.wire import INVALID_UTF8, Corruption, Kind, corruptions, length_delimited
from tests.support.world import World, future_hour

HEALTH_CHECK = cast(
    descriptor.MethodDescriptor, health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
)
SERVICES = {
    BOOKING_SERVICE_NAME: booking_pb2.DESCRIPTOR.services_by_name["BookingService"],
    CREDIT_SERVICE_NAME: credit_pb2.DESCRIPTOR.services_by_name["CreditService"],
}
# Never an answer to anything a caller sends: the services and the database are up.
FORBIDDEN_CODES = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
REASON = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
LEAK = re.compile(r'Traceback|asyncpg|DecodeError|<class|File "|\b[A-Z][A-Za-z0-9]*(Error|Exception)\b')
INDEX = re.compile(r"\[\d+\]")
CALL_TIMEOUT_S = 5.0
ERROR_LEVELS = frozenset({"error", "critical", "exception"})
# Workers look this rarely here: nothing but the requests under test writes while a batch runs.
IDLE_INTERVAL_S = "600"


@dataclass(frozen=True)
class Caller:
    name: str
    metadata: tuple[tuple[str, str], ...]
    # Whether every rule lets this caller in (then bytes that are no message must be INVALID_ARGUMENT).
    allowed_everywhere: bool = False


@dataclass
class Stack:
    booking: Runtime
    credit: Runtime
    booking_db: asyncpg.Pool
    credit_db: asyncpg.Pool
    world: World


@pytest.fixture(scope="module")
async def stack(postgres_server_url: str) -> AsyncIterator[Stack]:
    async with own_services(
        postgres_server_url,
        "bytes",
        credit_env={"CREDIT_SWEEP_INTERVAL_S": IDLE_INTERVAL_S},
        booking_env={
            "BOOKING_RECONCILE_INTERVAL_S": IDLE_INTERVAL_S,
            "BOOKING_OUTBOX_INTERVAL_S": IDLE_INTERVAL_S,
            "BOOKING_VIDEO_PROVIDER": "none",
        },
    ) as services:
        world = await World.create(services.booking_stub, services.credit_stub)
        yield Stack(services.booking, services.credit, services.booking_db, services.credit_db, world)


def callers(world: World) -> list[Caller]:
    return [
        Caller("no token", ()),
        Caller("admin and service", bearer(token()), allowed_everywhere=True),
        Caller("the client", bearer(token(world.client_id, [CLIENT]))),
        Caller("the therapist", bearer(token(world.therapist_id, [THERAPIST]))),
        Caller("another service", bearer(token(uuid.uuid4(), [SERVICE]))),
        Caller("an admin", bearer(token(uuid.uuid4(), [ADMIN]))),
    ]


async def digest(pool: asyncpg.Pool) -> dict[str, tuple[int, int]]:
    """(rows, sum of row hashes) of every table of the database's own schemas."""
    tables = await pool.fetch(
        """SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) AS name FROM pg_tables
            WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"""
    )
    result = {}
    for table in tables:
        row = await pool.fetchrow(
            f"SELECT count(*) AS n, coalesce(sum(hashtext(t::text)::bigint), 0) AS h FROM {table['name']} t"
        )
        assert row is not None
        result[table["name"]] = (row["n"], row["h"])
    return result


@dataclass
class Answer:
    code: grpc.StatusCode
    reason: str | None
    violations: dict[str, str]
    shown: str


async def send(
    channel: grpc.aio.Channel, domain: str, method: descriptor.MethodDescriptor, raw: bytes, caller: Caller
) -> Answer:
    """Sends `raw` as `method`'s request to a server whose errors are of `domain`; checks the rule."""
    service = method.containing_service.full_name
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/{service}/{method.name}", request_serializer=None, response_deserializer=None
    )
    try:
        await call(raw, metadata=caller.metadata, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        shown = f"{service}/{method.name} as {caller.name} -> {details.code.name} {details.reason}: "
        shown += f"{details.message!r:.300}"
        assert details.code not in FORBIDDEN_CODES, shown
        assert details.reason is not None and REASON.fullmatch(details.reason), shown
        assert len(details.reason) <= MAX_REASON_LENGTH, shown
        assert details.domain == domain, shown
        said = [details.message, error.details() or "", *details.field_violations.values()]
        assert not any(LEAK.search(text) for text in said), shown
        strays = [path for path in details.field_violations if not names_a_field(method.input_type, path)]
        assert not strays, f"violations name no field: {strays}; {shown}"
        return Answer(details.code, details.reason, details.field_violations, shown)
    return Answer(grpc.StatusCode.OK, None, {}, f"{service}/{method.name} as {caller.name} -> OK")


# RPCs anyone may call without a token (the request carries its own credential).
OPEN_RPCS = frozenset({"GetCalendarFeed"})


def check_malformed(answer: Answer, corruption: Corruption, caller: Caller) -> None:
    """What a request that is no message gets, by who sends it."""
    shown = f"{corruption.kind.value} ({corruption.label}): {answer.shown}"
    if not caller.metadata:
        assert answer.code == grpc.StatusCode.UNAUTHENTICATED, shown
        return
    if not caller.allowed_everywhere and answer.code == grpc.StatusCode.PERMISSION_DENIED:
        return  # authorization first, as for a well-formed request from this caller
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, shown
    if corruption.kind is Kind.INVALID_UTF8:
        assert answer.reason == "INVALID_UTF8", shown
        named = {INDEX.sub("", path) for path in answer.violations}
        assert corruption.field_path in named, shown
    else:
        assert answer.reason == "MALFORMED_REQUEST", shown


@pytest.fixture
def error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Every ERROR (or worse) line logged while the test runs, by the services or by grpc."""
    caplog.set_level(logging.WARNING)
    with structlog.testing.capture_logs() as events:
        found: list[str] = []
        yield found
    found += [str(event) for event in events if event.get("log_level") in ERROR_LEVELS]
    found += [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def scene(stack: Stack) -> dict[str, bytes]:
    """A valid request per RPC (the bytes each corruption starts from), over real rows."""
    world = stack.world
    first, second = await world.book(future_hour(3, 10)), await world.book(future_hour(4, 10))
    reservation_ids = (str(uuid.uuid4()), str(uuid.uuid4()))
    for reservation_id in reservation_ids:
        await world.credit.ReserveCredits(
            credit_pb2.ReserveCreditsRequest(
                reservation_id=reservation_id, owner_id=world.client_id, amount=5, reference="bytes"
            )
        )
    valid = valid_requests(world, (first.booking_id, second.booking_id), reservation_ids, await spares_of(world))
    return {name: request.SerializeToString() for name, request in valid.items()}


async def test_every_rpc_answers_bytes_that_are_no_message_cleanly(stack: Stack, error_logs: list[str]) -> None:
    valid = await scene(stack)
    addresses = {BOOKING_SERVICE_NAME: stack.booking.port, CREDIT_SERVICE_NAME: stack.credit.port}
    pools = {BOOKING_SERVICE_NAME: stack.booking_db, CREDIT_SERVICE_NAME: stack.credit_db}
    sent = 0
    for service, service_descriptor in SERVICES.items():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{addresses[service]}") as channel:
            methods: list[descriptor.MethodDescriptor] = [*service_descriptor.methods, HEALTH_CHECK]
            for method in methods:
                base = valid.get(method.full_name, b"")
                cases = corruptions(method.input_type, base)
                before = await digest(pools[service])
                for corruption in (c for c in cases if c.kind.always_malformed):
                    for caller in callers(stack.world):
                        answer = await send(channel, service, method, corruption.raw, caller)
                        if method is HEALTH_CHECK or method.name in OPEN_RPCS:  # open to all: nobody is refused there
                            assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, answer.shown
                        else:
                            check_malformed(answer, corruption, caller)
                        sent += 1
                assert await digest(pools[service]) == before, f"a refused request to {method.name} changed data"
                # Well-formed bytes with values past their type: may be valid, must be answered cleanly.
                for corruption in (c for c in cases if not c.kind.always_malformed):
                    for caller in callers(stack.world):
                        await send(channel, service, method, corruption.raw, caller)
                        sent += 1
    rpcs = sum(len(service.methods) for service in SERVICES.values())
    assert sent >= rpcs * len(callers(stack.world)) * 8, sent
    assert not error_logs, error_logs[:5]


def raw_grpc_call(port: int, path: str, headers: list[tuple[bytes, bytes]], message: bytes) -> dict[bytes, bytes]:
    """One unary gRPC call over a raw HTTP/2 connection (headers sent as given, unvalidated); the
    response's headers and trailers."""
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    connection = h2.connection.H2Connection(config)
    answer: dict[bytes, bytes] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT_S) as sock:
        connection.initiate_connection()
        stream_id = connection.get_next_available_stream_id()
        request_headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
        connection.send_headers(stream_id, request_headers)
        connection.send_data(stream_id, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        sock.sendall(connection.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the server closed the connection without an answer"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer.update(dict(event.headers))
                if isinstance(event, h2.events.StreamReset):
                    pytest.fail(f"stream reset: {event.error_code}")
                if isinstance(event, h2.events.StreamEnded):
                    return answer
            sock.sendall(connection.data_to_send())


@pytest.mark.parametrize("header", [b"x-request-id", b"traceparent", b"tracestate", b"x-anything"])
async def test_metadata_that_is_not_utf8_gets_a_normal_answer_and_no_error_log(
    stack: Stack, error_logs: list[str], header: bytes
) -> None:
    world = stack.world
    calls = [
        (
            stack.credit.port,
            "/credit.v1.CreditService/GetBalance",
            credit_pb2.GetBalanceRequest(owner_id=world.client_id),
        ),
        (
            stack.booking.port,
            "/booking.v1.BookingService/GetTherapist",
            booking_pb2.GetTherapistRequest(therapist_id=world.therapist_id),
        ),
    ]
    authorization = bearer(token())[0]
    for port, path, request in calls:
        for bad in INVALID_UTF8:
            headers = [(authorization[0].encode(), authorization[1].encode()), (header, b"value " + bad)]
            answer = await asyncio.to_thread(raw_grpc_call, port, path, headers, request.SerializeToString())
            assert answer.get(b"grpc-status") == b"0", (path, header, bad, answer)

    assert not error_logs, error_logs[:5]


async def test_an_authorization_header_that_is_not_utf8_is_unauthenticated(stack: Stack, error_logs: list[str]) -> None:
    request = credit_pb2.GetBalanceRequest(owner_id=stack.world.client_id).SerializeToString()
    for bad in INVALID_UTF8:
        headers = [(b"authorization", b"Bearer " + bad)]
        answer = await asyncio.to_thread(
            raw_grpc_call, stack.credit.port, "/credit.v1.CreditService/GetBalance", headers, request
        )
        assert answer.get(b"grpc-status") == str(grpc.StatusCode.UNAUTHENTICATED.value[0]).encode(), answer

    assert not error_logs, error_logs[:5]


async def test_streaming_methods_refuse_bytes_that_are_no_message_too(stack: Stack, error_logs: list[str]) -> None:
    """Health's Watch and reflection (open to anyone on the service port) decode like the rest."""
    not_utf8 = length_delimited(1, b"\xff")  # Watch: HealthCheckRequest.service
    list_services = length_delimited(7, b"\xc0\xaf")  # ServerReflectionRequest.list_services
    for port in (stack.booking.port, stack.credit.port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watcher: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
                "/grpc.health.v1.Health/Watch", None, None
            )
            watch = watcher(not_utf8, timeout=CALL_TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as watched:
                async for _ in watch:
                    pass
            reflect: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
            )

            async def one_request() -> AsyncIterator[bytes]:
                yield list_services

            with pytest.raises(grpc.aio.AioRpcError) as reflected:
                async for _ in reflect(one_request(), timeout=CALL_TIMEOUT_S):
                    pass
            for raised, field in ((watched.value, "service"), (reflected.value, "list_services")):
                details = error_details(raised)
                assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
                assert details.reason == "INVALID_UTF8" and set(details.field_violations) == {field}, details

    assert not error_logs, error_logs[:5]
