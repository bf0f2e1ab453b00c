"""The embedded server's life: restart after a crash, clean stop, clear failures, unreachable URLs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gateway import procfs
from gateway.errors import InferenceUnavailable
from gateway.procfs import alive, processes_matching
from gateway.settings import Settings, TritonSettings
from gateway.triton.client import TritonClient
from gateway.triton.launcher import SHM_DIR, EmbeddedTriton, free_ports
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration


def our_processes(server: EmbeddedTriton) -> list[int]:
    """Live processes carrying this server's shm prefix: tritonserver and its python-backend stubs."""
    return processes_matching(server.shm_prefix)


def our_shm_regions(server: EmbeddedTriton) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{server.shm_prefix}*"))


def test_stop_leaves_no_process_and_no_shared_memory(make_triton: Callable[..., EmbeddedTriton]) -> None:
    server = make_triton()
    server.start()
    server_pid = server.pid
    running = our_processes(server)
    regions = our_shm_regions(server)
    # Non-empty before stopping, or the assertions below could not fail.
    assert server_pid in running
    assert len(running) >= 2, "expected tritonserver plus at least one python-backend stub"
    assert regions
    lanes = SHM_DIR / server.lanes_name
    assert lanes.exists() or len(os.sched_getaffinity(0)) == 1, "the instances' busy table"

    server.stop()

    assert our_processes(server) == []
    assert our_shm_regions(server) == []
    assert not lanes.exists()
    assert server_pid is not None
    assert not alive(server_pid)
    assert server.pid is None
    assert not server.ready


def test_an_instance_count_runs_that_many_stubs_from_a_repository_removed_at_stop(
    make_triton: Callable[..., EmbeddedTriton], triton_settings: TritonSettings
) -> None:
    server = make_triton(triton_settings.model_copy(update={"instances": 1}))
    server.start()
    repositories = list((server.state_dir / "repositories").iterdir())
    stubs = [pid for pid in our_processes(server) if pid != server.pid]
    log = server.log_path.read_text()
    config = (repositories[0] / "palm" / "config.pbtxt").read_text()
    server.stop()
    assert len(stubs) == 1, "one python-backend stub for one instance"
    assert "palm_0_0" in log
    assert "palm_0_1" not in log
    assert len(repositories) == 1
    assert "count: 1" in config
    assert not repositories[0].exists(), "the server's own repository goes with it"
    assert (triton_settings.model_repository / "palm" / "configs" / "cpu.pbtxt").read_text().count("count: 2")


async def test_a_killed_server_is_restarted_and_the_client_recovers(
    make_triton: Callable[..., EmbeddedTriton], triton_settings: TritonSettings, scene_tiles: np.ndarray
) -> None:
    restarts: list[int] = []
    server = make_triton(backoff_initial_s=1.0, on_restart=lambda: restarts.append(1))
    async with server, TritonClient(server.grpc_url, triton_settings, retry_after_s=2) as client:
        before = await client.infer(scene_tiles[:1])
        first_pid = server.pid
        assert first_pid is not None
        stubs = [pid for pid in our_processes(server) if pid != first_pid]

        os.kill(first_pid, signal.SIGKILL)
        assert wait_for(lambda: not server.ready, 5)

        # While it is down (backoff 1 s) calls fail fast with 503-style errors, never hang.
        started = time.monotonic()
        with pytest.raises(InferenceUnavailable) as excinfo:
            await client.infer(scene_tiles[:1])
        assert time.monotonic() - started < 5
        assert excinfo.value.headers() == {"Retry-After": "2"}
        assert await client.model_ready() is False

        assert wait_for(lambda: server.restarts == 1 and server.ready, 60)
        assert server.pid not in (None, first_pid)
        assert restarts == [1]
        assert stubs
        assert not any(alive(pid) for pid in stubs)

        deadline = time.monotonic() + 15
        while True:  # the channel reconnects within its 1 s backoff cap
            try:
                after = await client.infer(scene_tiles[:1])
                break
            except InferenceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        np.testing.assert_array_equal(after, before)
    assert our_processes(server) == []
    assert our_shm_regions(server) == []


