"""A decode worker process: ``python -m gateway.decode.worker --memory-limit BYTES --parent-pid PID
--region NAME --slots N --slot-tiles T --tile-size S``.

Started by :class:`~gateway.decode.pool.DecodePool`, never by hand. It serves one raster at a time over
the protocol in :mod:`gateway.decode.protocol`, under an address-space limit (``RLIMIT_AS``), with core
dumps off, and dies with its parent (``PR_SET_PDEATHSIG``). Its original stdout carries frames only:
file descriptor 1 is pointed at stderr so nothing a C library prints can corrupt the stream. Tiles go
into the slots of its shared-memory region (:mod:`gateway.decode.arena`) that the gateway has handed
it (``free`` requests); it waits for one when it holds none.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import json
import logging
import os
import resource
import select
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.decode import protocol
from gateway.decode.arena import TileRegion
from gateway.errors import DecoderFailed, GatewayError
from gateway.pipeline.inputs import InputStatistics
from gateway.pipeline.raster import RasterReader, ReadOptions, open_raster, quicklook
from gateway.pipeline.tiling import TileSpec, balanced_batch, tile_grid
from gateway.settings import LimitSettings

logger = logging.getLogger("gateway.decode.worker")

Opener = Callable[[Path, LimitSettings, ReadOptions], RasterReader]
"""How the worker opens a file; tests inject one that crashes on purpose."""

_PR_SET_PDEATHSIG = 1


class _Channel:
    """Requests in (JSON lines on ``fd_in``), frames out (on ``fd_out``).

    ``free`` requests may arrive at any moment; they are absorbed here into :attr:`free_slots` and
    never returned by :meth:`receive`.
    """

    def __init__(self, fd_in: int, fd_out: int, slots: int) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.slots = slots
        self.free_slots: deque[int] = deque()
        self._pending = b""

    def receive(self, block: bool = True, *, until_free: bool = False) -> dict[str, Any] | None:
        """The next request other than ``free``.

        Returns ``None`` when none is waiting (``block=False``), or (``until_free``) as soon as a slot
        is free.
        """
        while True:
            while b"\n" not in self._pending:
                if until_free and self.free_slots:
                    return None
                if not block and not select.select([self.fd_in], [], [], 0)[0]:
                    return None
                chunk = os.read(self.fd_in, 65536)
                if not chunk:
                    raise EOFError
                self._pending += chunk
            line, self._pending = self._pending.split(b"\n", 1)
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("a request must be a JSON object")
            if message.get("op") != "free":
                return message
            for slot in message.get("slots") or []:
                if not isinstance(slot, int) or not 0 <= slot < self.slots or slot in self.free_slots:
                    raise ValueError(f"free names slot {slot!r}, which is not ours to take")
                self.free_slots.append(slot)

    def take_slot(self) -> int | None:
        """A free slot, waiting for the gateway to hand one back; ``None`` if ``cancel`` came first."""
        if not self.free_slots:
            request = self.receive(until_free=True)
            if request is not None:
                if request.get("op") == "cancel":
                    return None
                raise RuntimeError(f"unexpected request {request.get('op')!r} while streaming")
        return self.free_slots.popleft()

    def send(self, meta: dict[str, Any], *payload: memoryview) -> None:
        length = sum(p.nbytes for p in payload)
        self._write(memoryview(protocol.frame(meta, length)))
        for part in payload:
            self._write(part.cast("B"))

    def _write(self, data: memoryview) -> None:
        while data:
            written = os.write(self.fd_out, data)
            data = data[written:]


def main(argv: Sequence[str] | None = None, opener: Opener = open_raster) -> int:
    """Run the worker until its input closes."""
    parser = argparse.ArgumentParser(prog="gateway.decode.worker")
    parser.add_argument("--memory-limit", type=int, required=True, help="RLIMIT_AS in bytes")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--region", required=True, help="shared-memory region under /dev/shm")
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--slot-tiles", type=int, required=True)
    parser.add_argument("--tile-size", type=int, required=True, help="side of one tile, the model's S")
    args = parser.parse_args(argv)
    data_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _harden(args.memory_limit, args.parent_pid)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"decode-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("rasterio").setLevel(logging.ERROR)
    region = TileRegion(args.region, args.slots, args.slot_tiles, tile_size=args.tile_size, create=False)
    channel = _Channel(0, data_fd, region.slots)
    try:
        channel.send({"kind": "ready", "pid": os.getpid()})
        _serve(channel, region, opener, args.memory_limit)
    except (EOFError, BrokenPipeError):
        pass
    return 0


def _harden(memory_limit: int, parent_pid: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_limit if hard == resource.RLIM_INFINITY else min(memory_limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        raise SystemExit(0)
    faulthandler.enable()  # a crash leaves a Python traceback in the gateway's log


def _serve(channel: _Channel, region: TileRegion, opener: Opener, memory_limit: int) -> None:
    reader: RasterReader | None = None
    while True:
        message = channel.receive()
        assert message is not None
        op = message.get("op")
        try:
            if op == "open":
                if reader is not None:
                    reader.close()
                    reader = None
                reader = opener(
                    Path(str(message["path"])),
                    LimitSettings(**message["limits"]),
                    protocol.options_from_wire(message.get("options") or {}),
                )
                channel.send({"kind": "info", "info": protocol.info_to_wire(reader.info)})
            elif op == "tiles":
                grid = message.get("grid")
                if reader is None:
                    if grid is not None:
                        continue  # pipelined behind an open that failed: that failure was the reply
                    raise RuntimeError("tiles requested before open")
                batch_size = min(max(1, int(message["batch_size"])), region.slot_tiles)
                if grid is not None:
                    specs = tile_grid(*reader.info.read_size, int(grid[0]), int(grid[1]))
                    batch_size = balanced_batch(len(specs), batch_size)
                else:
                    specs = [protocol.spec_from_wire(s) for s in message["specs"]]
                if any(spec.size != region.tile_size for spec in specs):
                    raise RuntimeError(
                        f"tiles requested at another size than the region's {region.tile_size}"
                    )
                first = min(max(1, int(message.get("first_batch") or batch_size)), batch_size)
                canvas = None
                if message.get("quicklook_max_side"):
                    side = quicklook.capped_side(int(message["quicklook_max_side"]))
                    info = reader.info
                    canvas = quicklook.TileCanvas(info.width, info.height, *info.read_size, side)
                _stream(channel, region, reader, specs, batch_size, first, canvas)
            elif op == "quicklook":
                if reader is None:
                    raise RuntimeError("quicklook requested before open")
                max_side = quicklook.capped_side(int(message["max_side"]))
                rgba = quicklook.render(reader, reader.plan, reader.info.width, reader.info.height, max_side)
                png = quicklook.encode_png(rgba)
                channel.send(
                    {"kind": "quicklook", "width": rgba.shape[1], "height": rgba.shape[0]}, memoryview(png)
                )
            elif op == "close":
                if reader is not None:
                    reader.close()
                    reader = None
                channel.send({"kind": "closed"})
            elif op == "cancel":
                channel.send({"kind": "end", "skipped": 0, "cancelled": True})
            else:
                raise RuntimeError(f"unknown request {op!r}")
        except GatewayError as exc:
            channel.send(protocol.error_to_wire(exc))
        except MemoryError:
            channel.send(
                protocol.error_to_wire(
                    DecoderFailed(
                        "Decoding this file needs more memory than a decode worker may use "
                        f"({memory_limit / 1024**3:.1f} GiB).",
                        cause="memory",
                    ),
                    recycle=True,
                )
            )
            return
        except (EOFError, BrokenPipeError):
            raise
        except Exception as exc:
            logger.exception("decode worker failed on request %r", op)
            channel.send(
                protocol.error_to_wire(
                    DecoderFailed(
                        f"The decoder failed unexpectedly on this file ({type(exc).__name__}).",
                        cause="internal",
                    ),
                    recycle=True,
                )
            )
            return


def _stream(
    channel: _Channel,
    region: TileRegion,
    reader: RasterReader,
    specs: list[TileSpec],
    batch_size: int,
    first_batch: int,
    canvas: quicklook.TileCanvas | None = None,
) -> None:
    """Write the tiles of ``specs`` into free slots, a batch per slot (the first one of ``first_batch``
    tiles), announcing each filled slot; stop early on ``cancel``. With a ``canvas``, paint every tile
    on it too and send the quicklook before ``end``."""
    batch_size = max(1, min(batch_size, region.slot_tiles))
    limit = max(1, min(first_batch, batch_size))
    position = {id(spec): i for i, spec in enumerate(specs)}
    valid = np.empty((batch_size, region.tile_size, region.tile_size), np.bool_)
    indices: list[int] = []
    masked = False
    slot: int | None = None
    pixels = region.pixels(0, batch_size)

    def flush() -> bool:
        """Announce the filled slot; True if the gateway asked to cancel meanwhile."""
        nonlocal masked, limit, slot
        limit = batch_size
        n = len(indices)
        parts = [valid[:n].data] if masked else []
        channel.send({"kind": "batch", "indices": indices, "valid": masked, "slot": slot}, *parts)
        indices.clear()
        masked = False
        slot = None
        request = channel.receive(block=False)
        if request is not None and request.get("op") != "cancel":
            raise RuntimeError(f"unexpected request {request.get('op')!r} while streaming")
        return request is not None

    def cancelled() -> None:
        channel.send({"kind": "end", "skipped": reader.skipped, "cancelled": True})

    statistics = InputStatistics()
    for spec in specs:
        statistics.expect(spec.width, spec.height)
    for tile in reader.tiles(specs):
        if slot is None:
            slot = channel.take_slot()
            if slot is None:
                cancelled()
                return
            pixels = region.pixels(slot, batch_size)
        k = len(indices)
        pixels[k] = tile.pixels
        statistics.add(tile.pixels, tile.valid, tile.spec.width, tile.spec.height)
        if canvas is not None:
            canvas.add(tile.spec, tile.pixels, tile.valid)
        if tile.valid is not None:
            if not masked:
                valid[:k] = True
                masked = True
            valid[k] = tile.valid
        elif masked:
            valid[k] = True
        indices.append(position[id(tile.spec)])
        if len(indices) == limit and flush():
            cancelled()
            return
    if indices and flush():
        cancelled()
        return
    if canvas is not None:
        png = canvas.png()
        channel.send({"kind": "quicklook", "width": canvas.cols, "height": canvas.rows}, memoryview(png))
    summary = statistics.summary()
    channel.send(
        {
            "kind": "end",
            "skipped": reader.skipped,
            "cancelled": False,
            "inputs": summary.to_wire() if summary is not None else None,
        }
    )


if __name__ == "__main__":
    raise SystemExit(main())
