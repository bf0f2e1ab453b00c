"""Streaming multipart: the cap applies while streaming; names never become paths."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.api.uploads import receive_upload, safe_display_name
from gateway.errors import InputError, UnsupportedMediaType, UploadTooLarge

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