async def test_a_dead_python_backend_stub_restarts_the_server(
    make_triton: Callable[..., EmbeddedTriton], triton_settings: TritonSettings, scene_tiles: np.ndarray
) -> None:
    """Triton keeps a model whose stub died "ready" while failing every request; we restart it."""
    server = make_triton(backoff_initial_s=0.2)
    async with server, TritonClient(server.grpc_url, triton_settings) as client:
        before = await client.infer(scene_tiles[:1])
        first_pid = server.pid
        stubs = [pid for pid in our_processes(server) if pid != first_pid]
        assert stubs

        os.kill(stubs[0], signal.SIGKILL)

        assert wait_for(lambda: server.restarts == 1 and server.ready, 60)
        assert server.pid != first_pid
        deadline = time.monotonic() + 15
        while True:
            try:
                after = await client.infer(scene_tiles[:1])
                break
            except InferenceUnavailable:  # not InferenceError: this is temporary
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        np.testing.assert_array_equal(after, before)


def test_a_model_that_cannot_load_fails_start_with_the_reason(
    make_triton: Callable[..., EmbeddedTriton], triton_settings: TritonSettings, tmp_path: Path
) -> None:
    broken = tmp_path / "repo" / "palm"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "palm"\nbackend: "python"\nmax_batch_size: 1\n')
    (broken / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('broken on purpose')\n"
    )
    server = make_triton(triton_settings.model_copy(update={"model_repository": tmp_path / "repo"}))

    started = time.monotonic()
    with pytest.raises(InferenceUnavailable, match="did not get model 'palm' ready") as excinfo:
        server.start()

    assert time.monotonic() - started < triton_settings.ready_timeout_s / 2
    assert "broken on purpose" in excinfo.value.detail
    assert our_processes(server) == []
    assert our_shm_regions(server) == []


async def test_an_unreachable_url_is_unavailable_within_the_deadline() -> None:
    (port,) = free_ports(1)  # nobody listens there
    settings = TritonSettings(request_timeout_s=2.0)
    tiles = np.zeros((1, 3, 512, 512), np.uint8)

    async with TritonClient(f"127.0.0.1:{port}", settings) as client:
        started = time.monotonic()
        with pytest.raises(InferenceUnavailable):
            await client.infer(tiles)
        with pytest.raises(InferenceUnavailable):
            await client.model_info()
        assert await client.model_ready() is False
        assert time.monotonic() - started < 3 * settings.request_timeout_s


async def test_a_server_that_never_answers_is_unavailable_within_the_deadline() -> None:
    # Accepts TCP connections (the kernel's backlog) but never speaks HTTP/2: a hung or black-holed peer.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        async with TritonClient(url, TritonSettings(request_timeout_s=1.0)) as client:
            started = time.monotonic()
            with pytest.raises(InferenceUnavailable):
                await client.infer(np.zeros((1, 3, 512, 512), np.uint8))
            assert time.monotonic() - started < 3.0


async def test_the_service_refuses_a_batch_size_its_embedded_model_would_reject(
    triton_settings: TritonSettings, tmp_path: Path
) -> None:
    from gateway.runtime import open_runtime

    too_big = triton_settings.model_copy(update={"batch_size": 8})  # cpu.pbtxt: max_batch_size 4
    settings = Settings(data_dir=tmp_path, triton=too_big)

    before = set(SHM_DIR.glob(f"palm_lanes_{os.getpid()}_*"))
    with pytest.raises(ValueError, match=r"PALM_TRITON__BATCH_SIZE=8 is above the max_batch_size 4"):
        async with open_runtime(settings):
            pass
    # The server started for the check is stopped again (its instances' table is gone with it).
    assert set(SHM_DIR.glob(f"palm_lanes_{os.getpid()}_*")) == before


async def test_interrupting_the_start_leaves_no_server_behind(
    triton_settings: TritonSettings, tmp_path: Path
) -> None:
    from gateway.runtime import open_runtime

    def servers() -> set[int]:
        return {
            p for p in procfs.descendants(os.getpid()) if "tritonserver" in (procfs.command_line(p) or "")
        }

    settings = Settings(data_dir=tmp_path, triton=triton_settings)
    before = set(SHM_DIR.glob(f"palm_lanes_{os.getpid()}_*"))
    running = servers()  # the session's shared server, when another test started it

    async def start() -> None:
        async with open_runtime(settings):
            await asyncio.sleep(3600)

    task = asyncio.create_task(start())
    for _ in range(600):  # until tritonserver runs, loading the model
        if servers() - running:
            break
        await asyncio.sleep(0.05)
    assert servers() - running, "tritonserver never started"
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert servers() - running == set()
    assert set(SHM_DIR.glob(f"palm_lanes_{os.getpid()}_*")) == before
