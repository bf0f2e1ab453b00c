"""Streaming multipart: the cap applies while streaming; names never become paths."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import InputError, UnsupportedMediaType, UploadTooLarge
from gateway.uploads import receive_upload, safe_display_name

BOUNDARY = "palmboundary"
CT = f"multipart/form-data; boundary={BOUNDARY}"


def body(payload: bytes, name: str = "file", filename: str = "scene.tif") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/tiff\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\x\\evil.tif", "evil.tif"),
        ("", "upload"),
        ("a\x00b.tif", "ab.tif"),
    ],
)
def test_display_names_are_harmless(raw: str, expected: str) -> None:
    assert safe_display_name(raw) == expected


async def test_file_is_streamed_to_a_random_name(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 50
    up = await receive_upload(CT, None, chunks(body(payload, filename="../x.tif")), tmp_path, 1 << 20)
    assert up.path.parent == tmp_path
    assert up.path.name.endswith(".upload")
    assert up.path.read_bytes() == payload
    assert up.sha256 == hashlib.sha256(payload).hexdigest()
    assert up.file_name == "x.tif"
    assert up.size == len(payload)


async def test_cap_is_enforced_while_streaming_and_nothing_is_left(tmp_path: Path) -> None:
    with pytest.raises(UploadTooLarge, match="exceeds 4096 bytes"):
        await receive_upload(CT, None, chunks(body(b"x" * 10_000)), tmp_path, 4096)
    assert list(tmp_path.iterdir()) == []


async def test_declared_length_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("body must not be read")
        yield b""

    with pytest.raises(UploadTooLarge):
        await receive_upload(CT, str(10**9), never(), tmp_path, 4096)


async def test_missing_file_part_and_wrong_content_type(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no part named 'file'; it sends a file in a part named 'image'"):
        await receive_upload(CT, None, chunks(body(b"x" * 100_000, name="image")), tmp_path, 1 << 20)
    two = body(b"abc")[: -len(f"--{BOUNDARY}--\r\n")] + body(b"def")
    with pytest.raises(InputError, match="more than one part named 'file'"):
        await receive_upload(CT, None, chunks(two), tmp_path, 4096)
    with pytest.raises(UnsupportedMediaType, match="multipart/form-data"):
        await receive_upload("application/json", None, chunks(b"{}"), tmp_path, 4096)
    assert list(tmp_path.iterdir()) == []


async def test_the_hash_is_skipped_when_not_asked_for(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 50
    up = await receive_upload(CT, None, chunks(body(payload)), tmp_path, 1 << 20, sha256=False)
    assert up.sha256 is None
    assert up.path.read_bytes() == payload
    assert up.size == len(payload)


async def test_a_boundary_longer_than_rfc_2046_allows_is_refused(tmp_path: Path) -> None:
    boundary = "b" * 300
    with pytest.raises(InputError, match="boundary is 300 characters long"):
        await receive_upload(f"multipart/form-data; boundary={boundary}", None, chunks(b"x"), tmp_path, 4096)


async def test_every_part_counts_whatever_its_name(tmp_path: Path) -> None:
    many = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n'.encode()
        for _ in range(50_000)
    )
    with pytest.raises(InputError, match="more than 17 parts"):
        await receive_upload(CT, None, chunks(many + body(b"abc"), 64 * 1024), tmp_path, 1 << 20)
    assert list(tmp_path.iterdir()) == []


async def test_the_whole_body_is_capped_not_only_the_file(tmp_path: Path) -> None:
    fields = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\n'.encode()
        + b"v" * 60_000
        + b"\r\n"
        for i in range(2)
    )
    with pytest.raises(UploadTooLarge, match="request body exceeds"):
        await receive_upload(CT, None, chunks(fields + body(b"x" * 1000), 4096), tmp_path, 4096)
    with pytest.raises(InputError, match="goes on after its closing boundary"):
        await receive_upload(CT, None, chunks(body(b"x" * 1000) + b"z" * 5000, 512), tmp_path, 1 << 20)
    assert list(tmp_path.iterdir()) == []


async def test_a_body_without_its_closing_boundary_is_incomplete(tmp_path: Path) -> None:
    truncated = body(b"x" * 1000)[: -len(f"\r\n--{BOUNDARY}--\r\n")]
    with pytest.raises(InputError, match="ends before its closing boundary"):
        await receive_upload(CT, None, chunks(truncated), tmp_path, 1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_names_lose_characters_that_hide_or_reorder_text() -> None:
    assert safe_display_name("invoice\u202egpj.tif") == "invoicegpj.tif"
    assert safe_display_name("a\u200bb\u2028c.tif") == "abc.tif"
    assert safe_display_name("palmeraie-\u00e9t\u00e9.tif") == "palmeraie-\u00e9t\u00e9.tif"
