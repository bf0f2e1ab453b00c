"""The webhook URL guard: a webhook may reach the internet, never the service's own network.

A URL passes when its scheme is ``http`` or ``https``, it carries no credentials, and **every** address
its host resolves to is outside :data:`BLOCKED` (loopback, private, link-local with the cloud metadata
address 169.254.169.254, CGNAT 100.64/10, multicast, reserved, unspecified, documentation ranges; IPv6
forms that embed an IPv4 address are judged by that address, Teredo is refused). Hosts written as
numbers are decoded the way resolvers decode them (``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and
``127.1`` are all 127.0.0.1) and judged as the address they are.

:meth:`UrlGuard.check` returns the :class:`Target` with the address it checked; the sender connects to
that address (:mod:`gateway.webhooks.delivery`) and never resolves the name again, so a DNS answer that
changes between the check and the connection (rebinding) cannot redirect it. Jobs are checked at
creation (``422`` naming the reason) and again before every attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

from gateway.errors import InvalidParameter

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Category(StrEnum):
    loopback = "loopback"
    private = "private"
    link_local = "link-local"
    cgnat = "shared address space (CGNAT)"
    multicast = "multicast"
    reserved = "reserved"
    unspecified = "unspecified"
    documentation = "documentation"


ALLOWED_WHEN_PRIVATE = frozenset({Category.loopback, Category.private})
"""What ``PALM_WEBHOOK__ALLOW_PRIVATE=true`` lets through (a receiver on this machine or the LAN)."""

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

BLOCKED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Category], ...] = (
    (_V4("0.0.0.0/8"), Category.unspecified),
    (_V4("10.0.0.0/8"), Category.private),
    (_V4("100.64.0.0/10"), Category.cgnat),
    (_V4("127.0.0.0/8"), Category.loopback),
    (_V4("169.254.0.0/16"), Category.link_local),
    (_V4("172.16.0.0/12"), Category.private),
    (_V4("192.0.0.0/24"), Category.reserved),
    (_V4("192.0.2.0/24"), Category.documentation),
    (_V4("192.88.99.0/24"), Category.reserved),
    (_V4("192.168.0.0/16"), Category.private),
    (_V4("198.18.0.0/15"), Category.reserved),
    (_V4("198.51.100.0/24"), Category.documentation),
    (_V4("203.0.113.0/24"), Category.documentation),
    (_V4("224.0.0.0/4"), Category.multicast),
    (_V4("240.0.0.0/4"), Category.reserved),
    (_V6("::/128"), Category.unspecified),
    (_V6("::1/128"), Category.loopback),
    (_V6("::/96"), Category.reserved),
    (_V6("64:ff9b:1::/48"), Category.reserved),
    (_V6("100::/64"), Category.reserved),
    (_V6("2001::/32"), Category.reserved),
    (_V6("2001:2::/48"), Category.reserved),
    (_V6("2001:10::/28"), Category.reserved),
    (_V6("2001:20::/28"), Category.reserved),
    (_V6("2001:db8::/32"), Category.documentation),
    (_V6("fc00::/7"), Category.private),
    (_V6("fe80::/10"), Category.link_local),
    (_V6("fec0::/10"), Category.reserved),
    (_V6("ff00::/8"), Category.multicast),
)
"""Ranges a webhook never reaches; IPv6 forms embedding IPv4 are unwrapped first (:func:`embedded`)."""

_NAT64 = _V6("64:ff9b::/96")
_6TO4 = _V6("2002::/16")
METADATA = ipaddress.IPv4Address("169.254.169.254")


class UnsafeWebhookUrl(InvalidParameter):
    """The webhook URL is malformed, does not resolve, or leads somewhere a webhook may not go."""

    slug = "unsafe-webhook-url"
    title = "Webhook URL refused"


@dataclass(frozen=True, slots=True)
class Blocked:
    address: IPAddress
    category: Category
    via: IPAddress | None = None
    """The IPv6 address that embedded ``address``."""

    def reason(self, host: str | None = None) -> str:
        """``"127.0.0.1 is loopback"``, or with the name it came from: ``"h resolves to 127.0.0.1, which
        is loopback"``."""
        what = self.category.value
        if self.address == METADATA:
            what += " (the cloud metadata service)"
        address = f"{self.address} (inside {self.via})" if self.via is not None else str(self.address)
        return f"{host} resolves to {address}, which is {what}" if host else f"{address} is {what}"


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: connect to ``address`` while naming ``host`` (Host header, TLS SNI)."""

    scheme: str
    host: str
    port: int
    path: str
    """Path and query, as sent in the request line."""
    address: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class Resolver(Protocol):
    """A host name to its addresses (tests pass a stub; nothing else resolves webhook hosts)."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The system's resolver (``getaddrinfo``) off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


