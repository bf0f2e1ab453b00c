"""Streaming multipart uploads: bytes go straight to a file under the data dir, capped while streaming.

Starlette's ``request.form()`` spools the whole upload before a handler can look at its size; here the
body is parsed chunk by chunk, the ``file`` part is written to ``<data_dir>/uploads/<random>.upload``
(the client's file name is kept as metadata only, never used as a path), hashed on the way when the
caller asks for the sha256, and the request is refused with 413 the moment it passes the cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import InputError, UnsupportedMediaType, UploadTooLarge

FILE_FIELD = "file"
MAX_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    """An upload stored on local disk; the caller deletes ``path`` when done.

    ``sha256`` is the hex digest of the file's bytes, or ``None`` when the caller did not ask for it.
    """

    path: Path
    file_name: str
    size: int
    sha256: str | None
    content_type: str | None
    fields: dict[str, str]


def safe_display_name(raw: str | None) -> str:
    """The client's file name reduced to a harmless display string (basename, printable, bounded)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()
    return name[:255] or "upload"


class _PartCollector:
    """Callbacks for :class:`MultipartParser` that route the file part to disk and small fields to memory."""

    def __init__(self, target: IO[bytes], max_bytes: int, sha256: bool) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.hasher = hashlib.sha256() if sha256 else None
        self.size = 0
        self.fields: dict[str, str] = {}
        self.file_name: str | None = None
        self.file_content_type: str | None = None
        self.file_seen = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._in_file = False
        self._field_name: str | None = None
        self._field_value = bytearray()
        self.error: Exception | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._in_file = False
        self._field_name = None
        self._field_value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in params or b"filename*" in params
        if name == FILE_FIELD and self.file_seen:
            raise InputError(
                f"the form holds more than one part named {FILE_FIELD!r}; this endpoint takes one image per "
                "request (palm-serve predict takes a folder of files)"
            )
        if name == FILE_FIELD:
            self.file_seen = True
            self._in_file = True
            raw_name = params.get(b"filename*") or params.get(b"filename") or b""
            self.file_name = safe_display_name(raw_name.decode("utf-8", "replace"))
            self.file_content_type = self._headers.get("content-type")
        elif is_file:
            raise InputError(
                f"the form has no part named {FILE_FIELD!r}; it sends a file in a part named "
                f"{safe_display_name(name)!r}: name that part {FILE_FIELD!r} (curl -F file=@scene.tif)"
            )
        else:
            if len(self.fields) >= MAX_FIELDS:
                raise InputError(f"too many form fields (at most {MAX_FIELDS})")
            self._field_name = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            chunk = data[start:end]
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise UploadTooLarge(
                    f"upload exceeds {self.max_bytes} bytes; "
                    "use palm-serve predict for larger files",
                    limit_bytes=self.max_bytes,
                )
            if self.hasher is not None:
                self.hasher.update(chunk)
            self.target.write(chunk)
        elif self._field_name is not None:
            self._field_value += data[start:end]
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise InputError(f"form field {self._field_name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._field_name is not None:
            self.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
        self._in_file = False
        self._field_name = None


async def receive_upload(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    upload_dir: Path,
    max_bytes: int,
    *,
    sha256: bool = True,
) -> Upload:
    """Stream a ``multipart/form-data`` body with a ``file`` part to disk.

    Args:
        content_type: the request's ``Content-Type`` header.
        content_length: the request's ``Content-Length`` header, checked against the cap before reading.
        body: the request body, chunk by chunk.
        upload_dir: where the file part is written (created if missing).
        max_bytes: the cap on the file part's size.
        sha256: hash the file part on the way (CPU time in proportion to its size: ask only when the
            digest is reported); without it ``Upload.sha256`` is ``None``.

    Raises:
        UnsupportedMediaType: the body is not multipart/form-data.
        UploadTooLarge: the declared or received size passes ``max_bytes``.
        InputError: malformed multipart, or no ``file`` part.
    """
    mime, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(
            "send the image as multipart/form-data with a part named 'file' "
            f"(got Content-Type {content_type or 'none'!r})"
        )
    overhead = 64 * 1024
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes + overhead:
        raise UploadTooLarge(
            f"upload of {int(content_length)} bytes exceeds {max_bytes} bytes; "
            "use palm-serve predict for larger files",
            limit_bytes=max_bytes,
        )
    upload_dir.mkdir(parents=True, exist_ok=True)
    path = upload_dir / f"{secrets.token_hex(16)}.upload"
    try:
        with open(path, "xb") as target:
            collector = _PartCollector(target, max_bytes, sha256)
            parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
            async for chunk in body:
                if chunk:
                    parser.write(chunk)
            parser.finalize()
        if not collector.file_seen:
            raise InputError(f"the form has no part named {FILE_FIELD!r} holding the image")
        if collector.size == 0:
            raise InputError("the uploaded file is empty")
    except MultipartParseError as exc:
        path.unlink(missing_ok=True)
        raise InputError(f"malformed multipart body: {exc}") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Upload(
        path=path,
        file_name=collector.file_name or "upload",
        size=collector.size,
        sha256=collector.hasher.hexdigest() if collector.hasher is not None else None,
        content_type=collector.file_content_type,
        fields=collector.fields,
    )


def discard(upload: Upload) -> None:
    """Delete the stored bytes of an upload (idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(upload.path)
