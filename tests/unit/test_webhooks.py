"""Webhook signatures (booking_service/webhooks.py, docs/notifications.md): the documented scheme
verifies, and a tampered or replayed request does not."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from booking_service import webhooks

SECRET = "whsec-test-secret"  # noqa: S105  # a test secret, not a credential
EVENT_ID = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"
NOW = 1_800_000_000
BODY = b'{"id":"6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f","type":"booking.confirmed"}'


def test_the_documented_scheme_is_what_is_signed() -> None:
    headers = webhooks.sign(SECRET, EVENT_ID, NOW, BODY)
    by_hand = hmac.new(SECRET.encode(), f"{EVENT_ID}.{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert headers == {
        "Webhook-Id": EVENT_ID,
        "Webhook-Timestamp": str(NOW),
        "Webhook-Signature": f"v1={by_hand}",
    }


def test_a_genuine_request_verifies_with_headers_in_any_case() -> None:
    headers = {key.lower(): value for key, value in webhooks.sign(SECRET, EVENT_ID, NOW, BODY).items()}
    assert webhooks.verify(SECRET, headers, BODY, now=NOW + 10) == EVENT_ID


def test_one_of_several_signatures_may_match_while_a_secret_rotates() -> None:
    headers = webhooks.sign(SECRET, EVENT_ID, NOW, BODY)
    headers["Webhook-Signature"] = "v1=" + "0" * 64 + " " + headers["Webhook-Signature"]
    assert webhooks.verify(SECRET, headers, BODY, now=NOW) == EVENT_ID


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Webhook-Id", "00000000-0000-4000-8000-000000000000"),
        ("Webhook-Timestamp", str(NOW + 1)),
        ("Webhook-Signature", "v1=" + "0" * 64),
        ("Webhook-Signature", "v0=whatever"),
        ("Webhook-Timestamp", "soon"),
        ("Webhook-Signature", ""),
    ],
)
def test_a_tampered_header_fails(header: str, value: str) -> None:
    headers = webhooks.sign(SECRET, EVENT_ID, NOW, BODY)
    headers[header] = value
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify(SECRET, headers, BODY, now=NOW)


def test_a_tampered_body_fails() -> None:
    headers = webhooks.sign(SECRET, EVENT_ID, NOW, BODY)
    with pytest.raises(webhooks.InvalidSignature, match="no matching signature"):
        webhooks.verify(SECRET, headers, BODY.replace(b"confirmed", b"cancelled"), now=NOW)


def test_another_secret_fails() -> None:
    headers = webhooks.sign("another-secret", EVENT_ID, NOW, BODY)
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify(SECRET, headers, BODY, now=NOW)


@pytest.mark.parametrize("age_s", [301, 3600, -301])
def test_a_replay_of_an_old_request_or_one_from_the_future_fails(age_s: int) -> None:
    headers = webhooks.sign(SECRET, EVENT_ID, NOW, BODY)
    with pytest.raises(webhooks.InvalidSignature, match="tolerance"):
        webhooks.verify(SECRET, headers, BODY, now=NOW + age_s)


def test_the_tolerance_is_inclusive_and_configurable() -> None:
    headers = webhooks.sign(SECRET, EVENT_ID, NOW, BODY)
    assert webhooks.verify(SECRET, headers, BODY, now=NOW + 300) == EVENT_ID
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify(SECRET, headers, BODY, now=NOW + 61, tolerance_s=60)
