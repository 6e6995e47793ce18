"""Demo data for `make run`: a first booking in two pasted commands on a fresh clone.

On an empty development database (the embedded PostgreSQL of `make run`, with no therapist yet;
never an external server) the runner seeds, through the public RPCs with the demo admin's token:
a therapist in Europe/London with a weekly schedule, a session type, and credits for the demo
client whose token `make run` prints. Every call has a fixed request id, so a repeat (a start
that died half-way) returns the first result instead of making a second therapist. The ids are
kept in `.data/demo.json`, so a later `make run` on the same data prints the same commands.
`--no-seed` (or `DEVSTACK_SEED=false`) turns it off.

`commands` then prints two ready-to-paste curl commands for the gateway: the next free slots of
the demo therapist, and a booking of the first of them by the demo client.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from booking.v1 import booking_pb2, booking_pb2_grpc
from credit.v1 import credit_pb2, credit_pb2_grpc
from devstack.keys import DEMO_CLIENT_ID

THERAPIST_TIME_ZONE = "Europe/London"
WEEKLY_HOURS = ("08:00", "20:00")  # every day, in the therapist's zone
SESSION_MINUTES = 50
SESSION_CREDITS = 10
DEMO_CREDITS = 100
SLOT_SEARCH_DAYS = 7
CALL_TIMEOUT_S = 10.0
DEMO_FILE = "demo.json"


@dataclass(frozen=True)
class Demo:
    therapist_id: str
    session_type_id: str
    client_id: str = DEMO_CLIENT_ID

    def save(self, data_dir: Path) -> None:
        (data_dir / DEMO_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, data_dir: Path) -> Demo | None:
        path = data_dir / DEMO_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


async def database_is_empty(booking_database_url: str) -> bool:
    """No therapist at all: a database nobody has used yet (migrations applied by the service)."""
    connection = await asyncpg.connect(booking_database_url, timeout=CALL_TIMEOUT_S)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM booking.therapists")
    finally:
        await connection.close()
    return count == 0


async def seed(booking_target: str, credit_target: str, admin_token: str) -> Demo:
    """Creates the demo therapist, its schedule and session type, and the demo client's credits;
    idempotent (fixed request ids)."""
    metadata = (("authorization", f"Bearer {admin_token}"),)
    async with grpc.aio.insecure_channel(booking_target) as booking_channel:
        booking = booking_pb2_grpc.BookingServiceStub(booking_channel)
        therapist = await booking.CreateTherapist(
            booking_pb2.CreateTherapistRequest(
                request_id="demo-therapist",
                therapist=booking_pb2.Therapist(
                    display_name="Dr. Ada Demo",
                    time_zone=THERAPIST_TIME_ZONE,
                    minimum_notice_minutes=60,
                    booking_horizon_days=90,
                ),
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT_S,
        )
        therapist_id = therapist.therapist.therapist_id
        start, end = WEEKLY_HOURS
        await booking.SetWeeklySchedule(
            booking_pb2.SetWeeklyScheduleRequest(
                therapist_id=therapist_id,
                windows=[
                    booking_pb2.WeeklyWindow(
                        day_of_week=day,  # type: ignore[arg-type]  # DayOfWeek numbers 1..7
                        window=booking_pb2.TimeWindow(start_time=start, end_time=end),
                    )
                    for day in range(1, 8)
                ],
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT_S,
        )
        session_type = await booking.CreateSessionType(
            booking_pb2.CreateSessionTypeRequest(
                therapist_id=therapist_id,
                request_id="demo-session-type",
                session_type=booking_pb2.SessionType(
                    name="Consultation", duration_minutes=SESSION_MINUTES, credit_cost=SESSION_CREDITS
                ),
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT_S,
        )
    async with grpc.aio.insecure_channel(credit_target) as credit_channel:
        credit = credit_pb2_grpc.CreditServiceStub(credit_channel)
        await credit.GrantCredits(
            credit_pb2.GrantCreditsRequest(
                request_id="demo-credits",
                owner_id=DEMO_CLIENT_ID,
                amount=DEMO_CREDITS,
                kind=credit_pb2.GRANT_KIND_PURCHASE,
                note="make run demo credits",
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT_S,
        )
    return Demo(therapist_id=therapist_id, session_type_id=session_type.session_type.session_type_id)


def slot_range(now: datetime) -> tuple[str, str]:
    """From the next whole hour, SLOT_SEARCH_DAYS ahead: RFC 3339 in UTC."""
    start = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    end = start + timedelta(days=SLOT_SEARCH_DAYS)
    return _rfc3339(start), _rfc3339(end)


async def first_free_slot(booking_target: str, demo: Demo, token: str, now: datetime) -> str | None:
    """The start (RFC 3339) of the demo therapist's first free slot, as the printed command lists it."""
    start, end = slot_range(now)
    request = booking_pb2.ListAvailableSlotsRequest(
        therapist_id=demo.therapist_id,
        session_type_id=demo.session_type_id,
        start_time=_timestamp(start),
        end_time=_timestamp(end),
    )
    async with grpc.aio.insecure_channel(booking_target) as channel:
        stub = booking_pb2_grpc.BookingServiceStub(channel)
        response = await stub.ListAvailableSlots(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT_S
        )
    if not response.slots:
        return None
    return _rfc3339(response.slots[0].start_time.ToDatetime(tzinfo=UTC))


def commands(gateway_url: str, demo: Demo, first_slot: str | None, now: datetime) -> list[str]:
    """The two curl commands (with $CLIENT_TOKEN, which the runner prints just above)."""
    start, end = slot_range(now)
    lines = [
        "# the demo therapist's next free slots (the demo client's token)",
        f'curl -s -H "Authorization: Bearer $CLIENT_TOKEN" "{gateway_url}/v1/therapists/{demo.therapist_id}/slots'
        f'?session_type_id={demo.session_type_id}&start_time={start}&end_time={end}"',
    ]
    if first_slot is None:
        return [*lines, "# (no free slot in the next week: book another time from the list above)"]
    body = json.dumps(
        {
            "request_id": f"demo-{uuid.uuid4().hex[:12]}",
            "client_id": demo.client_id,
            "therapist_id": demo.therapist_id,
            "session_type_id": demo.session_type_id,
            "start_time": first_slot,
        },
        separators=(",", ":"),
    )
    return [
        *lines,
        f"# book the first of them ({first_slot}); {SESSION_CREDITS} of the demo client's credits pay for it",
        f'curl -s -X POST -H "Authorization: Bearer $CLIENT_TOKEN" -H "content-type: application/json" '
        f"{gateway_url}/v1/bookings -d '{body}'",
    ]


def _rfc3339(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp
