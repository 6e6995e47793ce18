"""The HTTP/JSON gateway end to end: the real Envoy binary, transcoding to the real services.

Every call here goes over HTTP/1.1 through an Envoy started from a configuration rendered by
`devstack.gateway` (the same code that renders deploy/envoy/envoy.yaml and `make run`'s copy),
with only the ports changed. `envoy --mode validate` on the checked-in file is in test_devstack.py.

A second, "degraded" gateway has its credit upstream on a port that refuses connections (503)
and its booking upstream on a booking server of its own, whose credit service accepts
connections but never answers: the only bound on such a call is the service's default deadline.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from booking_service.config import BookingSettings
from booking_service.server import start as start_booking
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit.auth import CLIENT
from tests.support.auth import authorized_channel, token
from tests.support.gateway import Gateway, HttpResponse, request_json, running_gateway
from tests.support.stack import fresh_database, server_environment, wait_serving
from tests.support.world import World, eventually, future_hour

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
ALL_DAYS = [
    "DAY_OF_WEEK_MONDAY",
    "DAY_OF_WEEK_TUESDAY",
    "DAY_OF_WEEK_WEDNESDAY",
    "DAY_OF_WEEK_THURSDAY",
    "DAY_OF_WEEK_FRIDAY",
    "DAY_OF_WEEK_SATURDAY",
    "DAY_OF_WEEK_SUNDAY",
]
# The degraded gateway gives each JSON call 1 s (its grpc-timeout), while its booking server's
# budget for calls without a deadline is 30 s, one credit call may take up to 10 s and Envoy's
# route allows 15 s.
GATEWAY_DEADLINE_S = 1.0
DEFAULT_DEADLINE_S = 30.0
CREDIT_CALL_TIMEOUT_S = 10.0


def rfc3339(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Api:
    """JSON calls against one gateway."""

    gateway: Gateway

    async def get(self, path: str, **query: str) -> HttpResponse:
        suffix = f"?{urlencode(query)}" if query else ""
        return await request_json("GET", f"{self.gateway.url}{path}{suffix}")

    async def post(self, path: str, body: object) -> HttpResponse:
        return await request_json("POST", f"{self.gateway.url}{path}", body)

    async def ok(self, method: str, path: str, body: object = None) -> Any:
        response = await request_json(method, f"{self.gateway.url}{path}", body)
        assert response.status == 200, f"{method} {path}: {response.status} {response.text}"
        assert response.content_type.startswith("application/json"), response.content_type
        return response.json()

    async def create_therapist(self, time_zone: str = "UTC") -> str:
        created = await self.ok(
            "POST",
            "/v1/therapists",
            {
                "request_id": str(uuid.uuid4()),
                "therapist": {"display_name": "Dr. Ada", "time_zone": time_zone, "booking_horizon_days": 365},
            },
        )
        therapist_id: str = created["therapist"]["therapist_id"]
        return therapist_id

    async def open_all_week(self, therapist_id: str) -> Any:
        windows = [{"day_of_week": day, "window": {"start_time": "00:00", "end_time": "24:00"}} for day in ALL_DAYS]
        return await self.ok("PUT", f"/v1/therapists/{therapist_id}/weekly-schedule", {"windows": windows})

    async def create_session_type(self, therapist_id: str, credit_cost: int = 10) -> str:
        created = await self.ok(
            "POST",
            f"/v1/therapists/{therapist_id}/session-types",
            {
                "request_id": str(uuid.uuid4()),
                "session_type": {"name": "Consultation", "duration_minutes": 50, "credit_cost": credit_cost},
            },
        )
        session_type_id: str = created["session_type"]["session_type_id"]
        return session_type_id


def assert_rpc_error(response: HttpResponse, http_status: int, code: int, *reasons: str) -> dict[str, Any]:
    """A gRPC error as the transcoder renders it: google.rpc.Status JSON with one ErrorInfo,
    whose reason is one of `reasons`."""
    assert response.status == http_status, response.text
    assert response.content_type.startswith("application/json"), response.content_type
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["message"], body
    infos = [detail for detail in body["details"] if detail["@type"] == ERROR_INFO]
    assert len(infos) == 1, body
    assert infos[0]["reason"] in reasons, body
    assert infos[0]["domain"] in ("booking.v1.BookingService", "credit.v1.CreditService"), body
    return body


def assert_gateway_error(response: HttpResponse, http_status: int, code: int, reason: str) -> dict[str, Any]:
    """A refusal by Envoy itself: the same JSON shape, with one ErrorInfo of the domain "gateway"."""
    assert response.status == http_status, response.text
    assert response.content_type.startswith("application/json"), response.content_type
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["message"].strip(), body
    assert body["details"] == [
        {"@type": ERROR_INFO, "reason": reason, "domain": "gateway"},
    ], body
    return body


def error_info(body: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = next(detail for detail in body["details"] if detail["@type"] == ERROR_INFO)
    return info


@pytest.fixture(scope="module")
async def gateway(
    booking_address: str, credit_address: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    directory = tmp_path_factory.mktemp("gateway")
    async with running_gateway(directory, booking_upstream=booking_address, credit_upstream=credit_address) as started:
        yield started


@pytest.fixture
def api(gateway: Gateway) -> Api:
    return Api(gateway)


@pytest.fixture(scope="module")
def refusing_address() -> Iterator[str]:
    """A port held by a bound socket that does not listen: every connection is refused, and no
    other process can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def silent_address() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
