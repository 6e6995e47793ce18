"""Metrics and request context, observed from outside as an operator would.

The first part runs both services in-process with their metrics on 127.0.0.1:0, makes real
bookings through the public RPCs, scrapes /metrics over HTTP and checks that every counter moved
by exactly what those calls imply, and that the gauges read from the databases agree with SQL.

The second part runs both services as real processes with JSON logs and shows that one booking's
request id appears in the log lines of both services: the caller's when it sends one, made by
the booking service when it does not.
"""

from __future__ import annotations

import asyncio
import http.client
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from booking_service.metrics import OUTCOMES, booking_outcome
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from service_kit.config import ConfigError, listen_address
from service_kit.metrics import GrpcMetrics, new_registry
from service_kit.server import Runtime
from tests.support.pair import Services, own_services
from tests.support.processes import Stack, log_events, running_stack, wait_for
from tests.support.world import World, future_hour, refusal

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.timeout(120)

POOL_MAX_SIZE = 7
REFRESH_INTERVAL_S = "0.1"
SETTLE_TIMEOUT_S = 10.0
LOG_TIMEOUT_S = 10.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
async def services(postgres_server_url: str) -> AsyncIterator[Services]:
    """A credit and a booking server of this module's own: counters start from a known state.
    The outbox worker and the reconciler look rarely (each makes credit calls of its own), except
    where a test brings them work on purpose."""
    async with own_services(
        postgres_server_url,
        "observability",
        credit_env={
            "CREDIT_METRICS_REFRESH_INTERVAL_S": REFRESH_INTERVAL_S,
            "CREDIT_METRICS_SCAN_INTERVAL_S": REFRESH_INTERVAL_S,
            "CREDIT_DATABASE_POOL_MAX_SIZE": str(POOL_MAX_SIZE),
        },
        booking_env={
            "BOOKING_METRICS_REFRESH_INTERVAL_S": REFRESH_INTERVAL_S,
            "BOOKING_METRICS_SCAN_INTERVAL_S": REFRESH_INTERVAL_S,
            "BOOKING_DATABASE_POOL_MAX_SIZE": str(POOL_MAX_SIZE),
            # Stale means older than 60 s (the default): only holds the test backdates.
            "BOOKING_RECONCILE_INTERVAL_S": "0.2",
            # Bookings commit inline; an outbox pass racing them would add commit calls.
            "BOOKING_OUTBOX_INTERVAL_S": "600",
        },
    ) as services:
        yield services


# --- scraping ---


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        connection.close()


async def scrape(runtime: Runtime) -> Samples:
    assert runtime.metrics_port, "the metrics server is not running"
    status, content_type, body = await asyncio.to_thread(http_get, runtime.metrics_port, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain"), content_type
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a series not (yet) exported."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def grpc_labels(service: str, method: str, code: str | None = None) -> dict[str, str]:
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
    if code is not None:
        labels["grpc_code"] = code
    return labels


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def scraped_until(runtime: Runtime, expected: Mapping[tuple[str, frozenset[tuple[str, str]]], float]) -> Samples:
    """Scrapes until the gauges in `expected` show those values (they refresh periodically)."""

    async def matching() -> Samples | None:
        samples = await scrape(runtime)
        return samples if all(samples.get(key) == wanted for key, wanted in expected.items()) else None

    result: Samples = await wait_for(matching, timeout_s=SETTLE_TIMEOUT_S, what=f"gauges {dict(expected)}")
    return result


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


# --- metrics ---


def test_every_code_and_reason_maps_to_one_bounded_outcome() -> None:
    reasons = [None, "SLOT_UNAVAILABLE", "INSUFFICIENT_CREDITS", "OUTSIDE_AVAILABILITY", "SOMETHING_NEW"]
    for code in grpc.StatusCode:
        for reason in reasons:
            assert booking_outcome(code, reason) in OUTCOMES
    assert booking_outcome(grpc.StatusCode.OK, None) == "confirmed"
    assert booking_outcome(grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_FOUND") == "insufficient_credits"
    assert booking_outcome(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_NOTICE") == "outside_availability"
    assert booking_outcome(grpc.StatusCode.FAILED_PRECONDITION, "SOMETHING_NEW") == "other"
    assert booking_outcome(grpc.StatusCode.DEADLINE_EXCEEDED, "CREDIT_SERVICE_TIMEOUT") == "unavailable"
    assert booking_outcome(grpc.StatusCode.INTERNAL, "INTERNAL") == "other"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.0.0.0:9464", "0.0.0.0:9464"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("[::]:9465", "[::]:9465"),
        ("off", None),
        ("", None),
    ],
)
def test_the_metrics_address_is_host_port_or_off(raw: str, expected: str | None) -> None:
    assert listen_address({"X_METRICS_ADDRESS": raw}, "X_METRICS_ADDRESS", "127.0.0.1:9464") == expected
    assert listen_address({}, "X_METRICS_ADDRESS", raw or "off") == expected


@pytest.mark.parametrize("raw", ["9464", ":9464", "localhost:", "localhost:http", "localhost:70000"])
def test_a_malformed_metrics_address_is_a_configuration_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="X_METRICS_ADDRESS"):
        listen_address({"X_METRICS_ADDRESS": raw}, "X_METRICS_ADDRESS", "off")


