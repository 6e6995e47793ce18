"""No bearer token and no signing key ever reaches a log line, whatever the call's outcome.

Both services run as real processes with debug logging, and their whole output (structlog lines,
tracebacks, anything gRPC prints) is searched after calls with good, expired, forged and
malformed tokens, and after booking calls that make the booking service use its own token.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from credit.v1 import credit_pb2
from service_kit.auth import ADMIN, CLIENT
from tests.support.auth import bearer, private_key_file, token
from tests.support.processes import running_stack
from tests.support.world import World

DEBUG = {"LOG_LEVEL": "debug"}


async def test_no_log_line_holds_a_token_or_a_key(postgres_server_url: str, tmp_path: Path) -> None:
    async with running_stack(postgres_server_url, tmp_path, booking_env=DEBUG, credit_env=DEBUG) as stack:
        world = await World.create(stack.booking_stub(), stack.credit_stub())
        client_token = token(world.client_id, [CLIENT])
        tokens = [
            client_token,
            token(uuid.uuid4(), [ADMIN]),
            token(world.client_id, [CLIENT], ttl_s=60, now_s=datetime.now(UTC).timestamp() - 3600),
            token(world.client_id, [CLIENT, ADMIN], key=Ed25519PrivateKey.generate()),
            "not-a-jwt-" + uuid.uuid4().hex,
        ]
        request = credit_pb2.GetBalanceRequest(owner_id=world.client_id)
        for value in tokens:
            # Refusals are expected; the logs are what this test reads.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stack.credit_stub().GetBalance(request, metadata=bearer(value), timeout=5)
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=3)  # on the grid
        booked = await stack.booking_stub().CreateBooking(
            world.booking_request(start), metadata=bearer(token(uuid.uuid4(), [ADMIN])), timeout=10
        )
        assert booked.booking.booking_id
        await asyncio.sleep(0.5)  # lines reach the files a moment after the answers

        logs = stack.logs()
        assert "rpc_finished" in logs  # the logs were captured at all
        assert world.client_id in logs  # the caller's subject is logged, as intended
        for value in tokens:
            assert value not in logs
            # Nor any part of it: the signature (the last segment) is the secret part.
            assert value.rsplit(".", 1)[-1] not in logs
        assert "Bearer" not in logs and "bearer " not in logs.lower()
        assert "eyJ" not in logs  # the start of every JWT header
        assert "PRIVATE KEY" not in logs
        key_text = private_key_file().read_text()
        assert key_text.splitlines()[1] not in logs
