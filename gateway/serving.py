"""How the gateway listens: uvicorn with an HTTP/1.1 protocol that bounds what one client may hold.

Which layer enforces what (``HttpSettings``, ``PALM_HTTP__*``)::

    this protocol (before the app sees a request)
      request line + headers must arrive within header_timeout_s   -> 408, connection closed
        (a connection that sends nothing is closed without a word)
      path + query over max_url_bytes                               -> 414
      request line + headers over max_header_bytes, or more than
        max_headers fields                                          -> 431
      anything httptools cannot parse (a malformed or negative
        Content-Length, Content-Length with chunked, bad framing)   -> 400
      idle keep-alive connection after keep_alive_s                 -> closed
    the app (gateway.api.middleware.BodyGuard, gateway.uploads)
      a body pausing longer than body_idle_timeout_s, or averaging
        under body_min_rate_bytes after body_grace_s                -> 408, connection closed
      a response sent before its request body was read             -> connection closed
      multipart framing, part counts and byte caps                  -> 400 / 413
      with the embedded Triton (uploads paced, gateway.admission.UploadPacer):
        more large bodies (over 2 MiB, or chunked) to /v1/predict
        and /v1/quicklook than max_concurrent_large_uploads         -> 503 + Retry-After
        their bytes past 2 MiB while /v1/predict or /v1/quicklook
        requests are predicting                                     -> read at a shared pace
      a client that closed its end (POLLRDHUP, see peer_closed;
        bodies read through gateway.api.deps.body_stream)           -> rest of body unread, 499

Every refusal is RFC 9457 problem+json, the ones written here included. A reverse proxy in front
(``deploy/nginx.conf``) enforces the same kinds of limits earlier and buffers slow clients itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
from typing import Any, ClassVar

import httptools
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import PROBLEM_JSON, TYPE_BASE
from gateway.settings import HttpSettings

logger = logging.getLogger(__name__)


PEER_CLOSED = "palm.peer_closed"
"""ASGI scope extension set by :class:`GuardedHttpToolsProtocol` where the kernel can tell (Linux's
``POLLRDHUP``); its ``closed`` is a callable telling whether the client has closed its end of the
connection (see :func:`gateway.api.deps.client_gone`). Elsewhere the app learns of a close only when
the server reads the end of the stream."""

_POLLRDHUP: int | None = getattr(select, "POLLRDHUP", None) if hasattr(select, "poll") else None


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and size limits on the request line and headers.

    Subclassed per server by :func:`protocol_class`, which sets :attr:`limits`.
    """

    limits: ClassVar[HttpSettings] = HttpSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._headers_seen = 0
        self._url_bytes = 0
        self._received_any = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str] | None = None

    # -- connection --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def peer_closed(self) -> bool:
        """Whether the client has closed its end of the connection, bytes of it still unread or not.

        uvicorn learns of a close only when it reads the end of the stream, an event-loop turn or
        more after the last body bytes; the kernel knows at once (``POLLRDHUP``, the check nginx makes
        before it drops work for a client that left). A client that only half-closes is gone here as
        it is for uvicorn, which closes the connection on end of stream.
        """
        if self.transport.is_closing():
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None or _POLLRDHUP is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), _POLLRDHUP)
        return bool(poller.poll(0))

    def data_received(self, data: bytes) -> None:
        # Bytes count towards the header limit when the chunk starts inside a request's line and
        # headers (not when it carries the end of a body), and only while those stay incomplete.
        in_headers = self._awaiting_headers
        headed = self._headers_seen
        if in_headers:
            self._received_any = True
            if self._header_timer is None:  # the next request on a kept-alive connection begins
                self._arm_header_timer()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                self._refuse(400, "bad-request", f"malformed HTTP request: {exc}")
            return
        still_in_headers = in_headers and self._headers_seen == headed and self._awaiting_headers
        if still_in_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(
                    431,
                    "request-header-fields-too-large",
                    f"the request line and headers exceed {self.limits.max_header_bytes} bytes",
                )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._awaiting_headers:
            self._received_any = False

    # -- parser callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if _POLLRDHUP is not None:
            self.scope.setdefault("extensions", {})[PEER_CLOSED] = {"closed": self.peer_closed}
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._url_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_url_bytes:
            self._refusal = (
                414,
                "uri-too-long",
                f"the path and query exceed {self.limits.max_url_bytes} bytes",
            )
            raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (
                431,
                "request-header-fields-too-large",
                f"the request has more than {self.limits.max_headers} header fields",
            )
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._headers_seen += 1
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers = True

    # -- refusals ------------------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "bad-request", msg)

    def _refuse(self, status: int, slug: str, detail: str) -> None:
        logger.info("refused a request from %s: %s", _peer(self.client), detail)
        self._write_problem(status, slug, detail)

    def _write_problem(self, status: int, slug: str, detail: str) -> None:
        self._cancel_header_timer()
        if self.transport.is_closing():
            return
        body = json.dumps(
            {
                "type": TYPE_BASE + slug,
                "title": _REASONS.get(status, "Bad Request"),
                "status": status,
                "detail": detail,
            }
        ).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
            f"content-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if not self._received_any:
            self.transport.close()  # an idle connection: nobody to answer
            return
        self._refuse(
            408,
            "request-timeout",
            f"the request line and headers took longer than {self.limits.header_timeout_s:g} s",
        )


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def protocol_class(limits: HttpSettings) -> type[GuardedHttpToolsProtocol]:
    """The protocol uvicorn instantiates per connection, bound to ``limits``."""
    return type("PalmHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def uvicorn_config(
    app: FastAPI, http: HttpSettings, log_level: str = "info", **overrides: Any
) -> uvicorn.Config:
    """The uvicorn configuration every server of the gateway runs with (``palm-serve serve``, tests)."""
    options: dict[str, Any] = {
        "http": protocol_class(http),
        "timeout_keep_alive": http.keep_alive_s,
        "log_level": log_level.lower(),
        "log_config": None,  # uvicorn's loggers propagate to ours (same format, request ids)
        "timeout_graceful_shutdown": 30,
        "access_log": False,  # the gateway logs each request itself, with its request id
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv4 or IPv6), the way uvicorn binds its own.

    Raises:
        OSError: the address is in use, or not one of this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock
