"""A booking server of a test's own, in-process, on a database of the test's choosing: one per
test keeps its outbox worker off every other test's events; two on one database are two replicas
(each with its own memory: the rules cache, the batching)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from booking.v1 import booking_pb2_grpc
from booking_service.config import BookingSettings
from booking_service.server import start as start_booking
from booking_service.servicer import SERVICE_NAME
from service_kit.server import Runtime
from tests.support.auth import authorized_channel
from tests.support.stack import server_environment, wait_serving

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub

FAST_OUTBOX = {"BOOKING_OUTBOX_INTERVAL_S": "0.05", "BOOKING_OUTBOX_BASE_DELAY_S": "0.1"}


@dataclass
class Server:
    runtime: Runtime
    stub: BookingServiceAsyncStub
    database_url: str


@asynccontextmanager
async def booking_server(database_url: str, credit_address: str, **env: str) -> AsyncIterator[Server]:
    """A booking server on `database_url`, its outbox fast (FAST_OUTBOX, unless `env` says
    otherwise), serving, with an authorized stub."""
    settings = BookingSettings.from_environment(
        server_environment("BOOKING", database_url, BOOKING_CREDIT_TARGET=credit_address, **{**FAST_OUTBOX, **env})
    )
    runtime = await start_booking(settings)
    try:
        address = f"127.0.0.1:{runtime.port}"
        await wait_serving(address, SERVICE_NAME)
        async with authorized_channel(address) as channel:
            stub: BookingServiceAsyncStub = booking_pb2_grpc.BookingServiceStub(channel)
            yield Server(runtime, stub, database_url)
    finally:
        await runtime.stop()
