"""A decode worker that misbehaves on purpose, keyed on the file name (run as a script by test_pool).

``abort-*`` calls abort() like a failed libtiff assertion, ``segv-*`` dereferences NULL like a decoder
memory fault, ``hog-*`` allocates far beyond RLIMIT_AS, ``hang-*`` never answers, ``exit-*`` quits,
``killed-*`` is SIGKILLed as if by an operator or the OOM killer, and ``killedonce-*`` only the first
time (a marker file next to it remembers). ``stutter-*`` is read normally, but every frame the worker
sends until the next ``open`` arrives in two halves, ``STUTTER_S`` apart, so the gateway spends that
time with half a frame read (as when a large mask payload crosses a full pipe).
Any other file is opened normally, so the same pool also serves ordinary files.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.decode import protocol, worker
from gateway.pipeline.raster import RasterReader, ReadOptions, open_raster
from gateway.settings import LimitSettings

STUTTER_S = 0.1
_stutter = False
_send = worker._Channel.send


def _stuttering_send(channel: worker._Channel, meta: dict[str, Any], *payload: memoryview) -> None:
    if not _stutter:
        _send(channel, meta, *payload)
        return
    head = memoryview(protocol.frame(meta, sum(p.nbytes for p in payload)))
    half = len(head) // 2
    channel._write(head[:half])
    time.sleep(STUTTER_S)
    channel._write(head[half:])
    for part in payload:
        channel._write(part.cast("B"))


worker._Channel.send = _stuttering_send  # type: ignore[method-assign]


def hostile_open(path: Path, limits: LimitSettings, options: ReadOptions) -> RasterReader:
    global _stutter
    name = path.name
    _stutter = name.startswith("stutter-")
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
