"""Streaming multipart uploads: file parts go straight to files under the data dir, capped while streaming.

Starlette's ``request.form()`` spools the whole upload before a handler can look at its size; here the
body is parsed chunk by chunk and each file part is written to ``<directory>/<random>.upload`` as it
arrives (the client's file name is kept as metadata only, never used as a path), hashed on the way
when the caller asks for the sha256. Refused, with nothing left on disk:

* not ``multipart/form-data``, or a boundary longer than RFC 2046's 70 characters;
* a file part over its byte cap, or a body (preamble, parts, epilogue) over the whole-body cap: 413
  the moment it passes, and at once when ``Content-Length`` already says so;
* more parts than files plus fields allow (every part counts, whatever its name), more files than
  allowed, a field over its size, a file in a part not named as the endpoint expects;
* a body that ends before its closing boundary, or sends more than a little data after it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import InputError, InsufficientStorage, UnsupportedMediaType, UploadTooLarge

FILE_FIELD = "file"
MAX_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024
MAX_BOUNDARY_CHARS: Final = 70
"""RFC 2046 section 5.1.1."""
FORM_OVERHEAD_BYTES: Final = 64 * 1024
"""Part headers, fields and boundaries a body may carry beyond its files' bytes."""
MAX_EPILOGUE_BYTES: Final = 1024
HEAD_BYTES: Final = 512
"""Leading bytes of each file kept for format sniffing."""
_HIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Control, format (bidi overrides, zero-width), surrogate, private, unassigned, line/paragraph
separators: characters that render as nothing or reorder what follows."""


@dataclass(frozen=True, slots=True)
class FormLimits:
    """What one endpoint accepts in a multipart body.

    Attributes:
        file_field: the part name files are sent under (``file``).
        max_files: file parts accepted.
        max_file_bytes: cap on each file.
        max_total_bytes: cap on the whole body, files and everything else.
        max_fields: non-file parts accepted.
        max_field_bytes: cap on each field's value.
        too_many_files: what to say when more than ``max_files`` arrive.
    """

    file_field: str = FILE_FIELD
    max_files: int = 1
    max_file_bytes: int = 2 * 1024**3
    max_total_bytes: int = 2 * 1024**3 + FORM_OVERHEAD_BYTES
    max_fields: int = MAX_FIELDS
    max_field_bytes: int = MAX_FIELD_BYTES
    too_many_files: str = "this endpoint takes one image per request"


@dataclass(frozen=True, slots=True)
class Upload:
    """A file part stored on local disk; the caller deletes ``path`` when done.

    ``sha256`` is the hex digest of the file's bytes, or ``None`` when the caller did not ask for it;
    ``head`` holds its first bytes (for sniffing its format); ``fields`` are the form's other parts.
    """

    path: Path
    file_name: str
    size: int
    sha256: str | None
    content_type: str | None
    fields: dict[str, str]
    head: bytes = b""


@dataclass(frozen=True, slots=True)
class Form:
    """A parsed multipart body: its files (in order, on disk) and its fields."""

    files: tuple[Upload, ...]
    fields: dict[str, str]


def safe_display_name(raw: str | None) -> str:
    """The client's file name reduced to a harmless display string (basename, printable, bounded)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch for ch in name if unicodedata.category(ch) not in _HIDDEN_CATEGORIES).strip()
    return name[:255] or "upload"