def embedded(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4:
        return address.sixtofour
    return None


def classify(address: IPAddress) -> Blocked | None:
    """Why a webhook may not reach ``address``, or ``None`` when it may."""
    inner = embedded(address)
    if inner is not None:
        blocked = classify(inner)
        return Blocked(blocked.address, blocked.category, via=address) if blocked is not None else None
    for network, category in BLOCKED:
        if address.version == network.version and address in network:
            return Blocked(address, category)
    if not address.is_global:
        return Blocked(address, Category.reserved)
    return None


def numeric_host(host: str) -> IPAddress | None:
    """The address a host written as numbers stands for, as ``inet_aton`` and URL parsers read it:
    one to four parts, each decimal, octal (leading ``0``) or hex (``0x``), the last filling the
    remaining bytes (``127.1`` is 127.0.0.1, ``2130706433`` too). ``None`` for a name.

    Raises:
        UnsafeWebhookUrl: it looks like a number but is not a valid address (``1.2.3.999``).
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise UnsafeWebhookUrl(f"{host!r} is not a valid IPv6 address", reason="invalid-host") from None
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or not _numeric(parts[-1]):
        return None
    if len(parts) > 4 or not all(_numeric(p) for p in parts):
        raise UnsafeWebhookUrl(f"{host!r} is not a valid IPv4 address", reason="invalid-host")
    numbers = [_number(p) for p in parts]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise UnsafeWebhookUrl(f"{host!r} is not a valid IPv4 address", reason="invalid-host")
    value = last
    for index, n in enumerate(head):
        value += n << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _numeric(part: str) -> bool:
    lowered = part.lower()
    if lowered.startswith("0x"):
        return all(c in "0123456789abcdef" for c in lowered[2:])
    return part.isascii() and part.isdigit()


def _number(part: str) -> int:
    lowered = part.lower()
    if lowered.startswith("0x"):
        return int(lowered[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if any(c in "89" for c in part):
            raise UnsafeWebhookUrl(f"{part!r} is not an octal number", reason="invalid-host")
        return int(part, 8)
    return int(part)


class UrlGuard:
    """Checks webhook URLs (see the module docstring).

    Args:
        resolver: host names to addresses; the system's by default.
        allow_private: let loopback and private addresses through (local receivers, tests).
    """

    def __init__(self, resolver: Resolver | None = None, *, allow_private: bool = False) -> None:
        self.resolver = resolver if resolver is not None else SystemResolver()
        self.allow_private = allow_private

    async def check(self, url: str) -> Target:
        """The URL's target, with the one address to connect to.

        Raises:
            UnsafeWebhookUrl: naming the reason (scheme, credentials, host, an address and its range).
        """
        scheme, host, port, path = _parse(url)
        literal = numeric_host(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                answers = await self.resolver.resolve(host, port)
            except (OSError, UnicodeError) as exc:
                raise UnsafeWebhookUrl(
                    f"the webhook host {host!r} does not resolve ({exc})", reason="unresolvable"
                ) from exc
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in answers]
            except ValueError as exc:
                raise UnsafeWebhookUrl(f"the resolver answered {answers!r}", reason="unresolvable") from exc
            if not addresses:
                raise UnsafeWebhookUrl(f"the webhook host {host!r} has no address", reason="unresolvable")
        for address in addresses:
            blocked = classify(address)
            if blocked is not None and not (self.allow_private and blocked.category in ALLOWED_WHEN_PRIVATE):
                raise UnsafeWebhookUrl(
                    f"webhook_url refused: {blocked.reason(host if literal is None else None)}; webhooks go "
                    "to public addresses only",
                    reason=blocked.category.value,
                )
        address = addresses[0]
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return Target(scheme, host, port, path, str(mapped or address))


def _parse(url: str) -> tuple[str, str, int, str]:
    if any(c.isspace() or ord(c) < 0x20 for c in url) or len(url) > 2048:
        raise UnsafeWebhookUrl("webhook_url holds whitespace or control characters, or is too long")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeWebhookUrl(
            f"webhook_url must be http or https, not {parts.scheme or 'schemeless'!r}", reason="scheme"
        )
    if "@" in parts.netloc:
        raise UnsafeWebhookUrl(
            "webhook_url must not carry credentials (user:password@); sign with webhook_secret instead",
            reason="credentials",
        )
    host = parts.hostname or ""
    if not host:
        raise UnsafeWebhookUrl("webhook_url has no host", reason="invalid-host")
    if "%" in host:
        raise UnsafeWebhookUrl("webhook_url must not name an IPv6 zone", reason="invalid-host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise UnsafeWebhookUrl("webhook_url has an invalid port", reason="invalid-host") from None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UnsafeWebhookUrl(f"{host!r} is not a valid host name", reason="invalid-host") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path
