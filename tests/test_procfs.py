"""Process facts from /proc, checked against processes this test starts, ends and leaves as zombies."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from gateway import procfs

SLEEPER = "import time; time.sleep(60)"
SPINNER = "import time\nwhile time.process_time() < 0.5: pass\ntime.sleep(60)"
PARENT = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[1]]); time.sleep(60)"
)


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture
def marker() -> str:
    return f"procfs-test-{secrets.token_hex(6)}"


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def run(code: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_running_child_is_alive_found_and_described(
    start: Callable[..., subprocess.Popen[bytes]], marker: str
) -> None:
    child = start(SLEEPER, marker)
    assert wait_until(lambda: marker in (procfs.command_line(child.pid) or ""))
    assert procfs.alive(child.pid)
    assert child.pid in procfs.children(os.getpid())
    assert procfs.processes_matching(marker) == [child.pid]
    status = procfs.status(child.pid)
    assert status is not None
    assert status["Name"].startswith("python")
    assert status["VmHWM"].endswith("kB")


def test_cpu_seconds_count_what_a_process_used(
    start: Callable[..., subprocess.Popen[bytes]], marker: str
) -> None:
    child = start(SPINNER, marker)
    assert wait_until(lambda: (procfs.cpu_seconds(child.pid) or 0.0) >= 0.4)


def test_a_zombie_is_not_alive_but_still_a_descendant(
    start: Callable[..., subprocess.Popen[bytes]], marker: str
) -> None:
    child = start(SLEEPER, marker)
    assert wait_until(lambda: procfs.processes_matching(marker) == [child.pid])
    os.kill(child.pid, signal.SIGKILL)  # not reaped yet: a zombie until wait()
    assert wait_until(lambda: not procfs.alive(child.pid))
    assert child.pid not in procfs.children(os.getpid())
    assert procfs.processes_matching(marker) == []
    assert child.pid in procfs.descendants(os.getpid())
    child.wait()
    assert child.pid not in procfs.descendants(os.getpid())
    assert procfs.command_line(child.pid) is None
    assert procfs.cpu_seconds(child.pid) is None
    assert procfs.status(child.pid) is None


def test_descendants_reach_grandchildren(start: Callable[..., subprocess.Popen[bytes]], marker: str) -> None:
    parent = start(PARENT, marker)
    assert wait_until(lambda: len(procfs.processes_matching(marker)) == 2)
    (grandchild,) = [pid for pid in procfs.processes_matching(marker) if pid != parent.pid]
    assert procfs.children(parent.pid) == [grandchild]
    assert grandchild not in procfs.children(os.getpid())
    assert set(procfs.descendants(os.getpid())) >= {parent.pid, grandchild}