class _File:
    """One file part being written."""

    def __init__(self, directory: Path, name: str, content_type: str | None, sha256: bool) -> None:
        self.path = directory / f"{secrets.token_hex(16)}.upload"
        self.name = name
        self.content_type = content_type
        self.handle: IO[bytes] = open(self.path, "xb")  # noqa: SIM115 (closed in end() or discard())
        self.hasher = hashlib.sha256() if sha256 else None
        self.size = 0
        self.head = b""

    def write(self, chunk: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.size += len(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)
        self.handle.write(chunk)

    def end(self, fields: dict[str, str]) -> Upload:
        self.handle.close()
        return Upload(
            path=self.path,
            file_name=self.name,
            size=self.size,
            sha256=self.hasher.hexdigest() if self.hasher is not None else None,
            content_type=self.content_type,
            fields=fields,
            head=self.head,
        )

    def discard(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


class _FormCollector:
    """Callbacks for :class:`MultipartParser`: file parts to disk, small fields to memory, limits kept."""

    def __init__(
        self,
        directory: Path,
        limits: FormLimits,
        sha256: bool,
        check_name: Callable[[str], None] | None,
        rename: Callable[[str], str],
    ) -> None:
        self.directory = directory
        self.limits = limits
        self.sha256 = sha256
        self.check_name = check_name
        self.rename = rename
        self.fields: dict[str, str] = {}
        self.done: list[_File] = []
        self.parts = 0
        self.ended = False
        self._file: _File | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._field_name: str | None = None
        self._field_value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        allowed = self.limits.max_files + self.limits.max_fields
        if self.parts > allowed:
            raise InputError(f"the form has more than {allowed} parts")
        self._headers = {}
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
        field = self.limits.file_field
        if name == field:
            if len(self.done) >= self.limits.max_files:
                count = "one part" if self.limits.max_files == 1 else f"{self.limits.max_files} parts"
                raise InputError(
                    f"the form holds more than {count} named {field!r}; {self.limits.too_many_files}"
                )
            raw_name = (params.get(b"filename*") or params.get(b"filename") or b"").decode("utf-8", "replace")
            if self.check_name is not None:
                self.check_name(raw_name)
            self._file = _File(
                self.directory, self.rename(raw_name), self._headers.get("content-type"), self.sha256
            )
        elif b"filename" in params or b"filename*" in params:
            raise InputError(
                f"the form has no part named {field!r}; it sends a file in a part named "
                f"{safe_display_name(name)!r}: name that part {field!r} (curl -F {field}=@scene.tif)"
            )
        else:
            if len(self.fields) >= self.limits.max_fields:
                raise InputError(f"too many form fields (at most {self.limits.max_fields})")
            self._field_name = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            if self._file.size + (end - start) > self.limits.max_file_bytes:
                raise UploadTooLarge(
                    f"the file {self._file.name!r} exceeds {self.limits.max_file_bytes} bytes; "
                    "use palm-serve predict for larger files",
                    limit_bytes=self.limits.max_file_bytes,
                )
            self._file.write(data[start:end])
        elif self._field_name is not None:
            self._field_value += data[start:end]
            if len(self._field_value) > self.limits.max_field_bytes:
                raise InputError(
                    f"form field {self._field_name!r} is longer than {self.limits.max_field_bytes} bytes"
                )

    def on_part_end(self) -> None:
        if self._field_name is not None:
            self.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
        if self._file is not None:
            self.done.append(self._file)
            self._file.handle.close()
        self._file = None
        self._field_name = None

    def on_end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        for part in [*self.done, *([self._file] if self._file is not None else [])]:
            part.discard()


async def receive_form(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    directory: Path,
    limits: FormLimits,
    *,
    sha256: bool = True,
    check_name: Callable[[str], None] | None = None,
    rename: Callable[[str], str] = safe_display_name,
) -> Form:
    """Stream a ``multipart/form-data`` body: file parts to files in ``directory``, fields to memory.

    Args:
        content_type: the request's ``Content-Type`` header.
        content_length: the request's ``Content-Length`` header, checked against the cap before reading.
        body: the request body, chunk by chunk.
        directory: where file parts are written (created if missing).
        limits: what the endpoint accepts.
        sha256: hash each file on the way (CPU time in proportion to its size: ask only when the digest
            is reported); without it each ``Upload.sha256`` is ``None``.
        check_name: called with each file part's name as the client sent it, before its bytes are
            read; what it raises refuses the request (a repeated name, say).
        rename: the name an upload keeps, from the client's (by default the base name, harmless).

    Raises:
        UnsupportedMediaType: the body is not multipart/form-data.
        UploadTooLarge: a file, or the whole body, passes its cap (declared or received).
        InputError: malformed multipart or a limit of ``limits`` passed (see the module docstring).
    """
    mime, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(
            f"send the image as multipart/form-data with a part named {limits.file_field!r} "
            f"(got Content-Type {content_type or 'none'!r})"
        )
    if len(boundary) > MAX_BOUNDARY_CHARS:
        raise InputError(
            f"the multipart boundary is {len(boundary)} characters long; RFC 2046 allows at most "
            f"{MAX_BOUNDARY_CHARS}"
        )
    if (
        content_length is not None
        and content_length.isdigit()
        and int(content_length) > limits.max_total_bytes
    ):
        raise UploadTooLarge(
            f"a request body of {int(content_length)} bytes exceeds the {limits.max_total_bytes} bytes "
            "this endpoint accepts; use palm-serve predict for larger files",
            limit_bytes=limits.max_total_bytes,
        )
    directory.mkdir(parents=True, exist_ok=True)
    collector = _FormCollector(directory, limits, sha256, check_name, rename)
    received = 0
    epilogue = 0
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in body:
            if not chunk:
                continue
            received += len(chunk)
            if received > limits.max_total_bytes:
                raise UploadTooLarge(
                    f"the request body exceeds the {limits.max_total_bytes} bytes this endpoint accepts",
                    limit_bytes=limits.max_total_bytes,
                )
            if collector.ended:
                epilogue += len(chunk)
                if epilogue > MAX_EPILOGUE_BYTES:
                    raise InputError("the multipart body goes on after its closing boundary")
                continue
            parser.write(chunk)
        parser.finalize()
        if not collector.ended:
            raise InputError("the multipart body ends before its closing boundary; the upload is incomplete")
    except FormParserError as exc:
        collector.discard()
        raise InputError(f"malformed multipart body: {exc}") from exc
    except OSError as exc:
        collector.discard()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the server has no room left for this upload; retry later") from exc
        raise
    except BaseException:
        collector.discard()
        raise
    return Form(tuple(part.end(collector.fields) for part in collector.done), collector.fields)


async def receive_upload(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    upload_dir: Path,
    max_bytes: int,
    *,
    sha256: bool = True,
) -> Upload:
    """Stream a ``multipart/form-data`` body with one ``file`` part to disk (see :func:`receive_form`).

    Raises:
        UnsupportedMediaType: the body is not multipart/form-data.
        UploadTooLarge: the declared or received size passes ``max_bytes``.
        InputError: malformed multipart, no ``file`` part, or an empty one.
    """
    limits = FormLimits(max_file_bytes=max_bytes, max_total_bytes=max_bytes + FORM_OVERHEAD_BYTES)
    form = await receive_form(content_type, content_length, body, upload_dir, limits, sha256=sha256)
    if not form.files:
        raise InputError(f"the form has no part named {FILE_FIELD!r} holding the image")
    (upload,) = form.files
    if upload.size == 0:
        discard(upload)
        raise InputError("the uploaded file is empty")
    return upload


def discard(upload: Upload) -> None:
    """Delete the stored bytes of an upload (idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(upload.path)
