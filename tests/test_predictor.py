"""The predictor's orchestration with the fake inference backend (real decode workers, no Triton).

The real Triton path is covered by tests/integration; here the fake returns chosen rows per tile so the
assertions can be exact: offsets into image coordinates, masked tiles never sent, saturation warnings,
progress, and failures that leave the pool usable.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.decode import DecodePool
from gateway.errors import DecoderFailed, InferenceUnavailable
from gateway.options import PredictOptions
from gateway.pipeline.contract import ModelContract
from gateway.pipeline.result import ModelInfo
from gateway.pipeline.tiling import balanced_batch
from gateway.predictor import Predictor
from gateway.scheduling import Priority
from gateway.settings import DecodeSettings, TilingSettings, TritonSettings
from tests.factories import read_png
from tests.fakes import FAKE_CONTRACT, FakeInference, K, box_at_bright_spot


@pytest.fixture
async def pool() -> AsyncIterator[DecodePool]:
    async with DecodePool(DecodeSettings(workers=1, file_timeout_s=60), tile_size=512) as pool:
        yield pool


def predictor(pool: DecodePool, backend: FakeInference) -> Predictor:
    return Predictor(
        pool,
        backend,
        ModelInfo("palm", "1", None, contract=FAKE_CONTRACT),
        tiling=TilingSettings(),
        triton=TritonSettings(),
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
    assert result.image.gsd_m is not None
    assert result.inputs is not None
    assert result.inputs.valid_fraction == 1.0
    assert max(result.inputs.mean) < 1.0  # a black image with one bright pixel


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


async def test_a_quicklook_asked_for_comes_with_the_result_from_the_same_read(
    pool: DecodePool, geotiff: Callable[..., Path]
) -> None:
    data = np.full((3, 512, 1280), 7, np.uint8)
    data[:, :, 500:] = 0
    path = geotiff(width=1280, height=512, data=data, nodata=0)
    backend = FakeInference(box_at_bright_spot)
    plain = await predictor(pool, backend).predict_file(path, "masked.tif", PredictOptions(0.5))
    result = await predictor(pool, backend).predict_file(
        path, "masked.tif", PredictOptions(0.5), quicklook_max_side=640
    )
    assert plain.quicklook_png is None
    assert result.quicklook_png is not None
    rgba = read_png(result.quicklook_png)
    assert rgba.shape == (256, 640, 4)
    assert (rgba[:, :250] == (7, 7, 7, 255)).all()
    assert (rgba[:, 250:] == 0).all(), "nodata, and the skipped tile, are transparent"
    assert backend.tiles_seen == 2 * 2, "the quicklook read no tile of its own for the model"


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
        DecodeSettings(workers=1, file_timeout_s=60), worker_command=CRASHING_WORKER, tile_size=512
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


def scene(geotiff: Callable[..., Path], name: str = "scene.tif", size: int = 2048) -> Path:
    """A scene with a bright spot per tile and a nodata margin, so batches carry validity masks."""
    data = np.full((3, size, size), 40, np.uint8)
    data[:, 200::384, 200::384] = 255
    data[:, :, :64] = 0
    return geotiff(name, width=size, height=size, data=data, nodata=0)


async def test_cancelled_predictions_keep_their_decoders_and_stop_their_triton_calls(
    geotiff: Callable[..., Path],
) -> None:
    path = scene(geotiff)
    # The same scene, its frames sent in two halves 0.1 s apart (tests/decode/crashing_worker.py): a
    # cancellation there lands with half a frame read.
    stutter = scene(geotiff, "stutter-scene.tif")
    backend = FakeInference(box_at_bright_spot, delay_s=0.05)
    # A cancelled call's slot waits out the call deadline before its decoder writes it again; a short
    # one keeps twenty cancellations in a row from leaving the decoders without slots for seconds.
    triton = TritonSettings(request_timeout_s=0.5)
    settings = DecodeSettings(workers=2, file_timeout_s=60)
    async with DecodePool(settings, worker_command=CRASHING_WORKER, tile_size=512) as pool:
        engine = Predictor(
            pool,
            backend,
            ModelInfo("palm", "1", None, contract=FAKE_CONTRACT),
            tiling=TilingSettings(),
            triton=triton,
        )
        expected = await engine.predict_file(path, path.name, PredictOptions(0.5))
        decoders = pool.pids
        cancelled = 0
        for attempt in range(20):
            # Fast and slow inference and a stuttering decoder, both lanes, cancelled from before the
            # worker is leased to the last batches.
            slow, stuttering = attempt % 4 == 1, attempt % 4 == 3
            backend.delay_s = 0.05 if slow else 0.0
            priority = Priority.BATCH if attempt % 2 else Priority.ONLINE
            source = stutter if stuttering else path
            task = asyncio.create_task(
                engine.predict_file(source, source.name, PredictOptions(0.5), priority=priority)
            )
            await asyncio.sleep({0: 0.03, 1: 0.07, 2: 0.03, 3: 0.08}[attempt % 4] * (attempt // 4))
            if task.done():
                continue
            task.cancel()
            cancelled += 1
            with pytest.raises(asyncio.CancelledError):
                await task
            assert backend.in_flight.total() == 0, "its Triton calls ended with it"
            calls = backend.calls
            await asyncio.sleep(0.05)
            assert backend.calls == calls, "no call started after the cancellation"
            assert pool.pids == decoders, f"attempt {attempt}: a decoder was replaced"
        assert cancelled >= 10
        assert backend.cancelled > 0
        again = await engine.predict_file(path, path.name, PredictOptions(0.5))
        assert sorted(again.detections.boxes.tolist()) == sorted(expected.detections.boxes.tolist())
        assert len(expected.detections) == 25
        assert again.tiles_total == expected.tiles_total
        assert pool.pids == decoders


async def test_batch_calls_are_capped_and_online_files_finish_first(geotiff: Callable[..., Path]) -> None:
    large = scene(geotiff, "large.tif")
    small = geotiff("small.tif", width=512, height=512)
    backend = FakeInference(box_at_bright_spot, delay_s=0.1)
    triton = TritonSettings(max_inflight=4, max_calls_in_flight=3, max_batch_calls_in_flight=1)
    async with DecodePool(DecodeSettings(workers=2, file_timeout_s=60), tile_size=512) as pool:
        engine = Predictor(
            pool,
            backend,
            ModelInfo("palm", "1", None, contract=FAKE_CONTRACT),
            tiling=TilingSettings(),
            triton=triton,
        )
        job = asyncio.create_task(
            engine.predict_file(large, large.name, PredictOptions(0.5), priority=Priority.BATCH)
        )
        async with asyncio.timeout(10):
            while not backend.calls:
                await asyncio.sleep(0.01)
        online = await asyncio.wait_for(engine.predict_file(small, small.name, PredictOptions(0.5)), 10)
        assert not job.done(), "the online file did not wait for the job"
        result = await asyncio.wait_for(job, 60)
    assert online.tiles_total == 1
    assert result.tiles_total == 25
    assert backend.peak[Priority.BATCH] == 1
    assert backend.peak[None] <= 3
    assert backend.priorities.count(Priority.ONLINE) == 1
    assert backend.priorities.count(Priority.BATCH) == len(backend.priorities) - 1


async def test_another_models_tile_side_and_k_set_the_grid_and_the_report(
    geotiff: Callable[..., Path],
) -> None:
    """256 px tiles and K = 100: the image is cut at 256 px with a 64 px overlap (a quarter), every tile
    the fake model sees is 256 px, and its box lands once, in image pixels."""
    contract = ModelContract(tile_size=256, top_k=100, input_name="pixels", output_name="boxes")
    model = ModelInfo("markers", "0.1.0", None, contract=contract)
    sizes: set[tuple[int, ...]] = set()

    def bright(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        sizes.add(tile.shape)
        out = np.zeros((100, 6), np.float32)
        out[0] = box_at_bright_spot(tile)[0]
        return out

    data = np.zeros((3, 500, 600), np.uint8)  # 3 x 3 tiles: x at 0, 192, 344; y at 0, 192, 244
    data[:, 220, 230] = 255  # in the overlap of four tiles
    path = geotiff(width=600, height=500, data=data)
    async with DecodePool(DecodeSettings(workers=1, file_timeout_s=60), tile_size=256) as pool:
        engine = Predictor(
            pool, FakeInference(bright), model, tiling=TilingSettings(), triton=TritonSettings()
        )
        result = await engine.predict_file(path, "markers.tif", PredictOptions(0.5))
        info = engine.tiling_info(0.5)

    assert sizes == {(3, 256, 256)}
    assert result.tiles_total == 9
    assert result.detections.boxes.tolist() == [[220.0, 210.0, 240.0, 230.0]]
    assert (info.tile_size, info.overlap) == (256, 64)


async def test_an_overlap_above_half_the_models_tile_or_workers_of_another_side_refuse_to_start() -> None:
    contract = ModelContract(tile_size=256, top_k=100, input_name="pixels", output_name="boxes")
    model = ModelInfo("markers", "0.1.0", None, contract=contract)
    async with DecodePool(DecodeSettings(workers=1), tile_size=256) as pool:
        with pytest.raises(ValueError, match="half the model's 256 px tile"):
            Predictor(
                pool,
                FakeInference(box_at_bright_spot),
                model,
                tiling=TilingSettings(overlap=200),
                triton=TritonSettings(),
            )
    async with DecodePool(DecodeSettings(workers=1), tile_size=512) as pool:
        with pytest.raises(ValueError, match="decode workers cut 512 px tiles; model 'markers' takes 256 px"):
            Predictor(
                pool,
                FakeInference(box_at_bright_spot),
                model,
                tiling=TilingSettings(),
                triton=TritonSettings(),
            )


async def test_a_file_far_from_the_baseline_is_scored_and_warned_about(
    pool: DecodePool, geotiff: Callable[..., Path]
) -> None:
    from export.synth import render_scene
    from gateway.pipeline.domain import DomainBaseline, Reference, Variant

    references = {
        "channel_mean_r": Reference(126.7, 22.8),
        "channel_mean_g": Reference(125.6, 15.5),
        "channel_mean_b": Reference(81.8, 17.5),
        "colourfulness": Reference(36.5, 6.4),
    }
    baseline = DomainBaseline((Variant("colour", references),), threshold=4.5)
    model = ModelInfo("palm", "1", None, contract=FAKE_CONTRACT, domain=baseline)
    engine = Predictor(
        pool, FakeInference(box_at_bright_spot), model, tiling=TilingSettings(), triton=TritonSettings()
    )
    scene = render_scene(1_000_000, 512).pixels
    familiar = await engine.predict_file(
        geotiff(width=512, height=512, data=scene), "scene.tif", PredictOptions(0.5)
    )
    assert familiar.image.out_of_domain is not None
    assert not familiar.image.out_of_domain.out_of_domain
    assert not any("out of domain" in w for w in familiar.image.warnings)

    white = np.full((3, 512, 512), 250, np.uint8)
    foreign = await engine.predict_file(
        geotiff(width=512, height=512, data=white), "white.tif", PredictOptions(0.5)
    )
    check = foreign.image.out_of_domain
    assert check is not None
    assert check.out_of_domain
    assert check.statistic == "channel_mean_b"
    assert check.score == pytest.approx((250 - 81.8) / 17.5, abs=0.01)
    assert check.warning() in foreign.image.warnings

    unscored = await predictor(pool, FakeInference(box_at_bright_spot)).predict_file(
        geotiff(width=512, height=512, data=white), "white.tif", PredictOptions(0.5)
    )
    assert unscored.image.out_of_domain is None
    assert not any("out of domain" in w for w in unscored.image.warnings)
