"""One decode worker process: started, spoken to over a pipe pair, stopped, and its end described.

::

    gateway                                            python -m gateway.decode.worker
    WorkerProcess.send(request lines) ── stdin ──────▶ one JSON request per line
    WorkerProcess.receive()           ◀─ own pipe ──── frames: header, JSON metadata, payload
    WorkerProcess.give_back(slots)    ── stdin ──────▶ "free": these slots may be written again

A worker is a fresh interpreter (``python -m gateway.decode.worker``, never a ``fork`` of the threaded
gateway) in a session of its own, with single-threaded BLAS/OpenMP and few malloc arenas so that its
address-space limit (``--memory-limit``) measures the file it decodes. Its frames come back on a pipe
created here rather than on an asyncio stream: :class:`WorkerProcess` reads them straight into the
caller's buffers and reads nothing until asked, so a worker that runs ahead of its consumer blocks on
a full pipe (backpressure). The wire format is :mod:`gateway.decode.protocol`.

Reading a frame survives cancellation: the frame being read (its buffers and how far each is filled)
belongs to the :class:`WorkerProcess`, not to the awaiting coroutine, so a cancelled :meth:`receive
<WorkerProcess.receive>` leaves the pipe at a known position and the next call completes that frame.
A session cancelled mid-frame can therefore still speak the protocol to the worker (cancel, drain,
close) instead of killing it.

How a worker ended (its exit status or the signal that killed it) becomes the :class:`DecoderFailed`
the file fails with (:func:`exit_failure`) and a line in the log (:func:`exit_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway import procfs
from gateway.decode import protocol
from gateway.decode.arena import TileRegion
from gateway.errors import DecoderFailed, DecoderLost

EXTERNAL_SIGNALS: Final = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
"""Signals a worker never raises itself: it was stopped from outside, not by the file it read."""

PIPE_BYTES: Final = 1024 * 1024
"""Capacity of each worker's output pipe (frames and validity masks; pixels go through shared memory)."""
_F_SETPIPE_SZ: Final = 1031
READY_TIMEOUT_S: Final = 60.0
"""How long a new worker may take to import its libraries and say ``ready``."""
WORKER_ENV: Final = {
    # Address space is the worker's budget: no BLAS/OpenMP thread pools, few malloc arenas.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}


class WorkerProcess:
    """One worker process: requests on its stdin, frames read from its output pipe, tiles in ``region``.

    Start one with :meth:`spawn` and wait for :meth:`wait_ready` before sending requests.
    """

    def __init__(self, process: asyncio.subprocess.Process, frames_fd: int, region: TileRegion) -> None:
        self.process = process
        self.pid = process.pid
        assert process.stdin is not None
        self.stdin = process.stdin
        self.frames = _FrameReader(_PipeReader(frames_fd))
        self.region = region

    @classmethod
    async def spawn(
        cls, command: Sequence[str], region: TileRegion, *, memory_limit_bytes: int
    ) -> WorkerProcess:
        """Start ``command`` as the worker writing into ``region``.

        Args:
            command: argv of the worker; ``--memory-limit``, ``--parent-pid`` and the region arguments
                are appended.
            region: the shared-memory region the worker maps and writes its batches into.
            memory_limit_bytes: the worker's address-space limit.

        Returns:
            The running process, not yet known to be ready (see :meth:`wait_ready`).
        """
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # fewer wake-ups per batch than the default 64 KiB
            fcntl.fcntl(read_fd, _F_SETPIPE_SZ, PIPE_BYTES)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                "--memory-limit",
                str(memory_limit_bytes),
                "--parent-pid",
                str(os.getpid()),
                "--region",
                region.name,
                "--slots",
                str(region.slots),
                "--slot-tiles",
                str(region.slot_tiles),
                "--tile-size",
                str(region.tile_size),
                stdin=asyncio.subprocess.PIPE,
                stdout=write_fd,
                env={**os.environ, **WORKER_ENV},
                start_new_session=True,  # a terminal's Ctrl-C reaches the gateway, which stops workers
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(process, read_fd, region)

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait for the worker's ``ready`` frame; on any failure the process is killed and reaped.

        Raises:
            RuntimeError: the worker exited, stayed silent for ``timeout_s`` or said something else.
        """
        try:
            meta, _ = await asyncio.wait_for(self.receive(0), timeout=timeout_s)
            if meta.get("kind") != "ready":
                raise RuntimeError(f"unexpected first message {meta.get('kind')!r}")
        except BaseException as exc:
            self.kill()
            await self.reap()
            if isinstance(exc, (EOFError, TimeoutError, ValueError)):
                raise RuntimeError(f"decode worker exited during start ({self.process.returncode})") from exc
            raise

    def give_back(self, slots: list[int]) -> None:
        """Tell the worker it may write ``slots`` again (no-op once it is gone: its successor starts
        with every slot that is not leased)."""
        if self.alive and slots and not self.stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.stdin.write(protocol.request("free", slots=slots))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def running(self) -> bool:
        """Whether the process still runs, checked in ``/proc``: a killed worker shows as gone at once,
        before asyncio has reaped it (until then :attr:`alive` is still true)."""
        return self.alive and procfs.alive(self.pid)

    async def send(self, data: bytes) -> None:
        self.stdin.write(data)
        await self.stdin.drain()

    async def receive(self, max_payload: int) -> tuple[dict[str, Any], npt.NDArray[np.uint8]]:
        """The next frame: its metadata and its payload (read straight into a fresh array).

        Safe to cancel: a frame interrupted half-way is completed by the next call (whose
        ``max_payload`` then no longer applies: the frame was checked against the first one's).

        Raises:
            EOFError: the worker's output ended (it exited or crashed).
            ValueError: the frame is malformed or larger than asked for.
        """
        return await self.frames.receive(max_payload)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Close its input (it exits at end of input), then kill it if it lingers."""
        if self.alive:
            with contextlib.suppress(OSError, RuntimeError):
                self.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                self.kill()
        await self.reap()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def reap(self) -> int | None:
        """Wait (briefly) for the process to end and close its pipe; returns its exit status, if any."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5.0)
        if not self.alive:
            self.frames.close()
        return self.process.returncode


class _FrameReader:
    """Frames off a worker's output pipe, one at a time, resumable after a cancelled read.

    The frame in progress (header, metadata and payload buffers, and how many bytes of the current one
    are filled) lives here and is updated right after every read, with no ``await`` in between: a
    cancellation can only land while waiting for the pipe, and never loses bytes already taken off it.
    """

    def __init__(self, pipe: _PipeReader) -> None:
        self.pipe = pipe
        self._header = bytearray(protocol.HEADER.size)
        self._meta: bytearray | None = None
        self._payload: npt.NDArray[np.uint8] | None = None
        self._meta_read = False
        self._filled = 0

    async def receive(self, max_payload: int) -> tuple[dict[str, Any], npt.NDArray[np.uint8]]:
        if self._meta is None:
            await self._fill(memoryview(self._header))
            meta_length, payload_length = protocol.HEADER.unpack(self._header)
            if meta_length > protocol.MAX_META_BYTES or payload_length > max_payload:
                raise ValueError(f"oversized frame ({meta_length} + {payload_length} bytes)")
            self._meta = bytearray(meta_length)
            self._payload = np.empty(payload_length, np.uint8)
        assert self._payload is not None
        if not self._meta_read:
            await self._fill(memoryview(self._meta))
            self._meta_read = True
        await self._fill(self._payload.data)
        body, payload = self._meta, self._payload
        self._meta, self._payload, self._meta_read = None, None, False
        meta = json.loads(body)
        if not isinstance(meta, dict):
            raise ValueError("frame metadata is not an object")
        return meta, payload

    async def _fill(self, buffer: memoryview) -> None:
        """Fill ``buffer`` from where the last (possibly cancelled) call left it."""
        while self._filled < buffer.nbytes:
            count = await self.pipe.read_some(buffer[self._filled :])
            self._filled += count
        self._filled = 0

    def close(self) -> None:
        self.pipe.close()


class _PipeReader:
    """Reads a worker's output pipe straight into caller buffers (one copy, no stream buffer).

    Nothing is read until a frame is asked for, so a worker that is ahead of its consumer blocks on a
    full pipe: that is the backpressure.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd

    async def read_some(self, view: memoryview) -> int:
        """Read at least one byte into ``view`` (waiting until the pipe is readable); how many.

        Raises:
            EOFError: the pipe closed first.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                count = os.readv(self.fd, [view])
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(self.fd, _wake, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(self.fd)
                continue
            if count == 0:
                raise EOFError("the worker's output ended")
            return count

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _wake(waiter: asyncio.Future[None]) -> None:
    """The pipe is readable; the waiter may have been cancelled since the callback was queued."""
    if not waiter.done():
        waiter.set_result(None)


def exit_status(code: int | None) -> str:
    """How a worker ended, for the log: ``exit status 3``, ``killed by SIGSEGV``, or ``still running``."""
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    return f"exit status {code}"


def exit_failure(code: int | None, memory_limit_bytes: int) -> DecoderFailed | DecoderLost:
    """The error a file fails with when its worker ended with ``code`` (``None``: it hung).

    A signal that only comes from outside the process (SIGKILL, SIGTERM, SIGINT, SIGHUP: an operator,
    a supervisor, the kernel's OOM killer) gives :class:`DecoderLost`, which the caller may retry; a
    crash (SIGSEGV, SIGABRT, ...) or an exit gives :class:`DecoderFailed`. Running past the worker's
    own memory limit is not a signal: allocations fail inside it and it reports the file itself.
    """
    if code is not None and -code in EXTERNAL_SIGNALS:
        return DecoderLost(
            f"The decoder reading this file was stopped from outside ({_signal_name(-code)}); the file "
            "was not shown to be the cause. Retry the request.",
            cause="killed",
            signal=_signal_name(-code),
        )
    return DecoderFailed(_describe_exit(code, memory_limit_bytes), cause="crash")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe_exit(code: int | None, memory_limit_bytes: int) -> str:
    if code is None:
        return "The decoder stopped responding while reading this file."
    if code < 0:
        name = _signal_name(-code)
        what = {
            "SIGSEGV": "crashed (SIGSEGV, a memory fault)",
            "SIGABRT": "aborted (SIGABRT)",
            "SIGBUS": "crashed (SIGBUS)",
            "SIGFPE": "crashed (SIGFPE)",
            "SIGILL": "crashed (SIGILL)",
        }.get(name, f"died of {name}")
        return (
            f"The decoder {what} while reading this file; the file is probably corrupt or hostile, or "
            f"needs more than the decoder's {memory_limit_bytes / 1024**3:.1f} GiB. Other files are "
            "unaffected."
        )
    return f"The decoder exited (status {code}) while reading this file."
