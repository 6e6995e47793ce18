"""Webhook signatures (booking_service/webhooks.py, docs/notifications.md) are Standard Webhooks
signatures: the `standardwebhooks` package from PyPI, which receivers use, verifies them, during a
secret's rotation with either secret, and refuses a tampered or replayed request."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from booking_service import webhooks

EVENT_ID = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"
BODY = b'{"id":"6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f","type":"booking.confirmed"}'
SECRET = webhooks.new_secret()
NEW_SECRET = webhooks.new_secret()


def signed(secrets: list[str], *, at: int | None = None, body: bytes = BODY) -> dict[str, str]:
    return webhooks.sign(secrets, EVENT_ID, int(time.time()) if at is None else at, body)


def test_our_signature_is_the_one_the_library_computes() -> None:
    now = int(time.time())
    ours = webhooks.signature(SECRET, EVENT_ID, now, BODY)
    theirs = Webhook(SECRET).sign(EVENT_ID, datetime.fromtimestamp(now, UTC), BODY.decode())
    assert ours == theirs
    assert ours.startswith("v1,")


def test_a_genuine_request_verifies_with_the_library() -> None:
    headers = signed([SECRET])
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert Webhook(SECRET).verify(BODY, headers) == {"id": EVENT_ID, "type": "booking.confirmed"}


def test_during_a_rotation_either_secret_verifies_and_after_it_only_the_new_one() -> None:
    overlapping = signed([NEW_SECRET, SECRET])
    assert len(overlapping["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, NEW_SECRET):
        Webhook(secret).verify(BODY, overlapping)

    after = signed([NEW_SECRET])
    Webhook(NEW_SECRET).verify(BODY, after)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, after)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: ({**h, "webhook-id": "another-id"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
        lambda h, b: (h, b.replace(b"confirmed", b"cancelled")),
        lambda h, b: ({**h, "webhook-signature": "v1," + base64.b64encode(b"\0" * 32).decode()}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
    ],
    ids=["id", "timestamp", "body", "signature", "missing-header"],
)
def test_a_tampered_request_is_refused(tamper: object) -> None:
    headers, body = tamper(signed([SECRET]), BODY)  # type: ignore[operator]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)


def test_a_replayed_old_request_is_refused() -> None:
    ten_minutes_ago = int(time.time()) - 600
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(BODY, signed([SECRET], at=ten_minutes_ago))


def test_another_secret_does_not_verify() -> None:
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(BODY, signed([SECRET]))


def test_new_secrets_are_standard_random_and_distinct() -> None:
    made = {webhooks.new_secret() for _ in range(20)}
    assert len(made) == 20
    for secret in made:
        assert secret.startswith("whsec_")
        assert len(webhooks.key_of(secret)) == webhooks.KEY_BYTES


@pytest.mark.parametrize(
    "secret",
    [
        "plain-text-secret",
        "whsec_not base64!",
        "whsec_" + base64.b64encode(b"short").decode(),
        "whsec_" + base64.b64encode(b"x" * 65).decode(),
    ],
)
def test_what_is_no_standard_secret_is_refused(secret: str) -> None:
    with pytest.raises(webhooks.InvalidSecret):
        webhooks.key_of(secret)
