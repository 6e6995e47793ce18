"""A real local HTTP server speaking the subset of Daily.co's REST API the booking service uses:
POST /rooms, POST /rooms/{name}, GET /rooms/{name}, DELETE /rooms/{name}, Bearer auth.

A test scripts failures ahead (`fail_next`): the next requests get those answers instead.
Every request is recorded with its arrival time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_KEY = "daily-test-key-0123456789abcdef"  # a test key, not a credential


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    at_s: float
    body: dict[str, Any] | None


class FakeDaily:
    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, Any]] = {}
        self.requests: list[Seen] = []
        self._scripted: deque[Answer] = deque()
        self.url = ""

    def fail_next(self, *answers: Answer) -> None:
        self._scripted.extend(answers)

    def seen(self, method: str, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append(Seen(request.method, request.path, time.monotonic(), body))
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": "authorization-error"}, status=401)
        if self._scripted:
            answer = self._scripted.popleft()
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        response: web.StreamResponse = await handler(request)
        return response

    def _room(self, name: str, properties: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "url": f"https://fake.daily.test/{name}", "privacy": "private", "config": properties}

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["name"]
        if name in self.rooms:
            return web.json_response(
                {"error": "invalid-request-error", "info": f"a room named {name} already exists"}, status=400
            )
        self.rooms[name] = self._room(name, body.get("properties", {}))
        return web.json_response(self.rooms[name])

    async def update(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.rooms:
            return web.json_response({"error": "not-found"}, status=404)
        self.rooms[name]["config"].update((await request.json()).get("properties", {}))
        return web.json_response(self.rooms[name])

    async def get(self, request: web.Request) -> web.Response:
        room = self.rooms.get(request.match_info["name"])
        return web.json_response(room, status=200) if room else web.json_response({"error": "not-found"}, status=404)

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.rooms.pop(name, None) is None:
            return web.json_response({"error": "not-found"}, status=404)
        return web.json_response({"deleted": True, "name": name})


@asynccontextmanager
async def running_fake_daily() -> AsyncIterator[FakeDaily]:
    fake = FakeDaily()
    app = web.Application(middlewares=[fake._middleware])
    app.add_routes(
        [
            web.post("/v1/rooms", fake.create),
            web.post("/v1/rooms/{name}", fake.update),
            web.get("/v1/rooms/{name}", fake.get),
            web.delete("/v1/rooms/{name}", fake.delete),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield fake
    finally:
        await runner.cleanup()
