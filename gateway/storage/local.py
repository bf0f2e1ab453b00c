"""The storage interface and its local-directory implementation."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class Storage(Protocol):
    """What the job engine needs from a place that keeps bytes."""

    def staging_dir(self) -> Path:
        """A local directory on the same filesystem where uploads stream before :meth:`put`."""
        ...

    def put(self, key: str, source: Path) -> None:
        """Move the local file ``source`` (in :meth:`staging_dir`) to ``key``."""
        ...

    def local_path(self, key: str) -> Path:
        """A local path holding the bytes of ``key``, for a reader that needs a file."""
        ...

    def result_path(self, key: str) -> Path:
        """The local path a result for ``key`` is written to (atomically, by the writer)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix/``."""
        ...

    def prefixes(self, parent: str) -> list[str]:
        """The names directly under ``parent/``."""
        ...


class LocalStorage:
    """Keys as files under ``root``.

    Args:
        root: the directory; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "incoming").mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root / key

    def staging_dir(self) -> Path:
        return self.root / "incoming"

    def put(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def result_path(self, key: str) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def prefixes(self, parent: str) -> list[str]:
        directory = self._path(parent)
        if not directory.is_dir():
            return []
        return sorted(entry.name for entry in directory.iterdir())

    def sweep_staging(self, older_than_s: float) -> int:
        """Delete staged uploads older than ``older_than_s`` (left by a request that died); how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.staging_dir().iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed
