"""A decode worker that misbehaves on purpose, keyed on the file name (run as a script by test_pool).

``abort-*`` calls abort() like a failed libtiff assertion, ``segv-*`` dereferences NULL like a decoder
memory fault, ``hog-*`` allocates far beyond RLIMIT_AS, ``hang-*`` never answers, ``exit-*`` quits,
``killed-*`` is SIGKILLed as if by an operator or the OOM killer, and ``killedonce-*`` only the first
time (a marker file next to it remembers).
Any other file is opened normally, so the same pool also serves ordinary files.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from gateway.decode import worker
from gateway.pipeline.raster import RasterReader, ReadOptions, open_raster
from gateway.settings import LimitSettings


def hostile_open(path: Path, limits: LimitSettings, options: ReadOptions) -> RasterReader:
    name = path.name
    if name.startswith("abort-"):
        os.abort()
    if name.startswith("segv-"):
        ctypes.string_at(0)
    if name.startswith("hog-"):
        hoard = np.ones(64 * 1024**3, np.uint8)  # 64 GiB: MemoryError under the worker's RLIMIT_AS
        del hoard
    if name.startswith("hang-"):
        time.sleep(3600)
    if name.startswith("exit-"):
        os._exit(3)
    marker = path.with_name(path.name + ".killed")
    if name.startswith("killed-") or (name.startswith("killedonce-") and not marker.exists()):
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return open_raster(path, limits, options)


if __name__ == "__main__":
    sys.exit(worker.main(sys.argv[1:], opener=hostile_open))
