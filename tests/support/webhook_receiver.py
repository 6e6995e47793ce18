"""A real local webhook receiver: verifies each request as docs/notifications.md tells receivers
to (booking_service.webhooks.verify), and counts deliveries by event id."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from booking_service import webhooks

SECRET = "whsec-receiver-test-secret"  # noqa: S105  # a test secret, not a credential


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.deliveries: Counter[str] = Counter()
        self.events: dict[str, dict[str, Any]] = {}
        self.rejected: list[str] = []
        self.url = ""

    def of_booking(self, booking_id: str) -> list[dict[str, Any]]:
        return [event for event in self.events.values() if event["data"]["booking_id"] == booking_id]

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event_id = webhooks.verify(self.secret, dict(request.headers), body, now=time.time())
        except webhooks.InvalidSignature as error:
            self.rejected.append(str(error))
            return web.Response(status=400, text=str(error))
        event = json.loads(body)
        assert event["id"] == event_id
        self.deliveries[event_id] += 1
        self.events[event_id] = event
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