async def test_bookings_move_the_server_client_and_product_counters_by_exactly_their_calls(
    services: Services,
) -> None:
    world = await World.create(services.booking_stub, services.credit_stub, credits=100, credit_cost=10)
    poor_client = await world.new_client(credits=5)
    other_client = await world.new_client(credits=100)
    booking_before, credit_before = await scrape(services.booking), await scrape(services.credit)

    await world.book(future_hour(days_ahead=3, hour=10))
    await world.book(future_hour(days_ahead=3, hour=12))
    taken = await refusal(
        services.booking_stub.CreateBooking(world.booking_request(future_hour(3, 10), client_id=other_client))
    )
    assert taken.reason == "SLOT_UNAVAILABLE"
    poor = await refusal(
        services.booking_stub.CreateBooking(world.booking_request(future_hour(4, 10), client_id=poor_client))
    )
    assert poor.reason == "INSUFFICIENT_CREDITS"
    too_far = await refusal(services.booking_stub.CreateBooking(world.booking_request(future_hour(500, 10))))
    assert too_far.reason == "BEYOND_BOOKING_HORIZON"
    malformed = world.booking_request(future_hour(5, 10))
    malformed.client_id = "not-a-uuid"
    assert (await refusal(services.booking_stub.CreateBooking(malformed))).code == grpc.StatusCode.INVALID_ARGUMENT

    booking_after, credit_after = await scrape(services.booking), await scrape(services.credit)
    booking, credit = BOOKING_SERVICE_NAME, CREDIT_SERVICE_NAME

    # The booking server: six CreateBooking calls, by code, each timed.
    create = grpc_labels(booking, "CreateBooking")
    assert delta(booking_before, booking_after, "grpc_server_started_total", **create) == 6
    assert delta(booking_before, booking_after, "grpc_server_handling_seconds_count", **create) == 6
    handled = {
        code: delta(
            booking_before, booking_after, "grpc_server_handled_total", **grpc_labels(booking, "CreateBooking", code)
        )
        for code in ("OK", "FailedPrecondition", "InvalidArgument", "Internal", "Unavailable")
    }
    assert handled == {"OK": 2, "FailedPrecondition": 3, "InvalidArgument": 1, "Internal": 0, "Unavailable": 0}

    # The product's view of the same six calls.
    outcomes = {
        outcome: delta(booking_before, booking_after, "booking_bookings_total", outcome=outcome) for outcome in OUTCOMES
    }
    assert outcomes == {
        "confirmed": 2,
        "slot_unavailable": 1,
        "insufficient_credits": 1,
        "outside_availability": 1,
        "aborted": 0,
        "unavailable": 0,
        "invalid": 1,
        "other": 0,
    }

    # Three holds asked for (the slot was refused before any credit moved, the horizon and the
    # malformed request too), two granted and committed, one refused; nothing cancelled.
    for side, (before, after, metric) in {
        "client": (booking_before, booking_after, "grpc_client_handled_total"),
        "server": (credit_before, credit_after, "grpc_server_handled_total"),
    }.items():
        calls = {
            (method, code): delta(before, after, metric, **grpc_labels(credit, method, code))
            for method in ("ReserveCredits", "CommitReservation", "CancelReservation")
            for code in ("OK", "FailedPrecondition")
        }
        assert calls == {
            ("ReserveCredits", "OK"): 2,
            ("ReserveCredits", "FailedPrecondition"): 1,
            ("CommitReservation", "OK"): 2,
            ("CommitReservation", "FailedPrecondition"): 0,
            ("CancelReservation", "OK"): 0,
            ("CancelReservation", "FailedPrecondition"): 0,
        }, side
    reserve = grpc_labels(credit, "ReserveCredits")
    assert delta(booking_before, booking_after, "grpc_client_started_total", **reserve) == 3
    assert delta(booking_before, booking_after, "grpc_client_handling_seconds_count", **reserve) == 3
    assert delta(credit_before, credit_after, "grpc_server_started_total", **reserve) == 3


