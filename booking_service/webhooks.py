"""Webhook signatures by the Standard Webhooks scheme (https://www.standardwebhooks.com), so
that receivers verify them with a library of their language (docs/notifications.md).

    webhook-id:        the event's stable id (the outbox event id); the same on every retry
    webhook-timestamp: unix seconds when this attempt was signed
    webhook-signature: "v1,<base64 HMAC-SHA256 over '{id}.{timestamp}.{body}'>", space-separated,
                       one per secret that signs (two during a rotation's overlap)

A secret is "whsec_" followed by the base64 of its key's bytes (`KEY_BYTES` random bytes here).
No I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SCHEME = "v1"
SECRET_PREFIX = "whsec_"  # noqa: S105  # the prefix of every secret, not a secret
# The Standard Webhooks secret: 24 to 64 bytes of key; new ones get 32.
KEY_BYTES = 32
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64


class InvalidSecret(ValueError):
    """Not a Standard Webhooks secret ("whsec_" + base64 of 24 to 64 bytes)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def key_of(secret: str) -> bytes:
    """The key bytes of a "whsec_" secret; InvalidSecret for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret(f'a webhook secret starts with "{SECRET_PREFIX}"')
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret(f'a webhook secret is "{SECRET_PREFIX}" followed by base64') from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidSecret(f"a webhook secret's key has {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, not {len(key)}")
    return key


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of a request."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(key_of(secret), signed, hashlib.sha256).digest()
    return f"{SCHEME},{base64.b64encode(digest).decode()}"


def sign(signing_secrets: Sequence[str], event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt, signed with each secret (the current one first)."""
    assert signing_secrets, "at least one secret signs"
    return {
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: " ".join(signature(secret, event_id, timestamp, body) for secret in signing_secrets),
    }


if __name__ == "__main__":
    print(new_secret())  # `python -m booking_service.webhooks`: a secret for BOOKING_WEBHOOK_SECRET
