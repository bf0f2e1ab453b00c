"""A job's progress as users see it: a live bar on a terminal, plain lines elsewhere (logs, pipes)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True, slots=True)
class Progress:
    """The ``progress`` member of a job, with its status."""

    status: str
    files_total: int
    files_done: int
    files_failed: int
    tiles_total: int
    tiles_done: int
    detections: int
    percent: float
    tiles_per_second: float
    eta_seconds: float | None

    @classmethod
    def of(cls, job: dict[str, Any]) -> Progress:
        p = job.get("progress") or {}
        return cls(
            status=str(job.get("status", "")),
            files_total=int(p.get("files_total", 0)),
            files_done=int(p.get("files_done", 0)),
            files_failed=int(p.get("files_failed", 0)),
            tiles_total=int(p.get("tiles_total", 0)),
            tiles_done=int(p.get("tiles_done", 0)),
            detections=int(p.get("detections", 0)),
            percent=float(p.get("percent", 0.0)),
            tiles_per_second=float(p.get("tiles_per_second", 0.0)),
            eta_seconds=None if p.get("eta_seconds") is None else float(p["eta_seconds"]),
        )

    @property
    def files_settled(self) -> int:
        return self.files_done + self.files_failed

    def line(self) -> str:
        """``running: 12/300 files (1 failed), 480/3000 tiles, 35.2 tiles/s, ETA 1m12s``."""
        failed = f" ({self.files_failed} failed)" if self.files_failed else ""
        eta = f", ETA {duration(self.eta_seconds)}" if self.eta_seconds is not None else ""
        return (
            f"{self.status}: {self.files_settled}/{self.files_total} files{failed}, "
            f"{self.tiles_done}/{self.tiles_total} tiles, {self.tiles_per_second:.1f} tiles/s{eta}"
        )


def duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressDisplay:
    """Shows a job's progress on ``stream``: a tqdm bar when it is a terminal (and tqdm is installed),
    else a plain line when the status changes and at most every ``every_s`` seconds.

    Args:
        stream: where to write (standard output by default).
        tty: force the bar (True) or plain lines (False); by default whether ``stream`` is a terminal.
        every_s: the least time between two plain lines of the same status.
    """

    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, every_s: float = 5.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.every_s = every_s
        self._bar: Any = None
        self._last: tuple[str, float] = ("", 0.0)
        use_bar = self.stream.isatty() if tty is None else tty
        if use_bar:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(
                total=0,
                unit="file",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} files {postfix}",
            )

    def update(self, progress: Progress) -> None:
        if self._bar is not None:
            bar = self._bar
            bar.total = progress.files_total
            bar.n = progress.files_settled
            bar.set_description_str(progress.status, refresh=False)
            eta = f", ETA {duration(progress.eta_seconds)}" if progress.eta_seconds is not None else ""
            failed = f", {progress.files_failed} failed" if progress.files_failed else ""
            bar.set_postfix_str(
                f"{progress.tiles_done}/{progress.tiles_total} tiles, "
                f"{progress.tiles_per_second:.1f} tiles/s{eta}{failed}",
                refresh=False,
            )
            bar.refresh()
            return
        now = time.monotonic()
        status, at = self._last
        if progress.status != status or now - at >= self.every_s:
            self._last = (progress.status, now)
            print(progress.line(), file=self.stream, flush=True)

    def close(self, final: Progress | None = None) -> None:
        """Stop the bar (leaving its last state), or print the final line."""
        if self._bar is not None:
            if final is not None:
                self.update(final)
            self._bar.close()
            self._bar = None
        elif final is not None and self._last[0] != final.status:
            self.update(final)
