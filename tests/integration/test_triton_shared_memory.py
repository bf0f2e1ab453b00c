"""Triton reads tiles where the decode workers wrote them: POSIX shared memory, registered on first use.

Each test writes the real tiles into a region and hands ``infer`` a *different* array as ``tiles``: an
answer equal to onnxruntime on the real tiles proves the server read the region; one equal to the other
array proves the client fell back to sending it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.decode.arena import TileRegion
from gateway.settings import TritonSettings
from gateway.shared_memory import SharedTiles
from gateway.triton.client import TritonClient
from gateway.triton.launcher import EmbeddedTriton
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def region() -> Iterator[TileRegion]:
    made = TileRegion(
        f"palm_tiles_{os.getpid()}_test{secrets.token_hex(3)}", slots=2, slot_tiles=4, tile_size=512
    )
    yield made
    made.close()
    assert not made.path.exists()


def registered(url: str) -> set[str]:
    with grpcclient.InferenceServerClient(url) as client:
        status = client.get_system_shared_memory_status(as_json=True)
    return set(status.get("regions", {}))


@pytest.mark.parametrize("batch", [1, 4])
async def test_the_server_reads_the_tiles_in_shared_memory(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
    region: TileRegion,
    batch: int,
) -> None:
    tiles = region.pixels(1, batch)
    tiles[:] = scene_tiles[:batch]
    decoy = np.zeros_like(tiles)
    async with TritonClient(triton_server.grpc_url, triton_settings) as client:
        detections = await client.infer(decoy, shared=region.shared(1, batch))
        assert region.name in registered(triton_server.grpc_url)
    np.testing.assert_allclose(detections, reference_model(np.ascontiguousarray(tiles)), rtol=1e-5, atol=1e-5)
    assert region.name not in registered(triton_server.grpc_url), "close() unregisters what it registered"


async def test_a_region_the_server_cannot_map_is_sent_over_grpc(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What happens when Triton runs on another host or in a container with its own /dev/shm."""
    tiles = np.ascontiguousarray(scene_tiles[:2])
    elsewhere = SharedTiles(
        "palm_tiles_elsewhere", "/palm_tiles_elsewhere", 2 * tiles.nbytes, 0, tiles.nbytes
    )
    caplog.set_level(logging.WARNING, logger="gateway.triton.client")
    async with TritonClient(triton_server.grpc_url, triton_settings) as client:
        first = await client.infer(tiles, shared=elsewhere)
        second = await client.infer(tiles, shared=elsewhere)
    expected = reference_model(tiles)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-5)
    refusals = [r for r in caplog.records if "cannot map shared memory" in r.getMessage()]
    assert len(refusals) == 1, "the server is asked once, then the region goes over gRPC"


async def test_shared_memory_off_always_sends_the_tiles(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
    region: TileRegion,
) -> None:
    region.pixels(0, 1)[:] = 0
    tiles = np.ascontiguousarray(scene_tiles[:1])
    settings = triton_settings.model_copy(update={"shared_memory": "off"})
    async with TritonClient(triton_server.grpc_url, settings) as client:
        detections = await client.infer(tiles, shared=region.shared(0, 1))
    np.testing.assert_allclose(detections, reference_model(tiles), rtol=1e-5, atol=1e-5)
    assert region.name not in registered(triton_server.grpc_url)


async def test_a_restarted_server_gets_the_region_registered_again(
    make_triton: Callable[..., EmbeddedTriton],
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
    region: TileRegion,
) -> None:
    tiles = region.pixels(0, 2)
    tiles[:] = scene_tiles[2:4]
    expected = reference_model(np.ascontiguousarray(tiles))
    decoy = np.zeros_like(tiles)
    server = make_triton(backoff_initial_s=0.5)
    async with server, TritonClient(server.grpc_url, triton_settings) as client:
        before = await client.infer(decoy, shared=region.shared(0, 2))
        first_pid = server.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        assert wait_for(lambda: server.restarts == 1 and server.ready, 60)
        assert region.name not in registered(server.grpc_url), "a new server starts with no regions"
        deadline = time.monotonic() + 15
        while True:  # the channel reconnects within its 1 s backoff cap
            try:
                after = await client.infer(decoy, shared=region.shared(0, 2))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert region.name in registered(server.grpc_url)
    np.testing.assert_allclose(before, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