async def test_series_of_every_method_exist_before_the_first_call(services: Services) -> None:
    samples = await scrape(services.credit)
    labels = grpc_labels(CREDIT_SERVICE_NAME, "RefundReservation")
    assert key("grpc_server_started_total", **labels) in samples
    assert key("grpc_server_handled_total", **labels, grpc_code="Unavailable") in samples
    assert not any(name.endswith("_created") for name, _ in samples), "no *_created series, as in Go"


async def test_reservation_gauges_agree_with_the_credit_database(services: Services) -> None:
    world = await World.create(services.booking_stub, services.credit_stub)
    await world.book(future_hour(days_ahead=6, hour=9))
    # A hold that is nobody's booking (the reconciler leaves it alone), made ten minutes old.
    hold_id = uuid.uuid4()
    await services.credit_stub.ReserveCredits(
        credit_pb2.ReserveCreditsRequest(
            reservation_id=str(hold_id), owner_id=world.client_id, amount=5, reference="manual:observability"
        )
    )
    await services.credit_db.execute(
        "UPDATE credit.reservations SET created_at = now() - interval '10 minutes' WHERE reservation_id = $1", hold_id
    )
    rows = await services.credit_db.fetch("SELECT status, count(*) AS n FROM credit.reservations GROUP BY status")
    by_state = {row["status"]: int(row["n"]) for row in rows}
    assert by_state.get("pending", 0) >= 1 and by_state.get("committed", 0) >= 1
    expected = {
        key("credit_reservations", state=state): float(by_state.get(state, 0))
        for state in ("pending", "committed", "released", "refunded")
    }

    async def aged() -> Samples | None:
        samples = await scraped_until(services.credit, expected)
        age_s = value(samples, "credit_oldest_pending_reservation_age_seconds")
        return samples if 600 <= age_s < 700 else None

    await wait_for(aged, timeout_s=SETTLE_TIMEOUT_S, what="the oldest pending hold's age near 600 s")
    await services.credit_stub.CancelReservation(credit_pb2.CancelReservationRequest(reservation_id=str(hold_id)))


