"""glibc malloc tuning for processes that move multi-megabyte tile buffers (this one and tritonserver).

Standard library only: the launcher sets the child's environment from it before anything heavy is
imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

logger = logging.getLogger(__name__)

# glibc's largest accepted mmap threshold on 64-bit is 32 MiB; a batch of 32 tiles (25 MB) fits below.
MALLOC_MMAP_THRESHOLD_BYTES: Final = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD_BYTES: Final = 256 * 1024 * 1024
MALLOC_ENV: Final = {
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD_BYTES),
}
"""The same settings for a child process, through glibc's environment variables."""
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

_malloc_tuned = False


def tune_malloc(
    mmap_threshold: int = MALLOC_MMAP_THRESHOLD_BYTES, trim_threshold: int = MALLOC_TRIM_THRESHOLD_BYTES
) -> bool:
    """Make glibc keep large blocks on the heap for this process (idempotent).

    With the default dynamic threshold every multi-megabyte request buffer is a fresh ``mmap``, and
    its pages fault in on every call. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` lets those
    buffers reuse already-mapped heap pages. Child processes get the same through
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``. Measured gain: docs/performance.md,
    "Request encoding and malloc".

    Args:
        mmap_threshold: Allocations at least this large still use ``mmap``.
        trim_threshold: Free heap top kept before memory is returned to the OS.

    Returns:
        ``True`` if glibc accepted both settings (or did already), ``False`` elsewhere.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.debug("mallopt is not available; malloc left untuned")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _malloc_tuned = ok
    logger.debug(
        "mallopt mmap_threshold=%s trim_threshold=%s accepted=%s", mmap_threshold, trim_threshold, ok
    )
    return ok
