"""A caller of the services through the client package alone, run by the client package's test
with the Python of a virtual environment that has nothing but that package installed.

It imports no code of this repository: only `therapy_booking_client` and the generated stubs it
ships. It connects once, says whether the server's packages are importable (they must not be),
then answers one JSON command per line of its standard input with JSON lines on its standard
output, so that the test can act (stop, kill, restart a service) between its steps:

    {"op": "book", "token": ..., "client_id": ..., "therapist_id": ..., "session_type_id": ...,
     "start_time": "2030-01-01T10:00:00Z"}
        -> {"event": "sending"}, then {"event": "booked", ...} or {"event": "refused", ...}
    {"op": "quit"}
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from typing import Any

from google.protobuf import timestamp_pb2

from booking.v1 import booking_pb2
from therapy_booking_client import BookingClient, Refusal

CALL_TIMEOUT_S = 60.0
SERVER_PACKAGES = ("booking_service", "credit_service", "service_kit", "asyncpg", "devstack")


class CommandToken:
    """A token provider of the caller's own (the client takes any): the current command's token,
    counting how often the client asked for it."""

    def __init__(self) -> None:
        self.value = ""
        self.asked = 0

    async def token(self) -> str:
        self.asked += 1
        return self.value


def say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def book(client: BookingClient, tokens: CommandToken, command: dict[str, Any]) -> None:
    tokens.value = command["token"]
    start = timestamp_pb2.Timestamp()
    start.FromJsonString(command["start_time"])
    # No request_id: the client gives the request one, and every retry carries that one.
    request = booking_pb2.CreateBookingRequest(
        client_id=command["client_id"],
        therapist_id=command["therapist_id"],
        session_type_id=command["session_type_id"],
        start_time=start,
    )
    say(event="sending")
    try:
        response = await client.CreateBooking(request, timeout=CALL_TIMEOUT_S)
    except Refusal as refusal:
        say(
            event="refused",
            request_id=request.request_id,
            kind=type(refusal).__name__,
            kinds=[kind.__name__ for kind in type(refusal).__mro__],
            code=refusal.code.name,
            reason=refusal.reason,
            domain=refusal.domain,
            metadata=dict(refusal.metadata),
            tokens_asked=tokens.asked,
        )
        return
    booking = response.booking
    say(
        event="booked",
        request_id=request.request_id,
        booking_id=booking.booking_id,
        booked_request_id=booking.request_id,
        status=booking_pb2.BookingStatus.Name(booking.status),
        tokens_asked=tokens.asked,
    )


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--booking", required=True, help="host:port of the booking service")
    arguments = parser.parse_args()
    tokens = CommandToken()
    say(event="ready", importable=[name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is not None])
    async with BookingClient.connect(arguments.booking, tokens=tokens) as client:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            command = json.loads(line)
            if command["op"] == "quit":
                return 0
            await book(client, tokens, command)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
