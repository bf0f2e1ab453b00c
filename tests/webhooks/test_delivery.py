"""One POST through the sender to a real receiver on 127.0.0.1: pinned address, no redirects, a
deadline, a capped read."""

from __future__ import annotations

import socket
import time

import pytest

from gateway.webhooks.delivery import DeliveryFailed, Sender
from gateway.webhooks.signing import new_secret, parse_secret, signed_headers
from gateway.webhooks.ssrf import UrlGuard
from tests.receiver import Reply, receiving

BODY = b'{"type":"job.succeeded","timestamp":"2026-11-29T12:00:00.000Z","data":{"job_id":"j"}}'


class OnceResolver:
    """``receiver.test`` is 127.0.0.1 the first time, and nothing after: a second lookup would fail."""

    def __init__(self) -> None:
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if self.lookups > 1:
            raise OSError("rebound")
        return ["127.0.0.1"]


async def test_the_connection_goes_to_the_checked_address_naming_the_host() -> None:
    secret = new_secret()
    with receiving([secret]) as receiver:
        resolver = OnceResolver()
        target = await UrlGuard(resolver, allow_private=True).check(
            f"http://receiver.test:{receiver.port}/in?a=1"
        )
        headers = signed_headers("msg_x", int(time.time()), BODY, [parse_secret(secret)])
        answer = await Sender(5, 1024).post(target, headers, BODY)
    assert answer.status == 204
    assert resolver.lookups == 1
    (got,) = receiver.received
    assert got.verified
    assert got.path == "/in?a=1"
    assert got.headers["host"] == f"receiver.test:{receiver.port}"
    assert got.headers["content-type"] == "application/json"


async def test_a_redirect_is_an_answer_not_followed() -> None:
    with receiving(
        [], script=[Reply(302, {"Location": "http://169.254.169.254/latest/meta-data"})]
    ) as receiver:
        target = await UrlGuard(allow_private=True).check(receiver.url)
        answer = await Sender(5, 1024).post(target, {}, BODY)
    assert answer.status == 302
    assert answer.headers["location"].startswith("http://169.254.169.254")
    assert len(receiver.received) == 1


async def test_a_slow_receiver_times_out_and_a_large_answer_is_read_up_to_the_cap() -> None:
    with receiving([], script=[Reply(200, delay_s=3), Reply(200, body=b"x" * 1_000_000)]) as receiver:
        target = await UrlGuard(allow_private=True).check(receiver.url)
        began = time.monotonic()
        with pytest.raises(DeliveryFailed) as failed:
            await Sender(0.5, 1024).post(target, {}, BODY)
        assert failed.value.kind == "timeout"
        assert time.monotonic() - began < 2
        answer = await Sender(5, 1000).post(target, {}, BODY)
    assert (answer.status, answer.body_bytes) == (200, 1000)


async def test_nobody_listening_is_a_connection_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = await UrlGuard(allow_private=True).check(f"http://127.0.0.1:{port}/")
    with pytest.raises(DeliveryFailed) as failed:
        await Sender(2, 1024).post(target, {}, BODY)
    assert failed.value.kind == "connection"
