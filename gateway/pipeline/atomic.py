"""Files that appear whole or not at all: written under a temporary name, synced, renamed into place.

A reader of ``path`` sees the previous file or the complete new one, never a part, and after
:func:`atomic_write` returns the new file survives a power loss: its data is synced before the rename
and its directory after. The temporary file is ``.<name>.<random>.tmp`` next to ``path`` (a rename
stays atomic only within one filesystem); a process killed mid-write leaves it behind, and such files
are safe to delete.

A full disk (``ENOSPC``) or a spent quota (``EDQUOT``) raises
:class:`~gateway.errors.InsufficientStorage`; other ``OSError`` s propagate unchanged. Blocking: call it
from a thread when on an event loop.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from gateway.errors import InsufficientStorage

BUFFER_BYTES = 1 << 20

_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class AtomicFile:
    """The file :func:`atomic_write` yields: a binary sink that counts and hashes what goes through it.

    Attributes:
        path: where the file appears once complete.
    """

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self._file = file
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        """Append ``data``; returns its length in bytes.

        Raises:
            InsufficientStorage: the filesystem is full or the quota spent.
        """
        try:
            self._file.write(data)
        except OSError as exc:
            _raise_if_full(exc, self.path)
            raise
        self._hash.update(data)
        size = memoryview(data).nbytes
        self._size += size
        return size

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far: the file's digest once :func:`atomic_write` returns."""
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        """Bytes written so far: the file's size once :func:`atomic_write` returns."""
        return self._size


@contextmanager
def atomic_write(path: Path) -> Iterator[AtomicFile]:
    """Write ``path`` whole or not at all.

    Example::

        with atomic_write(target) as out:
            write_coco(out, ...)
        record(target, out.sha256, out.size)

    When the block ends normally, the data is flushed and synced, the temporary file renamed over
    ``path`` and the directory synced. When it raises, the temporary file is removed and ``path`` is left
    as it was (absent, or the previous file), unless only the last step, the directory's sync, failed.

    Args:
        path: the file to create or replace; its directory must exist.

    Yields:
        The file to write into; its :attr:`~AtomicFile.sha256` and :attr:`~AtomicFile.size` describe
        ``path`` after the block.

    Raises:
        InsufficientStorage: the filesystem is full or the quota spent.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        _raise_if_full(exc, path)
        raise
    # Not a with block: closing after a failure must not replace the caller's exception with the
    # flush's own (on a full disk the buffered rest fails again).
    file = open(fd, "wb", buffering=BUFFER_BYTES)  # noqa: SIM115
    try:
        target = AtomicFile(path, file)
        yield target
        try:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.replace(temporary, path)
            _sync_directory(path.parent)
        except OSError as exc:
            _raise_if_full(exc, path)
            raise
    except BaseException:
        with suppress(OSError):
            file.close()
        temporary.unlink(missing_ok=True)
        raise


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_if_full(exc: OSError, path: Path) -> None:
    """Raise ``exc`` as :class:`InsufficientStorage` when it says the storage is full."""
    if exc.errno in _STORAGE_FULL:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is spent"
        raise InsufficientStorage(f"Could not write {path.name}: {reason}.") from exc
