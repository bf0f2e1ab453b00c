"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

Each request carries ``webhook-id`` (the event id, the same on every retry), ``webhook-timestamp``
(seconds since the epoch, of this attempt) and ``webhook-signature``: space-separated ``v1,<base64>``
entries, one per secret, each the HMAC-SHA256 of ``"{id}.{timestamp}.{body}"`` keyed with the secret's
bytes (the base64 after ``whsec_``). A receiver accepts the request when any entry matches a secret it
knows, so a secret is rotated by signing with the old and the new one until receivers have switched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from gateway.errors import InvalidParameter

PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64


class InvalidSecret(InvalidParameter):
    slug = "invalid-webhook-secret"
    title = "Invalid webhook secret"


def parse_secret(secret: str) -> bytes:
    """The key bytes of ``whsec_<base64>``.

    Raises:
        InvalidSecret: no ``whsec_`` prefix, not base64, or a key outside 24 to 64 bytes.
    """
    if not secret.startswith(PREFIX):
        raise InvalidSecret(
            "a webhook secret starts with 'whsec_' followed by base64", parameter="webhook_secret"
        )
    encoded = secret[len(PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret(
            "the webhook secret after 'whsec_' is not base64", parameter="webhook_secret"
        ) from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidSecret(
            f"a webhook secret holds {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes; this one holds {len(key)}",
            parameter="webhook_secret",
        )
    return key


def new_secret() -> str:
    """A fresh ``whsec_`` secret of 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(event_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64 HMAC-SHA256>`` per key, space-separated."""
    message = f"{event_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode() for key in keys
    )


def signed_headers(event_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> dict[str, str]:
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(event_id, timestamp, body, keys),
    }