async def test_outbox_gauges_count_pending_and_dead_rows(services: Services) -> None:
    """Rows written straight into the outbox: one due in the future (the worker would only take
    it after BOOKING_OUTBOX_INTERVAL_S anyway) and one dead letter. The module's earlier bookings
    left their side effects (notifications) pending, as this server's worker rarely looks: the
    gauges are compared with the rows already there."""
    counts = await services.booking_db.fetchrow(
        """SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead')
             FROM booking.outbox"""
    )
    assert counts is not None
    pending, dead = counts
    await scraped_until(
        services.booking, {key("booking_outbox_depth"): float(pending), key("booking_outbox_dead_letters"): float(dead)}
    )
    later = datetime.now(UTC) + timedelta(hours=1)
    inserted = []
    for status in ("pending", "dead"):
        event_id = uuid.uuid4()
        inserted.append(event_id)
        await services.booking_db.execute(
            """INSERT INTO booking.outbox (event_id, kind, booking_id, status, attempts, next_attempt_at)
               VALUES ($1, 'commit_reservation', $2, $3, 12, $4)""",
            event_id,
            uuid.uuid4(),
            status,
            later,
        )
    try:
        await scraped_until(
            services.booking,
            {key("booking_outbox_depth"): pending + 1.0, key("booking_outbox_dead_letters"): dead + 1.0},
        )
    finally:
        await services.booking_db.execute("DELETE FROM booking.outbox WHERE event_id = ANY($1::uuid[])", inserted)


async def test_the_reconciler_counts_what_it_releases(services: Services) -> None:
    """A booking's hold with no decision, older than BOOKING_RECONCILE_AFTER_S: the reconciler
    records `abort` and cancels it, and says so in the counter."""
    world = await World.create(services.booking_stub, services.credit_stub)
    before = await scrape(services.booking)
    hold_id = uuid.uuid4()
    await services.credit_stub.ReserveCredits(
        credit_pb2.ReserveCreditsRequest(
            reservation_id=str(hold_id), owner_id=world.client_id, amount=10, reference=f"booking:{hold_id}"
        )
    )
    await services.credit_db.execute(
        "UPDATE credit.reservations SET created_at = now() - interval '5 minutes' WHERE reservation_id = $1", hold_id
    )

    async def released() -> bool:
        status = await services.credit_db.fetchval(
            "SELECT status FROM credit.reservations WHERE reservation_id = $1", hold_id
        )
        return bool(status == "released")

    await wait_for(released, timeout_s=SETTLE_TIMEOUT_S, what="the stale hold released")
    after = await scrape(services.booking)
    assert delta(before, after, "booking_reconciler_actions_total", action="released") == 1
    assert delta(before, after, "booking_reconciler_actions_total", action="committed") == 0
    assert delta(before, after, "booking_reconciler_actions_total", action="deferred") == 0
    cancel = grpc_labels(CREDIT_SERVICE_NAME, "CancelReservation", "OK")
    assert delta(before, after, "grpc_client_handled_total", **cancel) == 1


async def test_database_pool_gauges_report_the_pool_against_its_bound(services: Services) -> None:
    for runtime, service in ((services.credit, "credit"), (services.booking, "booking")):
        samples = await scrape(runtime)
        assert value(samples, "db_pool_max_connections", service=service) == POOL_MAX_SIZE
        in_use = value(samples, "db_pool_connections", service=service, state="in_use")
        idle = value(samples, "db_pool_connections", service=service, state="idle")
        assert key("db_pool_connections", service=service, state="idle") in samples
        assert 1 <= in_use + idle <= POOL_MAX_SIZE  # the readiness check keeps at least one open


async def test_the_endpoint_serves_metrics_only(services: Services) -> None:
    port = services.credit.metrics_port
    assert (await asyncio.to_thread(http_get, port, "/"))[0] == 404
    assert (await asyncio.to_thread(http_get, port, "/metrics", "POST"))[0] == 405
    status, _, body = await asyncio.to_thread(http_get, port, "/metrics", "HEAD")
    assert (status, body) == (200, "")