async def impatient_booking_address(postgres_server_url: str, silent_address: str) -> AsyncIterator[str]:
    """A booking server of its own whose credit service never answers."""
    database_url = await fresh_database(postgres_server_url, "gateway_booking")
    settings = BookingSettings.from_environment(
        server_environment(
            "BOOKING",
            database_url,
            BOOKING_CREDIT_TARGET=silent_address,
            BOOKING_DEFAULT_RPC_DEADLINE_S=str(DEFAULT_DEADLINE_S),
            BOOKING_CREDIT_CALL_TIMEOUT_S=str(CREDIT_CALL_TIMEOUT_S),
            BOOKING_RECONCILE_INTERVAL_S="3600",
        )
    )
    runtime = await start_booking(settings)
    try:
        address = f"127.0.0.1:{runtime.port}"
        await wait_serving(address, BOOKING_SERVICE_NAME)
        yield address
    finally:
        await runtime.stop()


@pytest.fixture(scope="module")
async def degraded_gateway(
    impatient_booking_address: str, refusing_address: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    directory = tmp_path_factory.mktemp("degraded-gateway")
    async with running_gateway(
        directory,
        booking_upstream=impatient_booking_address,
        credit_upstream=refusing_address,
        upstream_deadline_ms=int(GATEWAY_DEADLINE_S * 1000),
    ) as started:
        yield started


# --- the public API, end to end ---------------------------------------------------------------


async def test_admin_calls_make_a_bookable_therapist_over_http(api: Api) -> None:
    therapist_id = await api.create_therapist(time_zone="Europe/London")
    schedule = await api.open_all_week(therapist_id)
    session_type_id = await api.create_session_type(therapist_id, credit_cost=7)

    therapist = await api.ok("GET", f"/v1/therapists/{therapist_id}")
    stored = await api.ok("GET", f"/v1/therapists/{therapist_id}/schedule")
    types = await api.ok("GET", f"/v1/therapists/{therapist_id}/session-types")

    assert therapist["therapist"]["display_name"] == "Dr. Ada"
    assert therapist["therapist"]["time_zone"] == "Europe/London"
    # Primitive fields are printed even when zero, under their proto names.
    assert therapist["therapist"]["buffer_before_minutes"] == 0
    assert len(schedule["windows"]) == 7
    assert stored["time_zone"] == "Europe/London"
    assert {w["day_of_week"] for w in stored["weekly_windows"]} == set(ALL_DAYS)
    # int64 is a JSON string in the proto3 JSON mapping; int32 a number.
    assert types["session_types"] == [
        {
            "session_type_id": session_type_id,
            "therapist_id": therapist_id,
            "name": "Consultation",
            "duration_minutes": 50,
            "credit_cost": "7",
            "late_cancellation_refund_percent": 0,
            "no_show_refund_percent": 0,
            "start_step_minutes": 15,
        }
    ]


async def test_a_client_books_reads_and_cancels_over_http(api: Api) -> None:
    therapist_id = await api.create_therapist()
    await api.open_all_week(therapist_id)
    session_type_id = await api.create_session_type(therapist_id, credit_cost=10)
    client_id = str(uuid.uuid4())
    granted = await api.ok(
        "POST",
        f"/v1/accounts/{client_id}:grant",
        {"request_id": str(uuid.uuid4()), "amount": 100, "kind": "GRANT_KIND_PURCHASE"},
    )
    balance = await api.ok("GET", f"/v1/accounts/{client_id}/balance")
    start = future_hour(days_ahead=3, hour=10)
    slots = await api.ok(
        "GET",
        f"/v1/therapists/{therapist_id}/slots?"
        + urlencode(
            {
                "session_type_id": session_type_id,
                "start_time": rfc3339(start),
                "end_time": rfc3339(start + timedelta(hours=2)),
            }
        ),
    )
    first_slot = slots["slots"][0]
    booking_request = {
        "request_id": str(uuid.uuid4()),
        "client_id": client_id,
        "therapist_id": therapist_id,
        "session_type_id": session_type_id,
        "start_time": first_slot["start_time"],
    }
    created = await api.ok("POST", "/v1/bookings", booking_request)
    booking_id = created["booking"]["booking_id"]
    repeated = await api.ok("POST", "/v1/bookings", booking_request)
    read = await api.ok("GET", f"/v1/bookings/{booking_id}")
    after_booking = await api.ok("GET", f"/v1/accounts/{client_id}/balance")
    listed = await api.ok("GET", f"/v1/bookings?{urlencode({'client_id': client_id})}")
    cancelled = await api.ok(
        "POST",
        f"/v1/bookings/{booking_id}:cancel",
        {"actor": "CANCELLATION_ACTOR_CLIENT", "reason": "CANCELLATION_REASON_NO_LONGER_NEEDED"},
    )

    assert granted["balance"]["available"] == "100"
    assert granted["entry"]["kind"] == "LEDGER_ENTRY_KIND_GRANT"
    assert balance["balance"] == {**granted["balance"], "update_time": balance["balance"]["update_time"]}
    # The UTC instant, and the same instant in the therapist's zone.
    assert start <= datetime.fromisoformat(first_slot["start_time"]) < start + timedelta(hours=1)
    assert first_slot["local_start"].endswith("+00:00")
    assert slots["time_zone"] == "UTC"
    assert created["booking"]["status"] == "BOOKING_STATUS_CONFIRMED"
    assert created["booking"]["start_time"] == first_slot["start_time"]
    assert created["booking"]["credit_cost"] == "10"
    assert repeated["booking"]["booking_id"] == booking_id  # idempotent by request_id
    assert read["booking"]["booking_id"] == booking_id
    assert read["booking"]["payment_status"] == "PAYMENT_STATUS_PAID"
    assert (after_booking["balance"]["available"], after_booking["balance"]["spent"]) == ("90", "10")
    assert [b["booking_id"] for b in listed["bookings"]] == [booking_id]
    assert cancelled["booking"]["status"] == "BOOKING_STATUS_CANCELLED"
    assert cancelled["booking"]["cancellation"]["actor"] == "CANCELLATION_ACTOR_CLIENT"
    assert cancelled["booking"]["cancellation"]["refunded_credits"] == "10"

    async def balance_now() -> Any:
        return (await api.ok("GET", f"/v1/accounts/{client_id}/balance"))["balance"]

    refunded = await eventually(balance_now, lambda b: b["available"] == "100")
    assert (refunded["available"], refunded["spent"], refunded["granted"]) == ("100", "0", "100")


async def test_unknown_json_body_fields_are_ignored(api: Api) -> None:
    owner_id = str(uuid.uuid4())

    granted = await api.ok(
        "POST",
        f"/v1/accounts/{owner_id}:grant",
        {"request_id": str(uuid.uuid4()), "amount": 5, "kind": "GRANT_KIND_PROMOTION", "no_such_field": 1},
    )

    assert granted["balance"]["available"] == "5"


# --- errors: each class to its HTTP status, with google.rpc.Status JSON ------------------------


async def test_invalid_argument_is_400_with_field_violations(api: Api) -> None:
    response = await api.post(
        "/v1/bookings", {"request_id": str(uuid.uuid4()), "client_id": "not-a-uuid", "therapist_id": str(uuid.uuid4())}
    )

    body = assert_rpc_error(response, 400, 3, "INVALID_ARGUMENT")
    bad_requests = [detail for detail in body["details"] if detail["@type"] == BAD_REQUEST]
    assert len(bad_requests) == 1
    fields = {violation["field"] for violation in bad_requests[0]["field_violations"]}
    assert {"client_id", "session_type_id", "start_time"} <= fields
    assert "therapist_id" not in fields


async def test_insufficient_credits_is_400_failed_precondition(api: Api, world: World) -> None:
    poor_client = await world.new_client(credits=5)
    start = future_hour(days_ahead=4, hour=11)

    response = await api.post(
        "/v1/bookings",
        {
            "request_id": str(uuid.uuid4()),
            "client_id": poor_client,
            "therapist_id": world.therapist_id,
            "session_type_id": world.session_type_id,
            "start_time": rfc3339(start),
        },
    )

    body = assert_rpc_error(response, 400, 9, "INSUFFICIENT_CREDITS")
    metadata = error_info(body)["metadata"]
    assert (metadata["available"], metadata["requested"]) == ("5", "10")


async def test_unknown_therapist_is_404(api: Api) -> None:
    therapist_id = str(uuid.uuid4())

    response = await api.get(f"/v1/therapists/{therapist_id}")

    body = assert_rpc_error(response, 404, 5, "THERAPIST_NOT_FOUND")
    assert error_info(body)["metadata"] == {"therapist_id": therapist_id}


async def test_unknown_account_is_404_never_a_zero_balance(api: Api) -> None:
    owner_id = str(uuid.uuid4())

    response = await api.get(f"/v1/accounts/{owner_id}/balance")

    body = assert_rpc_error(response, 404, 5, "ACCOUNT_NOT_FOUND")
    assert error_info(body)["domain"] == "credit.v1.CreditService"


async def test_no_token_is_401_and_a_forbidden_call_403_as_json(gateway: Gateway) -> None:
    owner_id = str(uuid.uuid4())
    url = f"{gateway.url}/v1/accounts/{owner_id}/balance"

    missing = await request_json("GET", url, headers={"authorization": ""})
    expired = await request_json(
        "GET", url, headers={"authorization": f"Bearer {token(owner_id, [CLIENT], ttl_s=60, now_s=1_000_000)}"}
    )
    anothers = await request_json("GET", url, headers={"authorization": f"Bearer {token(uuid.uuid4(), [CLIENT])}"})
    own = await request_json("GET", url, headers={"authorization": f"Bearer {token(owner_id, [CLIENT])}"})

    assert_rpc_error(missing, 401, 16, "TOKEN_MISSING")
    assert_rpc_error(expired, 401, 16, "TOKEN_EXPIRED")
    assert_rpc_error(anothers, 403, 7, "PERMISSION_DENIED")
    # The Authorization header reached the service: the client's own (missing) account.
    assert_rpc_error(own, 404, 5, "ACCOUNT_NOT_FOUND")


async def test_a_request_id_reused_with_other_values_is_409(api: Api) -> None:
    owner_id, request_id = str(uuid.uuid4()), str(uuid.uuid4())
    first = {"request_id": request_id, "amount": 5, "kind": "GRANT_KIND_PURCHASE"}
    await api.ok("POST", f"/v1/accounts/{owner_id}:grant", first)

    response = await api.post(f"/v1/accounts/{owner_id}:grant", {**first, "amount": 6})

    body = assert_rpc_error(response, 409, 6, "REQUEST_ID_REUSED")
    assert error_info(body)["metadata"] == {"request_id": request_id}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/no-such-thing"),
        ("GET", "/"),
        ("POST", "/v1/therapists/3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b/no-such-thing"),
        # A known path with a method it does not have.
        ("DELETE", "/v1/accounts/3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b/balance"),
    ],
)
async def test_an_unknown_path_is_404(gateway: Gateway, method: str, path: str) -> None:
    response = await request_json(method, f"{gateway.url}{path}", {} if method == "POST" else None)

    body = assert_gateway_error(response, 404, 5, "ROUTE_NOT_FOUND")
    assert path in body["message"]


