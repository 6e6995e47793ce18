"""How a side effect's delivery attempt ended, as the outbox needs to know it.

Success is a normal return. `RetryLater` (a 429 with Retry-After) sets the next attempt to the
receiver's wish, bounded; `PermanentFailure` (a 4xx other than 429: the request itself is wrong,
repeating it cannot help) dead-letters at once with its reason. Anything else (5xx, a network
error, a timeout) is retried with exponential backoff and jitter until the attempts run out.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

MAX_REASON_LENGTH = 300
TOO_MANY_REQUESTS = 429


class RetryLater(Exception):
    def __init__(self, delay_s: float | None, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason


class PermanentFailure(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientFailure(Exception):
    """A 5xx: worth retrying later."""


@dataclass(frozen=True)
class Failure:
    """How one attempt at a side effect failed: retry after `delay_s` (None: backoff), or never."""

    reason: str
    delay_s: float | None = None
    permanent: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """The outbox's: exponential backoff with jitter from `base_delay_s` up to `max_delay_s`
    (which also bounds a receiver's Retry-After), dead after `max_attempts`."""

    base_delay_s: float
    max_delay_s: float
    max_attempts: int

    def backoff_s(self, attempts: int) -> float:
        """Half to all of the doubled delay, bounded (jitter, not crypto)."""
        base_s = self.base_delay_s * float(2 ** min(attempts, 30))
        return min(self.max_delay_s, base_s) * random.uniform(0.5, 1.0)  # jitter, not crypto

    def after_failure(self, failure: Failure, attempts_made: int) -> tuple[bool, float]:
        """(dead, delay_s) after a failed attempt, `attempts_made` counting it."""
        dead = failure.permanent or attempts_made >= self.max_attempts
        if failure.permanent:
            return dead, 0.0
        delay_s = failure.delay_s if failure.delay_s is not None else self.backoff_s(attempts_made - 1)
        return dead, min(self.max_delay_s, delay_s)


async def attempt(delivery: Awaitable[object]) -> Failure | None:
    """Awaits one delivery; None when it succeeded, else how it failed."""
    try:
        await delivery
    except RetryLater as later:
        return Failure(later.reason, delay_s=later.delay_s)
    except PermanentFailure as failure:
        return Failure(failure.reason, permanent=True)
    except Exception as error:  # noqa: BLE001  # any failure counts as an attempt, so a poison event dead-letters
        return Failure(repr(error))
    return None


def check_response(response: httpx.Response, what: str) -> None:
    """Returns for a 2xx; raises the failure class of anything else."""
    if response.is_success:
        return
    status = response.status_code
    detail = f"{what}: HTTP {status} {_short(response.text)}".rstrip()
    if status == TOO_MANY_REQUESTS:
        raise RetryLater(retry_after_s(response.headers.get("retry-after")), detail)
    if 400 <= status < 500:
        raise PermanentFailure(detail)
    raise TransientFailure(detail)


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After in seconds (RFC 9110: delay-seconds or an HTTP-date); None if absent or bad."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat[:MAX_REASON_LENGTH]
