"""Process facts read from Linux ``/proc``: is a pid alive, its children, its command line, its CPU time.

Used by the embedded Triton launcher to find its server's processes, by tests that check nothing is
left running, and by the benchmarks that report per-process CPU and memory. Every reader tolerates a
process that exits while it looks: a pid that is gone reads as not alive, and the per-pid readers
return ``None``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

PROC: Final = Path("/proc")
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# Positions in /proc/<pid>/stat after the command name, which may hold spaces and ends with ")".
_STATE, _PARENT, _USER_TICKS, _SYSTEM_TICKS = 0, 1, 11, 12


def pids() -> list[int]:
    """Every process id visible in ``/proc``."""
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie waiting for its parent (or init) to reap it does not."""
    fields = _stat(pid)
    return bool(fields) and fields[_STATE] != "Z"


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    return [child for child, parent in _parents().items() if parent == pid and alive(child)]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (children, their children, ...), zombies too."""
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def command_line(pid: int) -> str | None:
    """The command line of ``pid``, arguments joined by spaces (empty for kernel threads)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def processes_matching(marker: str) -> list[int]:
    """The live (not zombie) processes whose command line contains ``marker``."""
    return [pid for pid in pids() if marker in (command_line(pid) or "") and alive(pid)]


def cpu_seconds(pid: int) -> float | None:
    """CPU time ``pid`` has used so far, user plus system, in seconds."""
    fields = _stat(pid)
    if len(fields) <= _SYSTEM_TICKS:
        return None
    return (int(fields[_USER_TICKS]) + int(fields[_SYSTEM_TICKS])) / CLOCK_TICKS


def status(pid: int) -> dict[str, str] | None:
    """The fields of ``/proc/<pid>/status`` (``Name``, ``VmRSS``, ``VmHWM``, ...), values as written
    there (``"123456 kB"``)."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            found[key] = value.strip()
    return found


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name; empty if the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[-1].split()


def _parents() -> dict[int, int]:
    parents = {}
    for pid in pids():
        fields = _stat(pid)
        if len(fields) > _PARENT:
            parents[pid] = int(fields[_PARENT])
    return parents
