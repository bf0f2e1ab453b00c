"""Our signatures, verified by the ``standardwebhooks`` library (the reference), not by our own code."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.webhooks.signing import InvalidSecret, new_secret, parse_secret, signed_headers

BODY = b'{"type":"job.succeeded","timestamp":"2026-11-29T12:00:00.000Z","data":{"job_id":"j1"}}'


def test_a_signed_event_verifies_with_the_reference_library() -> None:
    secret = new_secret()
    headers = signed_headers("msg_1", int(time.time()), BODY, [parse_secret(secret)])
    assert Webhook(secret).verify(BODY, headers)["data"]["job_id"] == "j1"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"j1", b"j2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    old = signed_headers("msg_1", int(time.time()) - 600, BODY, [parse_secret(secret)])
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, old)


def test_during_a_rotation_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = signed_headers("msg_2", int(time.time()), BODY, [parse_secret(old), parse_secret(new)])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(BODY, headers)
    assert Webhook(new).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "starts with 'whsec_'"),
        ("whsec_not base64!", "not base64"),
        ("whsec_c2hvcnQ=", "holds 24 to 64 bytes"),
    ],
)
def test_malformed_secrets_are_refused_with_the_reason(secret: str, reason: str) -> None:
    with pytest.raises(InvalidSecret, match=reason):
        parse_secret(secret)
