"""One webhook POST to a checked address: the only module that speaks HTTP to receivers.

The connection goes to :attr:`Target.address`, the address :class:`~gateway.webhooks.ssrf.UrlGuard`
checked, through a network backend that ignores the host name it is handed; the request still names
the host (``Host`` header, TLS SNI and certificate check), so virtual hosts and HTTPS work as usual.
Redirects are never followed (a 3xx is an answer like any other), the whole attempt has one deadline,
and at most ``max_response_bytes`` of the response body are read. httpcore's errors are translated
here into :class:`DeliveryFailed`.
"""

from __future__ import annotations

import asyncio
import ssl
import typing
from dataclasses import dataclass

import httpcore

from gateway import __version__
from gateway.webhooks.ssrf import Target

USER_AGENT = f"palm-serve-webhooks/{__version__}"


class DeliveryFailed(Exception):
    """No HTTP answer: ``kind`` is ``timeout`` or ``connection``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body_bytes: int
    """Bytes of the body read (at most the cap)."""


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects every TCP stream to one address, whatever host name the connection pool asks for."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp(
            self.address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks connect over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Sender:
    """POSTs events (see the module docstring).

    Args:
        timeout_s: deadline of one attempt: connect, send, and the response's headers and body.
        max_response_bytes: body bytes read before the connection is closed.
        ssl_context: for https receivers; the system's trust store by default.
    """

    def __init__(
        self, timeout_s: float, max_response_bytes: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.ssl_context = ssl_context if ssl_context is not None else ssl.create_default_context()

    async def post(self, target: Target, headers: dict[str, str], body: bytes) -> Answer:
        """Send ``body`` to ``target`` once.

        Raises:
            DeliveryFailed: timed out, or no HTTP answer (refused, reset, TLS, malformed response).
        """
        url = httpcore.URL(
            scheme=target.scheme.encode(),
            host=target.host.encode(),
            port=target.port,
            target=target.path.encode(),
        )
        request_headers = [
            (b"Host", target.authority.encode()),
            (b"Content-Type", b"application/json"),
            (b"User-Agent", USER_AGENT.encode()),
            *((name.encode(), value.encode()) for name, value in headers.items()),
        ]
        timeouts = {
            "connect": self.timeout_s,
            "read": self.timeout_s,
            "write": self.timeout_s,
            "pool": self.timeout_s,
        }
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                httpcore.AsyncConnectionPool(
                    ssl_context=self.ssl_context,
                    network_backend=PinnedBackend(target.address),
                    max_connections=1,
                    retries=0,
                ) as pool,
                pool.stream(
                    b"POST", url, headers=request_headers, content=body, extensions={"timeout": timeouts}
                ) as response,
            ):
                read = 0
                async for chunk in response.aiter_stream():
                    read += len(chunk)
                    if read >= self.max_response_bytes:
                        read = self.max_response_bytes
                        break
                return Answer(
                    status=response.status,
                    headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                    body_bytes=read,
                )
        except (TimeoutError, httpcore.TimeoutException) as exc:
            raise DeliveryFailed("timeout", f"no answer within {self.timeout_s:g} s") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, ssl.SSLError, OSError) as exc:
            raise DeliveryFailed("connection", f"{type(exc).__name__}: {exc}"[:300]) from exc