async def test_an_unknown_query_parameter_is_400(api: Api, world: World) -> None:
    start = future_hour(days_ahead=3)

    response = await api.get(
        f"/v1/therapists/{world.therapist_id}/slots",
        sesion_type_id=world.session_type_id,  # misspelt on purpose
        start_time=rfc3339(start),
        end_time=rfc3339(start + timedelta(hours=1)),
    )

    body = assert_gateway_error(response, 400, 3, "INVALID_ARGUMENT")
    assert "sesion_type_id" in body["message"]


async def test_a_down_backend_is_503_with_a_json_body(degraded_gateway: Gateway) -> None:
    response = await request_json("GET", f"{degraded_gateway.url}/v1/accounts/{uuid.uuid4()}/balance")
    healthy_side = await request_json("GET", f"{degraded_gateway.url}/v1/therapists/{uuid.uuid4()}")

    body = assert_gateway_error(response, 503, 14, "SERVICE_UNAVAILABLE")
    # Envoy's own words ("upstream connect error ... reset reason") are not the caller's business.
    assert body["message"] == "the service is unavailable; retry later"
    # Only the routes of the service that is down fail.
    assert_rpc_error(healthy_side, 404, 5, "THERAPIST_NOT_FOUND")


async def test_a_transcoded_call_carries_the_gateways_deadline(degraded_gateway: Gateway) -> None:
    """The gateway sends each JSON call with its own grpc-timeout (1 s here), and that is what
    bounds a call stuck on a credit service that never answers: not the booking service's budget
    for calls without a deadline (30 s), the credit call's own cap (10 s), nor Envoy's route
    timeout (15 s). A caller's grpc-timeout header is not passed on: neither a shorter one nor
    one that is not a timeout at all changes the answer."""
    api = Api(degraded_gateway)
    therapist_id = await api.create_therapist()
    await api.open_all_week(therapist_id)
    session_type_id = await api.create_session_type(therapist_id)
    started = time.monotonic()

    response = await api.post(
        "/v1/bookings",
        {
            "request_id": str(uuid.uuid4()),
            "client_id": str(uuid.uuid4()),
            "therapist_id": therapist_id,
            "session_type_id": session_type_id,
            "start_time": rfc3339(future_hour(days_ahead=3)),
        },
    )

    elapsed_s = time.monotonic() - started
    # The credit call got the remaining budget minus the service's margin, and timed out.
    assert_rpc_error(response, 504, 4, "CREDIT_SERVICE_TIMEOUT")
    assert GATEWAY_DEADLINE_S * 0.5 <= elapsed_s < GATEWAY_DEADLINE_S + 2.0, elapsed_s
    for caller_timeout in ("junk", "1n", "99999999H"):
        read = await request_json(
            "GET", f"{degraded_gateway.url}/v1/therapists/{therapist_id}", headers={"grpc-timeout": caller_timeout}
        )
        assert read.status == 200, (caller_timeout, read.text)


