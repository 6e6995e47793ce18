"""Webhook signatures: how the booking service signs a notification, and how a receiver checks it.

The scheme (docs/notifications.md), close to the Standard Webhooks one:

  Webhook-Id:        the event's stable id (the outbox event id); the same on every retry
  Webhook-Timestamp: unix seconds when this attempt was signed
  Webhook-Signature: v1=<hex HMAC-SHA256 with the shared secret over "{id}.{timestamp}.{body}">

A receiver recomputes the signature over the exact bytes it received, compares in constant time,
refuses a timestamp further than `tolerance_s` from its own clock (a replay of an old request, or
a forged future one), and deduplicates by Webhook-Id within that window (at-least-once delivery).
`verify` has no dependencies beyond the standard library, so receivers can copy it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

ID_HEADER = "Webhook-Id"
TIMESTAMP_HEADER = "Webhook-Timestamp"
SIGNATURE_HEADER = "Webhook-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300
# A signature header may list several (space-separated), e.g. while a secret is being rotated.
MAX_SIGNATURES = 5


class InvalidSignature(Exception):
    """The request is not a genuine, fresh notification; the receiver should answer 400."""


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{event_id}.{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt."""
    return {
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"{SCHEME}={signature(secret, event_id, timestamp, body)}",
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> str:
    """The event id of a genuine and fresh request; raises InvalidSignature otherwise.

    `headers` is looked up case-insensitively; `body` must be the raw bytes as received."""
    lowered = {key.lower(): value for key, value in headers.items()}
    event_id = lowered.get(ID_HEADER.lower(), "")
    timestamp_text = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signatures = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not event_id or not timestamp_text or not signatures:
        raise InvalidSignature("missing webhook headers")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise InvalidSignature("malformed timestamp") from None
    if abs(now - timestamp) > tolerance_s:
        raise InvalidSignature("timestamp outside the tolerance (a replay, or a clock far off)")
    expected = signature(secret, event_id, timestamp, body)
    for candidate in signatures.split()[:MAX_SIGNATURES]:
        scheme, _, value = candidate.partition("=")
        if scheme == SCHEME and hmac.compare_digest(value, expected):
            return event_id
    raise InvalidSignature("no matching signature")
