"""The predictor's orchestration with the fake inference backend (real decode workers, no Triton).

The real Triton path is covered by tests/integration; here the fake returns chosen rows per tile so the
assertions can be exact: offsets into image coordinates, masked tiles never sent, saturation warnings,
progress, and failures that leave the pool usable.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.decode import DecodePool
from gateway.errors import DecoderFailed, InferenceUnavailable
from gateway.options import PredictOptions
from gateway.pipeline.result import ModelInfo
from gateway.pipeline.tiling import balanced_batch
from gateway.predictor import Predictor
from gateway.settings import DecodeSettings, TilingSettings, TritonSettings
from tests.fakes import FakeInference, K, box_at_bright_spot


@pytest.fixture
async def pool() -> AsyncIterator[DecodePool]:
    async with DecodePool(DecodeSettings(workers=1, file_timeout_s=60)) as pool:
        yield pool


def predictor(pool: DecodePool, backend: FakeInference) -> Predictor:
    return Predictor(
        pool, backend, ModelInfo("palm", "1", None), tiling=TilingSettings(), triton=TritonSettings()
    )


async def test_boxes_come_back_in_image_coordinates_once(
    pool: DecodePool, geotiff: Callable[..., Path]
) -> None:
    data = np.zeros((3, 896, 1280), np.uint8)  # 3 x 2 tiles: x at 0, 384, 768; y at 0, 384
    data[:, 450, 700] = 255  # inside the overlap of four tiles
    path = geotiff(width=1280, height=896, data=data)
    backend = FakeInference(box_at_bright_spot)
    progress: list[tuple[int, int]] = []
    result = await predictor(pool, backend).predict_file(
        path, "bright.tif", PredictOptions(score_threshold=0.5), progress=lambda d, t: progress.append((d, t))
    )
    assert result.detections.boxes.tolist() == [[690.0, 440.0, 710.0, 460.0]]
    assert result.tiles_total == 3 * 2
    assert backend.tiles_seen == 6
    assert progress[-1] == (6, 6)
    assert result.image.crs == "EPSG:32633"
    assert result.geometries[0] is not None


async def test_fully_masked_tiles_are_never_sent(pool: DecodePool, geotiff: Callable[..., Path]) -> None:
    data = np.full((3, 512, 1280), 7, np.uint8)
    data[:, :, 500:] = 0  # nodata right of x=500: the third tile (x 768..1280) has no valid pixel
    path = geotiff(width=1280, height=512, data=data, nodata=0)
    backend = FakeInference(box_at_bright_spot)
    result = await predictor(pool, backend).predict_file(path, "masked.tif", PredictOptions(0.5))
    assert result.tiles_total == 3
    assert result.tiles_skipped == 1
    assert backend.tiles_seen == 2


async def test_a_tile_full_of_detections_raises_a_warning(
    pool: DecodePool, geotiff: Callable[..., Path]
) -> None:
    def full(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        rows = np.zeros((K, 6), np.float32)
        for i in range(K):
            x, y = 8 * (i % 8) + 50, 8 * (i // 8) + 50
            rows[i] = [x, y, x + 6, y + 6, 0.99 - i / 1000, 1]
        return rows

    path = geotiff(width=256, height=256)
    result = await predictor(pool, FakeInference(full)).predict_file(path, "dense.tif", PredictOptions(0.5))
    assert len(result.detections) == K
    assert any("maximum number of detections" in w for w in result.image.warnings)
    quiet = await predictor(pool, FakeInference(full)).predict_file(path, "dense.tif", PredictOptions(0.995))
    assert not any("maximum number of detections" in w for w in quiet.image.warnings)


async def test_an_inference_outage_fails_the_file_and_the_pool_carries_on(
    pool: DecodePool, geotiff: Callable[..., Path]
) -> None:
    path = geotiff(width=1200, height=1200)
    backend = FakeInference(box_at_bright_spot)
    backend.fail = True
    with pytest.raises(InferenceUnavailable):
        await predictor(pool, backend).predict_file(path, "a.tif", PredictOptions(0.5))
    backend.fail = False
    result = await predictor(pool, backend).predict_file(path, "a.tif", PredictOptions(0.5))
    assert result.tiles_total == 9


@pytest.mark.parametrize(
    ("tiles", "limit", "size"), [(25, 8, 7), (16, 8, 8), (1, 8, 1), (9, 8, 5), (2704, 16, 16), (0, 8, 8)]
)
def test_batches_are_balanced(tiles: int, limit: int, size: int) -> None:
    assert balanced_batch(tiles, limit) == size


CRASHING_WORKER = [sys.executable, str(Path(__file__).parent / "decode" / "crashing_worker.py")]


async def test_a_decoder_killed_once_is_retried_and_twice_blames_the_file(
    geotiff: Callable[..., Path],
) -> None:
    async with DecodePool(
        DecodeSettings(workers=1, file_timeout_s=60), worker_command=CRASHING_WORKER
    ) as pool:
        backend = FakeInference(box_at_bright_spot)
        once = geotiff("killedonce-scene.tif", width=600, height=600)
        result = await predictor(pool, backend).predict_file(once, once.name, PredictOptions(0.5))
        assert result.tiles_total == 4
        always = geotiff("killed-scene.tif", width=600, height=600)
        with pytest.raises(DecoderFailed, match="stopped twice") as caught:
            await predictor(pool, backend).predict_file(always, always.name, PredictOptions(0.5))
        assert caught.value.status == 422
        assert not caught.value.retryable