async def test_the_client_interceptor_ends_a_call_whose_caller_is_cancelled() -> None:
    """grpc cancels a client interceptor's task, not the call under it, when the caller is
    cancelled: the interceptor must end the call, or a booking that gave up would let its
    credit call run on. A server that answers only when cancelled shows which happened."""
    server_saw_cancel = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            server_saw_cancel.set()
            raise
        return b""

    class Hanging(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_unary_rpc_method_handler(hang)

    registry = new_registry()
    metrics = GrpcMetrics(registry)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Hanging(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=[metrics.client_interceptor()]
        ) as channel:
            hang_rpc: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.v1.Hanging/Hang")
            call: asyncio.Future[bytes] = asyncio.ensure_future(hang_rpc(b"", timeout=30))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(server_saw_cancel.wait(), timeout=5)
    finally:
        await server.stop(0)
    labels = grpc_labels("test.v1.Hanging", "Hang")
    assert registry.get_sample_value("grpc_client_started_total", labels) == 1
    assert registry.get_sample_value("grpc_client_handled_total", {**labels, "grpc_code": "Canceled"}) == 1


# --- request ids and traces across both services, in their logs ---


def lines_with(events: list[dict[str, Any]], **fields: str) -> list[dict[str, Any]]:
    return [e for e in events if all(e.get(name) == wanted for name, wanted in fields.items())]


async def rpc_lines(stack: Stack, request_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The booking and the credit log lines of one request id, once the credit side has logged
    both of its calls (lines reach the files a moment after the answers)."""

    def found() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        booking = lines_with(log_events(stack.bookings[0]), request_id=request_id)
        credit = lines_with(log_events(stack.credit), request_id=request_id)
        finished = {e.get("rpc") for e in lines_with(credit, event="rpc_finished")}
        done = {"ReserveCredits", "CommitReservation"} <= finished and lines_with(booking, event="rpc_finished")
        return (booking, credit) if done else None

    result: tuple[list[dict[str, Any]], list[dict[str, Any]]] = await wait_for(
        found, timeout_s=LOG_TIMEOUT_S, what=f"log lines of request {request_id} in both services"
    )
    return result


async def test_one_request_id_runs_through_both_services_logs(postgres_server_url: str, tmp_path: Path) -> None:
    """Tracing off (the default): the request id joins the two services' lines, and nothing about
    traces is made per call (no trace ids in the lines: tests/integration/test_tracing.py has them
    with tracing on)."""
    async with running_stack(postgres_server_url, tmp_path) as stack:
        world = await World.create(stack.booking_stub(), stack.credit_stub())

        # The caller's request id is kept, and sent on to the credit service.
        request_id = f"observability-{uuid.uuid4()}"
        response = await world.booking.CreateBooking(
            world.booking_request(future_hour(days_ahead=2, hour=9)),
            metadata=(("x-request-id", request_id), ("traceparent", f"00-{'4b' * 16}-{'00f067aa' * 2}-01")),
        )
        booking_lines, credit_lines = await rpc_lines(stack, request_id)
        (create,) = lines_with(booking_lines, event="rpc_finished", rpc="CreateBooking")
        assert create["grpc_code"] == "OK"
        assert lines_with(booking_lines, event="booking_confirmed", booking_id=response.booking.booking_id)
        for rpc in ("ReserveCredits", "CommitReservation"):
            (line,) = lines_with(credit_lines, event="rpc_finished", rpc=rpc)
            assert line["grpc_code"] == "OK"
        assert not [line for line in booking_lines + credit_lines if "trace_id" in line or "span_id" in line]

        # Without one, the booking service makes one, and the credit service keeps it.
        response = await world.booking.CreateBooking(world.booking_request(future_hour(days_ahead=2, hour=11)))
        confirmed = lines_with(
            log_events(stack.bookings[0]), event="booking_confirmed", booking_id=response.booking.booking_id
        )
        assert len(confirmed) == 1, stack.logs()
        made_request_id = confirmed[0]["request_id"]
        assert made_request_id != request_id and len(made_request_id) == 32
        booking_lines, credit_lines = await rpc_lines(stack, made_request_id)
        assert lines_with(credit_lines, event="rpc_finished", rpc="ReserveCredits")
