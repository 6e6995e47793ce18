"""The byte-level hostile tier over HTTP: raw requests, written byte by byte over sockets, against
every public HTTP route of the real gateway and services, with each role and with none.

An HTTP library refuses to send most of these (bytes that are not UTF-8 in a URL, a NUL in a
header, two lengths for one body), so they go out as they are (tests/support/raw_http.py). Every
one must be refused with a documented answer: a 4xx (or 503/504 under overload, which does not
happen here), a google.rpc.Status JSON body with one ErrorInfo whose reason is UPPER_SNAKE, no
internal name in it (no class, module, traceback or Envoy internals), no ERROR line or traceback
in the services' output, and no row of the scene changed. After the storm a booking still goes
through.

The routes come from gen/openapi.json, so a new route is covered without editing this file.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from booking.v1 import booking_pb2_grpc
from credit.v1 import credit_pb2_grpc
from devstack.gateway import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEADERS_COUNT, MAX_URL_BYTES
from service_kit.auth import ADMIN, CLIENT, SERVICE, THERAPIST
from tests.support.auth import token
from tests.support.gateway import Gateway, request_json
from tests.support.raw_http import RawResponse, http_bytes, raw_request
from tests.support.stack import ROOT
from tests.support.world import World, future_hour, scene_rows

OPENAPI = ROOT / "gen" / "openapi.json"
ROLES = ("none", "client", "therapist", "admin", "service")
# Requests in flight at once: enough to finish quickly, far below the per-caller bound (64).
PARALLEL_REQUESTS = 8
REASON = re.compile(r"[A-Z][A-Z0-9_]{1,62}")
# What a caller must never read in an answer: the services' code and Envoy's insides.
INTERNAL_NAMES = re.compile(
    r"Traceback|<class|Exception|Error parsing|DecodeError|\.py\b|booking_service|credit_service|service_kit|"
    r"asyncpg|psycopg|sqlstate|upstream|envoy|cluster|grpc-|reset reason",
    re.IGNORECASE,
)
SERVER_TROUBLE = re.compile(r"\[error|\[critical|\"level\": \"(error|critical)\"|Traceback|Invalid encoding", re.I)


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    has_body: bool

    @property
    def name(self) -> str:
        return f"{self.method.upper()} {self.template}"


def public_routes() -> list[Route]:
    document = json.loads(OPENAPI.read_text())
    return [
        Route(method, template, "requestBody" in operation)
        for template, item in document["paths"].items()
        for method, operation in item.items()
    ]


@dataclass(frozen=True)
class Scene:
    world: World
    booking_id: str

    def path(self, route: Route, spoil: str | None = None) -> bytes:
        """The route's path with real ids; `spoil` replaces the last parameter's value as it is."""
        values = {
            "therapist_id": self.world.therapist_id,
            "therapist.therapist_id": self.world.therapist_id,
            "date": "2099-01-02",
            "booking_id": self.booking_id,
            "owner_id": self.world.client_id,
            "reservation_id": self.booking_id,
            "event_id": str(uuid.uuid4()),
            "session_type_id": self.world.session_type_id,
            "session_type.therapist_id": self.world.therapist_id,
            "session_type.session_type_id": self.world.session_type_id,
            # Endpoints and deliveries nobody made: whatever gets past the gateway finds nothing.
            "endpoint_id": str(uuid.uuid4()),
            "endpoint.endpoint_id": str(uuid.uuid4()),
            "delivery_id": str(uuid.uuid4()),
            "feed_token": "A" * 43,
            "entry_id": str(uuid.uuid4()),
            "offer_id": str(uuid.uuid4()),
        }
        names = re.findall(r"\{([^}]+)\}", route.template)
        path = route.template.encode()
        for index, name in enumerate(names):
            value = spoil.encode("latin-1") if spoil is not None and index == len(names) - 1 else values[name].encode()
            path = path.replace(b"{" + name.encode() + b"}", value)
        return path

    def token(self, role: str) -> str | None:
        subjects = {
            "client": (self.world.client_id, CLIENT),
            "therapist": (self.world.therapist_id, THERAPIST),
            "admin": (str(uuid.uuid4()), ADMIN),
            "service": ("booking-service", SERVICE),
        }
        if role == "none":
            return None
        subject, granted = subjects[role]
        return token(subject, [granted])


@pytest.fixture
def gateway(api_gateway: Gateway) -> Gateway:
    return api_gateway


@pytest.fixture(scope="module")
async def scene(
    booking_stub: booking_pb2_grpc.BookingServiceStub, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> Scene:
    world = await World.create(booking_stub, credit_stub, credits=1000)
    booking = await world.book(future_hour(days_ahead=5, hour=9))
    return Scene(world, booking.booking_id)


# --- the hostile requests ------------------------------------------------------------------------

Spoiler = Callable[[Scene, Route, list[tuple[bytes, bytes]]], bytes]
JSON = (b"content-type", b"application/json")


def _request(
    route: Route, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None = None, **options: Any
) -> bytes:
    if body is None:
        body = b"{}" if route.has_body else b""
    return http_bytes(route.method.upper().encode(), path, [JSON, *headers] if body else headers, body, **options)


def _path_spoiler(value: str) -> Spoiler:
    def spoil(scene: Scene, route: Route, headers: list[tuple[bytes, bytes]]) -> bytes:
        return _request(route, scene.path(route, value), headers)

    return spoil


def _query_spoiler(query: bytes) -> Spoiler:
    def spoil(scene: Scene, route: Route, headers: list[tuple[bytes, bytes]]) -> bytes:
        return _request(route, scene.path(route) + b"?" + query, headers)

    return spoil


def _body_spoiler(body: bytes) -> Spoiler:
    def spoil(scene: Scene, route: Route, headers: list[tuple[bytes, bytes]]) -> bytes:
        return _request(route, scene.path(route), headers, body)

    return spoil


def _header_spoiler(*extra: tuple[bytes, bytes], replace_authorization: bool = False) -> Spoiler:
    def spoil(scene: Scene, route: Route, headers: list[tuple[bytes, bytes]]) -> bytes:
        kept = [h for h in headers if h[0] != b"authorization"] if replace_authorization else headers
        # A body no route accepts, so that a header the gateway lets through cannot make a
        # request that succeeds (and changes data) in this tier.
        return _request(route, scene.path(route), [*kept, *extra], b"{'not':'json'}")

    return spoil


def _raw_spoiler(build: Callable[[bytes, list[tuple[bytes, bytes]]], bytes]) -> Spoiler:
    def spoil(scene: Scene, route: Route, headers: list[tuple[bytes, bytes]]) -> bytes:
        return build(scene.path(route), headers)

    return spoil


def _head(line: bytes, path: bytes, headers: list[tuple[bytes, bytes]], extra: bytes) -> bytes:
    lines = [line.replace(b"PATH", path), b"host: gateway", b"connection: close"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n" + extra


PATH_SPOILERS: dict[str, Spoiler] = {
    "overlong-utf8": _path_spoiler("%c0%af"),
    "not-utf8": _path_spoiler("%ff%fe"),
    "encoded-surrogate": _path_spoiler("%ed%a0%80"),
    "encoded-nul": _path_spoiler("%00"),
    "encoded-newline": _path_spoiler("a%0ab"),
    "raw-byte-ff": _path_spoiler("\xff"),
    "raw-control-byte": _path_spoiler("\x01"),
    "lone-percent": _path_spoiler("%"),
    "encoded-slash": _path_spoiler("..%2F..%2Fetc"),
    "url-over-limit": _path_spoiler("a" * (MAX_URL_BYTES + 1)),
}
QUERY_SPOILERS: dict[str, Spoiler] = {
    "query-not-utf8": _query_spoiler(b"page_token=%ff%fe"),
    "query-name-not-utf8": _query_spoiler(b"%ff=1"),
    "query-unknown": _query_spoiler(b"no_such_field=1"),
    "query-raw-bytes": _query_spoiler(b"page_token=\xff"),
    "query-page-size-overflow": _query_spoiler(b"page_size=99999999999999999999&no_such_field=1"),
}
BODY_SPOILERS: dict[str, Spoiler] = {
    "single-quotes": _body_spoiler(b"{'request_id':'x'}"),
    "trailing-comma": _body_spoiler(b'{"request_id":"x",}'),
    "x-escape": _body_spoiler(b'{"request_id":"\\x41"}'),
    "lone-surrogate": _body_spoiler(b'{"request_id":"\\ud800"}'),
    "body-not-utf8": _body_spoiler(b'{"request_id":"\xff\xfe"}'),
    "nan": _body_spoiler(b'{"amount":NaN}'),
    "deep-nesting": _body_spoiler(b"[" * 30_000),
    "huge-number": _body_spoiler(b'{"amount":1e99999}'),
    "not-an-object": _body_spoiler(b'"just a string"'),
    "body-over-limit": _body_spoiler(b'{"note":"' + b"a" * MAX_REQUEST_BODY_BYTES + b'"}'),
}
HEADER_SPOILERS: dict[str, Spoiler] = {
    "request-id-not-ascii": _header_spoiler((b"x-request-id", b"r\xff\xfe")),
    "request-id-too-long": _header_spoiler((b"x-request-id", b"r" * 500)),
    "traceparent-not-ascii": _header_spoiler((b"traceparent", b"00-\xff")),
    "authorization-not-ascii": _header_spoiler((b"authorization", b"Bearer \xff\xfe"), replace_authorization=True),
    "token-over-8-kib": _header_spoiler((b"authorization", b"Bearer " + b"a" * 9000), replace_authorization=True),
    "header-nul": _header_spoiler((b"x-note", b"a\x00b")),
    "header-del": _header_spoiler((b"x-note", b"a\x7fb")),
    "too-many-headers": _header_spoiler(*((f"x-h{i}".encode(), b"1") for i in range(MAX_REQUEST_HEADERS_COUNT + 1))),
    "headers-over-16-kib": _header_spoiler((b"x-big", b"b" * 17 * 1024)),
    "grpc-transport-headers": _header_spoiler(
        (b"grpc-timeout", b"junk"), (b"grpc-encoding", b"gzip"), (b"te", b"gzip"), (b"x-envoy-max-retries", b"9")
    ),
    "http-1.0": _raw_spoiler(lambda path, headers: http_bytes(b"GET", path, headers, version=b"HTTP/1.0")),
    "bad-version": _raw_spoiler(lambda path, headers: http_bytes(b"GET", path, headers, version=b"HTTP/7.1")),
    "connect": _raw_spoiler(lambda path, headers: http_bytes(b"CONNECT", b"127.0.0.1:5432", headers)),
    "trace": _raw_spoiler(lambda path, headers: http_bytes(b"TRACE", path, headers)),
    "bad-method": _raw_spoiler(lambda path, headers: http_bytes(b"G\x00T", path, headers)),
    "two-lengths": _raw_spoiler(
        lambda path, headers: _head(
            b"POST PATH HTTP/1.1", path, headers, b"content-length: 2\r\ncontent-length: 9\r\n\r\n{}"
        )
    ),
    "length-and-chunked": _raw_spoiler(
        lambda path, headers: _head(
            b"POST PATH HTTP/1.1", path, headers, b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
    ),
    "bad-chunk": _raw_spoiler(
        lambda path, headers: _head(
            b"POST PATH HTTP/1.1", path, headers, b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
        )
    ),
    "header-without-colon": _raw_spoiler(
        lambda path, headers: _head(b"GET PATH HTTP/1.1", path, headers, b"no colon here\r\n\r\n")
    ),
    "no-host": _raw_spoiler(lambda path, headers: b"GET " + path + b" HTTP/1.1\r\nconnection: close\r\n\r\n"),
}


def spoilers_for(route: Route) -> dict[str, Spoiler]:
    chosen = dict(HEADER_SPOILERS)
    chosen.update(QUERY_SPOILERS)
    if "{" in route.template:
        chosen.update(PATH_SPOILERS)
    if route.has_body:
        chosen.update(BODY_SPOILERS)
    return chosen


# --- what every answer must be -------------------------------------------------------------------


def problems(response: RawResponse) -> list[str]:
    """What is wrong with an answer to a hostile request; nothing when it is a clean refusal."""
    found = []
    if response.status < 400:
        found.append(f"not refused: {response.status}")
    if response.status >= 500 and response.status not in (503, 504):
        found.append(f"server error {response.status}")
    if not (response.header("content-type") or "").startswith("application/json"):
        found.append(f"content-type {response.header('content-type')}")
    try:
        body = json.loads(response.body)
    except ValueError:
        return [*found, f"not JSON: {response.body[:200]!r}"]
    if not isinstance(body, dict) or not isinstance(body.get("code"), int) or body["code"] == 0:
        found.append("no code")
    elif body["code"] in (2, 13):
        found.append("UNKNOWN or INTERNAL")
    if not isinstance(body.get("message"), str) or not body["message"].strip():
        found.append("no message")
    infos = [d for d in body.get("details", []) if d.get("@type") == "type.googleapis.com/google.rpc.ErrorInfo"]
    if len(infos) != 1 or not REASON.fullmatch(str(infos[0].get("reason"))) or not infos[0].get("domain"):
        found.append(f"not one ErrorInfo with a reason: {body.get('details')}")
    if INTERNAL_NAMES.search(response.body.decode("utf-8", "replace")):
        found.append("internal name")
    return found


def hostile_requests(scene: Scene) -> Iterator[tuple[str, bytes]]:
    for role in ROLES:
        value = scene.token(role)
        headers = [] if value is None else [(b"authorization", f"Bearer {value}".encode())]
        for route in public_routes():
            for name, spoil in spoilers_for(route).items():
                yield f"{role} {route.name} {name}", spoil(scene, route, headers)


async def test_every_hostile_request_to_every_route_gets_a_clean_refusal_and_changes_nothing(
    gateway: Gateway,
    scene: Scene,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
    capfd: pytest.CaptureFixture[str],
) -> None:
    cases = list(hostile_requests(scene))
    before = await scene_rows(booking_db, credit_db, scene.world)
    capfd.readouterr()

    def send(case: tuple[str, bytes]) -> tuple[str, RawResponse]:
        return case[0], raw_request(gateway.settings.listen_port, case[1])

    with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
        answers = await asyncio.to_thread(lambda: list(pool.map(send, cases)))

    output = capfd.readouterr()
    failures = {name: found for name, response in answers if (found := problems(response))}
    assert not failures, f"{len(failures)} of {len(cases)}: " + json.dumps(dict(list(failures.items())[:20]), indent=1)
    assert await scene_rows(booking_db, credit_db, scene.world) == before
    trouble = [line for line in (output.out + output.err).splitlines() if SERVER_TROUBLE.search(line)]
    assert not trouble, trouble[:10]
    # The gateway and the services still serve: a booking goes through.
    start = future_hour(days_ahead=6, hour=15) + timedelta(minutes=0)
    booked = await request_json(
        "POST",
        f"{gateway.url}/v1/bookings",
        {
            "request_id": str(uuid.uuid4()),
            "client_id": scene.world.client_id,
            "therapist_id": scene.world.therapist_id,
            "session_type_id": scene.world.session_type_id,
            "start_time": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    assert booked.status == 200, booked.text
    assert len(cases) > 1000  # every route, role and spoiler: the tier did not shrink unnoticed
