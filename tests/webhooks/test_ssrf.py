"""The SSRF guard through a stub resolver: no packet ever goes to the addresses in this table."""

from __future__ import annotations

import pytest

from gateway.webhooks.ssrf import Target, UnsafeWebhookUrl, UrlGuard


class StubResolver:
    """Answers from a table; each name may answer differently on each lookup (a rebinding server)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        sequence = self.answers.get(host)
        if not sequence:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return sequence.pop(0) if len(sequence) > 1 else sequence[0]


PUBLIC = "93.184.216.34"

BLOCKED_HOSTS = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("2130706433", "loopback"),
    ("0x7f000001", "loopback"),
    ("0177.0.0.1", "loopback"),
    ("127.1", "loopback"),
    ("0x7f.1", "loopback"),
    ("[::1]", "loopback"),
    ("localhost.test", "loopback"),  # a name resolving to 127.0.0.1
    ("10.0.0.5", "private"),
    ("10.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("3232235777", "private"),  # 192.168.1.1 as one number
    ("[fd00::1]", "private"),
    ("169.254.169.254", "link-local"),
    ("0xa9fea9fe", "link-local"),  # the metadata address in hex
    ("[fe80::1]", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("[ff02::1]", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("0", "unspecified"),
    ("[::]", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("198.18.0.1", "reserved"),
    ("192.0.2.1", "documentation"),
    ("[::ffff:127.0.0.1]", "loopback"),  # IPv4-mapped
    ("[::ffff:a9fe:a9fe]", "link-local"),  # IPv4-mapped metadata address
    ("[64:ff9b::7f00:1]", "loopback"),  # NAT64
    ("[64:ff9b::a00:1]", "private"),  # NAT64 of 10.0.0.1
    ("[2002:7f00:1::]", "loopback"),  # 6to4
    ("[2002:c0a8:101::1]", "private"),  # 6to4 of 192.168.1.1
    ("[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "reserved"),  # Teredo
    ("[::127.0.0.1]", "reserved"),  # IPv4-compatible (deprecated)
    ("[2001:db8::1]", "documentation"),
    ("mixed.test", "private"),  # one public and one private answer: refused
]


@pytest.fixture
def resolver() -> StubResolver:
    return StubResolver(
        {
            "hooks.example.com": [[PUBLIC]],
            "localhost.test": [["127.0.0.1"]],
            "mixed.test": [[PUBLIC, "10.0.0.7"]],
            "v6.example.com": [["2606:2800:220:1:248:1893:25c8:1946"]],
        }
    )


def test_the_table_holds_enough_cases() -> None:
    assert len(BLOCKED_HOSTS) >= 25


@pytest.mark.parametrize(("host", "category"), BLOCKED_HOSTS)
async def test_blocked_addresses_are_refused_naming_the_range(
    resolver: StubResolver, host: str, category: str
) -> None:
    guard = UrlGuard(resolver)
    with pytest.raises(UnsafeWebhookUrl, match=category) as refused:
        await guard.check(f"https://{host}:8443/hook")
    assert refused.value.status == 422


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://hooks.example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://hooks.example.com", "http or https"),
        ("https://user:pass@hooks.example.com/x", "credentials"),
        ("https://token@hooks.example.com/x", "credentials"),
        ("https:///no-host", "no host"),
        ("https://1.2.3.999/", "not a valid IPv4"),
        ("https://089.1.1.1/", "not an octal"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://hooks.example.com:99999/", "invalid port"),
        ("https://nowhere.test/", "does not resolve"),
        ("https://hooks.example.com/a b", "whitespace"),
    ],
)
async def test_malformed_urls_are_refused_with_the_reason(
    resolver: StubResolver, url: str, reason: str
) -> None:
    with pytest.raises(UnsafeWebhookUrl, match=reason):
        await UrlGuard(resolver).check(url)


async def test_public_targets_pass_with_the_address_to_connect_to(resolver: StubResolver) -> None:
    guard = UrlGuard(resolver)
    target = await guard.check("https://hooks.example.com/palm?x=1")
    assert target == Target("https", "hooks.example.com", 443, "/palm?x=1", PUBLIC)
    assert target.authority == "hooks.example.com"
    six = await guard.check("http://v6.example.com:8080")
    assert (six.address, six.path, six.authority) == (
        "2606:2800:220:1:248:1893:25c8:1946",
        "/",
        "v6.example.com:8080",
    )
    numeric = await guard.check("http://0x5db8d822/")  # 93.184.216.34 in hex: decoded, not resolved
    assert numeric.address == PUBLIC
    mapped = await guard.check("http://[::ffff:93.184.216.34]/")
    assert mapped.address == PUBLIC
    assert resolver.lookups == ["hooks.example.com", "v6.example.com"]


async def test_a_rebinding_resolver_is_caught_at_the_next_check() -> None:
    rebinding = StubResolver({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    guard = UrlGuard(rebinding)
    first = await guard.check("https://rebind.test/hook")  # at job creation: a public answer
    assert first.address == PUBLIC
    with pytest.raises(UnsafeWebhookUrl, match=r"rebind\.test resolves to 127\.0\.0\.1, which is loopback"):
        await guard.check("https://rebind.test/hook")  # before the send: now loopback
    assert rebinding.lookups == ["rebind.test", "rebind.test"]


async def test_allow_private_lets_loopback_and_private_through_but_not_the_rest(
    resolver: StubResolver,
) -> None:
    guard = UrlGuard(resolver, allow_private=True)
    assert (await guard.check("http://127.0.0.1:9000/h")).address == "127.0.0.1"
    assert (await guard.check("http://localhost.test/h")).address == "127.0.0.1"
    assert (await guard.check("http://10.0.0.5/h")).address == "10.0.0.5"
    for url in (
        "http://169.254.169.254/latest",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
    ):
        with pytest.raises(UnsafeWebhookUrl):
            await guard.check(url)
