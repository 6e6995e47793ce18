"""The client package (clients/python), installed alone in a fresh virtual environment, against the
services run as real processes: it books a session, rides through a booking-service restart
with a retry that carries the same request id, and raises the typed refusal for
INSUFFICIENT_CREDITS.

The environment is made once per run: `python -m venv`, then pip installs a copy of
clients/python (so the build leaves nothing in the repository) with its dependencies (grpcio,
protobuf, googleapis-common-protos, grpcio-status) from pip's cache or PyPI. The caller is
tests/support/client_scenario.py, run by that environment's Python: it imports no code of this
repository.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from service_kit.auth import CLIENT
from tests.support.auth import token
from tests.support.processes import Stack, log_events, running_stack
from tests.support.stack import ROOT
from tests.support.world import World, future_hour

CLIENT_SOURCE = ROOT / "clients" / "python"
SCENARIO = ROOT / "tests" / "support" / "client_scenario.py"
INSTALL_TIMEOUT_S = 300
LINE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a new virtual environment with the client package installed, and nothing else."""
    root = tmp_path_factory.mktemp("client-package")
    source = root / "source"
    shutil.copytree(CLIENT_SOURCE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


class Caller:
    """The scenario process: one JSON command in, JSON events out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def next_event(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), LINE_TIMEOUT_S)
        assert line, f"the caller ended: {await self._errors()}"
        event: dict[str, Any] = json.loads(line)
        return event

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()

    async def _errors(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode(errors="replace")[-3000:]


@pytest.fixture
async def stack(postgres_server_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(postgres_server_url, tmp_path) as started:
        yield started


@pytest.fixture
async def caller(client_python: Path, stack: Stack) -> AsyncIterator[Caller]:
    process = await asyncio.create_subprocess_exec(
        str(client_python),
        str(SCENARIO),
        "--booking",
        stack.bookings[0].address,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=client_python.parent,  # not the repository: nothing of it is importable
    )
    try:
        yield Caller(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_client_alone_books_rides_through_a_restart_and_raises_typed_refusals(
    caller: Caller, stack: Stack
) -> None:
    world = await World.create(stack.booking_stub(0), stack.credit_stub(0), credits=25)
    poor_client = await world.new_client(credits=5)
    booking_process = stack.bookings[0]

    def command(client_id: str, hour: int) -> dict[str, Any]:
        return {
            "op": "book",
            "token": token(client_id, [CLIENT]),
            "client_id": client_id,
            "therapist_id": world.therapist_id,
            "session_type_id": world.session_type_id,
            "start_time": future_hour(days_ahead=3, hour=hour).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    ready = await caller.next_event()
    assert ready == {"event": "ready", "importable": []}  # no server package, no database driver

    # 1. A booking, with a request_id the client made up.
    await caller.send(**command(world.client_id, 9))
    assert (await caller.next_event())["event"] == "sending"
    first = await caller.next_event()
    assert first["event"] == "booked", first
    assert first["status"] == "BOOKING_STATUS_CONFIRMED"
    assert first["booked_request_id"] == first["request_id"] != ""

    # 2. Through a restart. The service is frozen, so the call goes out on the open connection
    #    and gets no answer; then the process dies (the connection resets: UNAVAILABLE) and
    #    comes back on the same port. Only a retry of the call can book it.
    stack.freeze(booking_process)
    await caller.send(**command(world.client_id, 11))
    assert (await caller.next_event())["event"] == "sending"
    await stack.kill(booking_process)
    await stack.start(booking_process)
    second = await caller.next_event()
    assert second["event"] == "booked", second
    assert second["booked_request_id"] == second["request_id"]
    sessions = await stack.booking_db.fetch(
        "SELECT booking_id FROM booking.sessions WHERE request_id = $1", second["request_id"]
    )
    assert [str(row["booking_id"]) for row in sessions] == [second["booking_id"]]  # booked once
    # The restarted process served it, under the caller's request id (x-request-id), once.
    served = [
        event
        for event in log_events(booking_process)
        if event.get("event") == "rpc_finished" and event.get("rpc") == "CreateBooking"
    ]
    assert [event["request_id"] for event in served].count(second["request_id"]) == 1

    # 3. A refusal, typed by its reason, with its metadata.
    await caller.send(**command(poor_client, 13))
    assert (await caller.next_event())["event"] == "sending"
    refused = await caller.next_event()
    assert refused["event"] == "refused", refused
    assert refused["kind"] == "InsufficientCredits"
    assert {"FailedPrecondition", "Refusal"} <= set(refused["kinds"])
    assert (refused["code"], refused["reason"]) == ("FAILED_PRECONDITION", "INSUFFICIENT_CREDITS")
    assert (refused["metadata"]["available"], refused["metadata"]["requested"]) == ("5", "10")
    # The caller's own token provider was asked once per call.
    assert refused["tokens_asked"] == 3

    await caller.send(op="quit")
    assert await asyncio.wait_for(caller.process.wait(), LINE_TIMEOUT_S) == 0
    balance = await world.balance()
    assert (balance.available, balance.spent) == (5, 20)


def test_the_package_ships_the_same_generated_code_as_gen() -> None:
    for package in ("booking", "credit"):
        for path in (ROOT / "gen" / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                copy = CLIENT_SOURCE / "src" / path.relative_to(ROOT / "gen")
                assert copy.read_bytes() == path.read_bytes(), copy


@pytest.mark.parametrize("document", ["docs/client.md", "clients/python/README.md"])
def test_the_documented_examples_are_python_that_uses_the_package(document: str) -> None:
    text = (ROOT / document).read_text()
    blocks = text.split("```python\n")[1:]
    assert blocks, document
    for block in blocks:
        code = block.split("```", 1)[0]
        compile(code, document, "exec")
        assert "from therapy_booking_client import" in code
        assert "CreateBooking(" in code
