"""The embedded tritonserver serves the real model, equal to onnxruntime in-process, batched."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest

from gateway.decode.arena import TileRegion
from gateway.errors import InferenceError
from gateway.scheduling import Priority
from gateway.settings import REPO_ROOT, TritonSettings
from gateway.triton.client import TritonClient
from gateway.triton.launcher import EmbeddedTriton

CARD = REPO_ROOT / "model_repository" / "palm" / "1" / "model_card.json"
TOP_K = json.loads(CARD.read_text())["contract"]["outputs"][0]["shape"][1]  # rows per tile

pytestmark = pytest.mark.integration


async def test_model_is_ready_and_described(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings
) -> None:
    async with TritonClient(triton_server.grpc_url, triton_settings) as client:
        assert await client.model_ready() is True
        info = await client.model_info()

    assert (info.name, info.version, info.backend) == ("palm", "1", "python")
    assert info.max_batch_size == 4


@pytest.mark.parametrize("batch", [1, 3, 4])
async def test_triton_output_equals_onnxruntime_in_process(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
    batch: int,
) -> None:
    tiles = np.ascontiguousarray(scene_tiles[:batch])
    async with TritonClient(triton_server.grpc_url, triton_settings) as client:
        detections = await client.infer(tiles)

    expected = reference_model(tiles)
    assert detections.shape == (batch, TOP_K, 6)
    assert detections.dtype == np.float32
    np.testing.assert_allclose(detections, expected, rtol=1e-5, atol=1e-5)
    # The numpy-2 trap (stub reading zeros) would make every tile answer like a black tile.
    black = reference_model(np.zeros_like(tiles[:1]))[0]
    assert not np.allclose(detections[0], black, atol=1e-3)


async def test_concurrent_clients_are_batched_and_answers_stay_with_their_request(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
) -> None:
    clients = [TritonClient(triton_server.grpc_url, triton_settings) for _ in range(3)]
    try:
        before = await clients[0].statistics()
        # 12 single-tile requests from three clients at once: the dynamic batcher must merge them.
        jobs = [(clients[i % 3], i % len(scene_tiles)) for i in range(12)]
        results = await asyncio.gather(*(c.infer(scene_tiles[k : k + 1]) for c, k in jobs))
        after = await clients[0].statistics()
    finally:
        for client in clients:
            await client.close()

    expected = reference_model(scene_tiles)
    for (_, k), detections in zip(jobs, results, strict=True):
        np.testing.assert_allclose(detections[0], expected[k], rtol=1e-5, atol=1e-5)
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 12
    assert executions < inferences
    batched = {size: n - before.batch_executions.get(size, 0) for size, n in after.batch_executions.items()}
    assert any(size > 1 and n > 0 for size, n in batched.items())

    metrics = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
    count = re.search(r'^nv_inference_count\{model="palm",version="1"\} (\d+)', metrics, re.M)
    execs = re.search(r'^nv_inference_exec_count\{model="palm",version="1"\} (\d+)', metrics, re.M)
    assert count is not None
    assert execs is not None
    assert int(execs.group(1)) < int(count.group(1))


async def test_a_rejected_request_does_not_fail_its_neighbours(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, scene_tiles: np.ndarray
) -> None:
    too_many = np.zeros((5, 3, 512, 512), np.uint8)  # cpu.pbtxt: max_batch_size 4
    async with TritonClient(triton_server.grpc_url, triton_settings) as client:
        outcomes = await asyncio.gather(
            client.infer(scene_tiles[:2]),
            client.infer(too_many),
            client.infer(scene_tiles[2:3]),
            return_exceptions=True,
        )
        assert await client.model_ready()

    assert isinstance(outcomes[1], InferenceError)
    assert "batch" in outcomes[1].detail
    assert isinstance(outcomes[0], np.ndarray)
    assert outcomes[0].shape == (2, TOP_K, 6)
    assert isinstance(outcomes[2], np.ndarray)
    assert outcomes[2].shape == (1, TOP_K, 6)


@pytest.mark.parametrize("transport", ["grpc", "shared memory"])
async def test_online_requests_overtake_queued_batch_requests(
    triton_server: EmbeddedTriton,
    triton_settings: TritonSettings,
    scene_tiles: np.ndarray,
    reference_model: Callable[[np.ndarray], np.ndarray],
    transport: str,
) -> None:
    """cpu.pbtxt declares two priority levels: a request at level 1 (online) sent behind a queue of
    level-2 (batch) requests runs before most of them, on both ways a request can carry its tiles."""
    tiles = np.ascontiguousarray(scene_tiles[:4])
    region = TileRegion(
        f"palm_tiles_{os.getpid()}_prio{secrets.token_hex(3)}", slots=1, slot_tiles=4, tile_size=512
    )
    region.pixels(0, 4)[:] = tiles
    shared = region.shared(0, 4) if transport == "shared memory" else None
    finished: list[Priority] = []

    async def call(client: TritonClient, priority: Priority) -> np.ndarray:
        detections = await client.infer(tiles, shared=shared, priority=priority)
        finished.append(priority)
        return detections

    try:
        async with TritonClient(triton_server.grpc_url, triton_settings) as client:
            await call(client, Priority.BATCH)  # registers the region, warms the channel
            finished.clear()
            queue = [asyncio.create_task(call(client, Priority.BATCH)) for _ in range(12)]
            await asyncio.sleep(0.05)  # the batch requests are at the server, two of them running
            online = await call(client, Priority.ONLINE)
            answers = await asyncio.gather(*queue)
    finally:
        region.close()

    expected = reference_model(tiles)
    for detections in [online, *answers]:
        np.testing.assert_allclose(detections, expected, rtol=1e-5, atol=1e-5)
    # Ahead of it: the two batch requests running when it arrived and at most one formed per instance;
    # at one level it finishes behind most of the twelve.
    position = finished.index(Priority.ONLINE)
    assert position <= 4, f"the online request finished after {position} of 12 batch requests queued first"