async def test_a_backend_that_never_answers_is_504_after_the_route_timeout(
    silent_address: str, refusing_address: str, tmp_path: Path
) -> None:
    async with running_gateway(
        tmp_path,
        booking_upstream=silent_address,
        credit_upstream=refusing_address,
        route_timeout_s=1,
        upstream_deadline_ms=500,
    ) as gateway:
        started = time.monotonic()

        response = await request_json("GET", f"{gateway.url}/v1/therapists/{uuid.uuid4()}")

        elapsed_s = time.monotonic() - started
    body = assert_gateway_error(response, 504, 4, "GATEWAY_TIMEOUT")
    assert body["message"] == "the service did not answer in time"
    assert 0.9 <= elapsed_s < 5.0, elapsed_s


# --- the internal reservation RPCs ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/reservations:reserve",
        "/v1/reservations/{reservation_id}:commit",
        "/v1/reservations/{reservation_id}:cancel",
        "/v1/reservations/{reservation_id}:refund",
        "/v1/accounts/{owner_id}:reserve",
        # The gRPC path itself, as JSON: the transcoder maps only annotated methods.
        "/credit.v1.CreditService/ReserveCredits",
    ],
)
async def test_the_internal_reservation_rpcs_have_no_http_route(
    gateway: Gateway, credit_stub: credit_pb2_grpc.CreditServiceStub, path: str
) -> None:
    owner_id, reservation_id = str(uuid.uuid4()), str(uuid.uuid4())
    credit = cast("CreditServiceAsyncStub", credit_stub)
    await credit.GrantCredits(
        credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()), owner_id=owner_id, amount=20, kind=credit_pb2.GRANT_KIND_PURCHASE
        )
    )
    url = gateway.url + path.format(reservation_id=reservation_id, owner_id=owner_id)

    response = await request_json(
        "POST", url, {"reservation_id": reservation_id, "owner_id": owner_id, "amount": 5, "reference": "http"}
    )

    assert_gateway_error(response, 404, 5, "ROUTE_NOT_FOUND")
    balance = (await credit.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner_id))).balance
    assert (balance.available, balance.held) == (20, 0)


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def _post_grpc_over_http1(url: str, message: bytes) -> tuple[int, str, bytes]:
    request = urllib.request.Request(  # noqa: S310  # loopback http
        url,
        data=_grpc_frame(message),
        method="POST",
        headers={"content-type": "application/grpc", "te": "trailers", "authorization": f"Bearer {token()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310  # loopback http
        return response.status, response.headers.get("content-type", ""), response.read()


async def test_native_grpc_through_the_gateway_reaches_public_rpcs_only(
    gateway: Gateway, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    """The gateway routes each HTTP-annotated method by its exact gRPC path, for transcoded and
    native gRPC calls alike. The internal reservation RPCs have no route: a gRPC client (or any
    HTTP client sending content-type application/grpc) cannot hold, commit, release or refund
    credits through the public port. Services not routed (health, reflection) are UNIMPLEMENTED."""
    credit = cast("CreditServiceAsyncStub", credit_stub)
    owner_id = str(uuid.uuid4())
    await credit.GrantCredits(
        credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()), owner_id=owner_id, amount=20, kind=credit_pb2.GRANT_KIND_PURCHASE
        )
    )
    hold = str(uuid.uuid4())

    async with authorized_channel(gateway.grpc_target) as channel:
        through_gateway = credit_pb2_grpc.CreditServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await through_gateway.ReserveCredits(
                credit_pb2.ReserveCreditsRequest(reservation_id=hold, owner_id=owner_id, amount=3, reference="grpc"),
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await through_gateway.GetBalance(credit_pb2.GetBalanceRequest(owner_id="not-a-uuid"), timeout=10)
        public = await through_gateway.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner_id), timeout=10)
        health: Any = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unrouted:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    http1_status = await asyncio.to_thread(
        _post_grpc_status,
        f"{gateway.url}/credit.v1.CreditService/CommitReservation",
        credit_pb2.CommitReservationRequest(reservation_id=hold).SerializeToString(),
    )

    assert internal.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert public.balance.available == 20
    # The rich error details survive the proxy for gRPC clients too.
    status = rpc_status.from_call(cast(grpc.Call, refused.value))
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(status.details) == 2
    assert unrouted.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Envoy answers a gRPC request it has no route for with grpc-status 12 (UNIMPLEMENTED).
    assert http1_status == (200, "12")
    balance = (await credit.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner_id))).balance
    assert (balance.available, balance.held) == (20, 0)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await credit.GetReservation(credit_pb2.GetReservationRequest(reservation_id=hold))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def _post_grpc_status(url: str, message: bytes) -> tuple[int, str]:
    """POSTs a gRPC-framed message over HTTP/1.1, as curl could; returns (HTTP status, grpc-status)."""
    request = urllib.request.Request(  # noqa: S310  # loopback http
        url,
        data=struct.pack(">?I", False, len(message)) + message,
        method="POST",
        headers={"content-type": "application/grpc", "te": "trailers", "authorization": f"Bearer {token()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310  # loopback http
            response.read()
            return response.status, response.headers.get("grpc-status", "")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("grpc-status", "")
