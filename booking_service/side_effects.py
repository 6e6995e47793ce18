"""The receivers of a booking's side effects: a notification sink and a video-room provider
(webhook endpoints are webhook_delivery.py's).

Both are called by the outbox worker only, never while a booking waits. Every HTTP call has a
timeout; a failure is classified by `booking_service.delivery` for the outbox's retry policy.
Secrets (the Daily API key) go into headers only and are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import httpx
import structlog

from booking_service.config import BookingSettings, Secret
from booking_service.delivery import PermanentFailure, check_response

log = structlog.get_logger()

LOCAL_ROOM_BASE_URL = "http://127.0.0.1/rooms"
# Rooms only a meeting token opens: a session is private (docs/notifications.md, "Video rooms").
DAILY_ROOM_PRIVACY = "private"
HTTP_NOT_FOUND = 404


class Notifier(Protocol):
    async def send(self, event_id: str, event_type: str, body: bytes) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class Room:
    name: str
    url: str


class VideoProvider(Protocol):
    async def ensure_room(self, name: str, opens_at: datetime, expires_at: datetime) -> Room:
        """Creates the room, or moves the window of the one that exists; idempotent."""
        ...

    async def delete_room(self, name: str) -> None:
        """Deletes the room; a room that does not exist is no error."""
        ...

    async def close(self) -> None: ...


class LogNotifier:
    """Notifications as log lines: the default, and enough for `make run`."""

    async def send(self, event_id: str, event_type: str, body: bytes) -> None:
        log.info("notification_logged", event_id=event_id, event_type=event_type, body=body.decode())

    async def close(self) -> None:
        return None


class NoNotifier:
    """BOOKING_NOTIFICATION_SINK=webhook: notifications go to the webhook endpoints only
    (webhook_delivery.py), BOOKING_WEBHOOK_URL's among them."""

    async def send(self, event_id: str, event_type: str, body: bytes) -> None:
        return None

    async def close(self) -> None:
        return None


class LocalVideoProvider:
    """No network: a deterministic URL per room, so `make run` works offline."""

    async def ensure_room(self, name: str, opens_at: datetime, expires_at: datetime) -> Room:
        return Room(name, f"{LOCAL_ROOM_BASE_URL}/{name}")

    async def delete_room(self, name: str) -> None:
        return None

    async def close(self) -> None:
        return None


class DailyVideoProvider:
    """The subset of Daily.co's REST API that rooms need (https://docs.daily.co/reference/rest-api/rooms)."""

    def __init__(self, api_url: str, api_key: Secret, timeout_s: float) -> None:
        self._client = httpx.AsyncClient(
            base_url=api_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            follow_redirects=False,
        )

    async def ensure_room(self, name: str, opens_at: datetime, expires_at: datetime) -> Room:
        properties = {"nbf": int(opens_at.timestamp()), "exp": int(expires_at.timestamp())}
        response = await self._client.post(
            "/rooms", json={"name": name, "privacy": DAILY_ROOM_PRIVACY, "properties": properties}
        )
        if response.status_code == 400 and "already exists" in response.text:
            # A retry of a create whose answer was lost, or a reschedule: move the window.
            response = await self._client.post(f"/rooms/{name}", json={"properties": properties})
        check_response(response, "daily")
        return Room(name, _room_url(response.json()))

    async def delete_room(self, name: str) -> None:
        response = await self._client.delete(f"/rooms/{name}")
        if response.status_code == HTTP_NOT_FOUND:
            return  # deleted before, or never made
        check_response(response, "daily")

    async def close(self) -> None:
        await self._client.aclose()


def _room_url(answer: Any) -> str:
    url = answer.get("url") if isinstance(answer, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise PermanentFailure("daily: the answer has no room url")
    return url


def notifier_from(settings: BookingSettings) -> Notifier:
    if settings.notification_sink == "webhook":
        return NoNotifier()
    return LogNotifier()


def video_provider_from(settings: BookingSettings) -> VideoProvider | None:
    if settings.video_provider == "daily":
        return DailyVideoProvider(settings.daily_api_url, settings.daily_api_key, settings.side_effect_http_timeout_s)
    if settings.video_provider == "local":
        return LocalVideoProvider()
    return None
