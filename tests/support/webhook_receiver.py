"""A real local webhook receiver: verifies each request as a partner would, with the
`standardwebhooks` package from PyPI, and counts deliveries by event id. It can be told to answer
with an error status for a while, and to verify with several secrets (one receiver per secret is
how tests show which secret a request verified with)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from booking_service import webhooks

# A fixed Standard Webhooks secret for the bootstrap endpoint (BOOKING_WEBHOOK_SECRET) in tests.
SECRET = "whsec_dGVzdC1yZWNlaXZlci1zZWNyZXQtMzItYnl0ZXMhISE="  # noqa: S105  # a test secret, not a credential


@dataclass
class WebhookReceiver:
    secret: str
    url: str = ""
    deliveries: Counter[str] = field(default_factory=Counter)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    # Answer this status (instead of 204) to the next `failures_left` requests.
    failing_status: int = 500
    failures_left: int = 0
    # Every request as it came (headers, body), verified or not.
    raw: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        webhooks.key_of(self.secret)  # a test that passes a bad secret fails here, not in the server

    def of_booking(self, booking_id: str) -> list[dict[str, Any]]:
        return [event for event in self.events.values() if event["data"].get("booking_id") == booking_id]

    def fail_next(self, count: int, status: int = 500) -> None:
        self.failures_left, self.failing_status = count, status

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.raw.append((dict(request.headers), body))
        if self.failures_left > 0:
            self.failures_left -= 1
            return web.Response(status=self.failing_status, text="receiver failing on purpose")
        try:
            event = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as error:
            self.rejected.append(str(error))
            return web.Response(status=400, text=str(error))
        assert event["id"] == request.headers["webhook-id"]
        self.deliveries[event["id"]] += 1
        self.events[event["id"]] = event
        return web.Response(status=204)


@asynccontextmanager
async def running_webhook_receiver(secret: str = SECRET) -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(secret)
    app = web.Application()
    app.add_routes([web.post("/hooks", receiver.receive)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    try:
        yield receiver
    finally:
        await runner.cleanup()
