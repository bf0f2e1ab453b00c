"""The predictor on files finer, coarser and without a GSD (real decode workers, the fake inference
backend): what the model is given, and where its boxes land in the file."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from gateway.decode import DecodePool
from gateway.errors import ResolutionOutOfRange
from gateway.options import PredictOptions
from gateway.pipeline import geo
from gateway.pipeline.resolution import GsdRange, ResampleMode
from gateway.pipeline.result import ModelInfo
from gateway.pipeline.tiling import tile_count
from gateway.predictor import Predictor
from gateway.settings import DecodeSettings, TilingSettings, TritonSettings
from tests.conftest import GeoTiffFactory
from tests.factories import north_up
from tests.fakes import FAKE_CONTRACT, FakeInference, box_at_bright_spot

MODEL = ModelInfo("palm", "1", None, contract=FAKE_CONTRACT, resolution=GsdRange(0.3, 0.6, resample_to_m=0.3))


@pytest.fixture
async def pool() -> AsyncIterator[DecodePool]:
    async with DecodePool(DecodeSettings(workers=1, file_timeout_s=60), tile_size=512) as pool:
        yield pool


def predictor(pool: DecodePool, backend: FakeInference) -> Predictor:
    return Predictor(pool, backend, MODEL, tiling=TilingSettings(), triton=TritonSettings())


def bright_square(width: int, height: int, x: int, y: int, side: int = 9) -> np.ndarray:
    """Black, with a white ``side`` px square whose top-left pixel is ``(x, y)``: the fake model's box
    is centred there (on a multiple of 3, it is the top-left of a white pixel once resampled by 3)."""
    data = np.zeros((3, height, width), np.uint8)
    data[:, y : y + side, x : x + side] = 255
    return data


async def test_a_finer_file_is_resampled_and_its_boxes_land_on_its_own_pixels(
    pool: DecodePool, geotiff: GeoTiffFactory
) -> None:
    # 3000 x 1800 px at 0.1 m: the model sees 1000 x 600 px at 0.3 m (3 x 2 tiles), where the fake
    # draws a 20 px box on the brightest pixel; it must come back as 60 px on the file's bright square.
    path = geotiff(
        width=3000, height=1800, data=bright_square(3000, 1800, 1497, 996), transform=north_up(pixel_size=0.1)
    )
    backend = FakeInference(box_at_bright_spot)
    result = await predictor(pool, backend).predict_file(
        path, "drone.tif", PredictOptions(score_threshold=0.5)
    )
    image = result.image
    assert (image.width, image.height) == (3000, 1800)
    assert (image.gsd_m, image.gsd_source, image.inference_gsd_m) == (0.1, "file", 0.3)
    assert image.resample_factor == pytest.approx(3.0)
    assert result.tiles_total == tile_count(1000, 600, 512, 128) == backend.tiles_seen == 6
    # The square's top-left pixel (1497, 996) is model pixel (499, 332): the 20 px box there is 60 px here.
    (box,) = result.detections.boxes.tolist()
    assert box == [1467.0, 966.0, 1527.0, 1026.0]
    (geometry,) = result.geometries
    assert geometry is not None
    ring = np.array(geometry["coordinates"][0][:4])
    corners = [geo.pixel_to_lonlat(image, x, y) for x, y in box_corners(box)]
    for corner in corners:
        assert np.abs(ring - np.array(corner)).sum(axis=1).min() < 1e-9


def box_corners(box: list[float]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


async def test_the_models_input_statistics_describe_the_resampled_tiles(
    pool: DecodePool, geotiff: GeoTiffFactory
) -> None:
    # Black and white noise at 0.15 m: read as it is, it spreads by 127.5 around mid-grey; resampled
    # by 2, every model pixel averages four pixels, which halves the spread.
    bits = np.random.default_rng(3).integers(0, 2, (900, 900), dtype=np.uint8) * np.uint8(255)
    path = geotiff(width=900, height=900, data=bits[None].repeat(3, 0), transform=north_up(pixel_size=0.15))
    backend = FakeInference(box_at_bright_spot)
    result = await predictor(pool, backend).predict_file(path, "noise.tif", PredictOptions(0.5))
    assert result.inputs is not None
    assert max(result.inputs.spread) == pytest.approx(63.75, abs=3.0)
    assert result.inputs.mean == pytest.approx((127.5, 127.5, 127.5), abs=3.0)
    assert result.image.resample_factor == pytest.approx(2.0)
    off = await predictor(pool, backend).predict_file(
        path, "noise.tif", PredictOptions(0.5, resample=ResampleMode.OFF)
    )
    assert off.inputs is not None
    assert min(off.inputs.spread) == pytest.approx(127.5, abs=3.0)
    assert any("resample=off" in w for w in off.image.warnings)


async def test_a_far_coarser_file_is_refused_before_inference_unless_resampling_is_off(
    pool: DecodePool, geotiff: GeoTiffFactory
) -> None:
    landsat = north_up(pixel_size=30.0)
    path = geotiff(width=700, height=500, data=bright_square(700, 500, 300, 200), transform=landsat)
    backend = FakeInference(box_at_bright_spot)
    with pytest.raises(ResolutionOutOfRange, match="30 m"):
        await predictor(pool, backend).predict_file(path, "landsat.tif", PredictOptions(0.5))
    assert backend.tiles_seen == 0
    result = await predictor(pool, backend).predict_file(
        path, "landsat.tif", PredictOptions(0.5, resample=ResampleMode.OFF)
    )
    assert result.image.resample_factor == 1.0
    assert result.detections.boxes.tolist() == [[290.0, 190.0, 310.0, 210.0]]
    assert any("not meaningful" in w for w in result.image.warnings)


async def test_a_file_without_crs_warns_and_a_stated_gsd_drives_resampling(
    pool: DecodePool, geotiff: GeoTiffFactory
) -> None:
    path = geotiff(width=1500, height=900, data=bright_square(1500, 900, 600, 450), crs=None)
    backend = FakeInference(box_at_bright_spot)
    unknown = await predictor(pool, backend).predict_file(path, "photo.tif", PredictOptions(0.5))
    assert (unknown.image.gsd_m, unknown.image.inference_gsd_m, unknown.image.resample_factor) == (
        None,
        None,
        1.0,
    )
    assert any("ground sample distance is unknown" in w for w in unknown.image.warnings)
    assert unknown.detections.boxes.tolist() == [[590.0, 440.0, 610.0, 460.0]]

    stated = await predictor(pool, backend).predict_file(path, "photo.tif", PredictOptions(0.5, gsd_m=0.1))
    assert (stated.image.gsd_m, stated.image.gsd_source, stated.image.inference_gsd_m) == (0.1, "caller", 0.3)
    assert not any("ground sample distance" in w for w in stated.image.warnings)
    assert stated.detections.boxes.tolist() == [[570.0, 420.0, 630.0, 480.0]]
    assert stated.geometries == [None]


async def test_a_model_without_a_gsd_range_reads_every_file_as_it_is(
    pool: DecodePool, geotiff: GeoTiffFactory
) -> None:
    landsat = north_up(pixel_size=30.0)
    path = geotiff(width=700, height=500, data=bright_square(700, 500, 300, 200), transform=landsat)
    backend = FakeInference(box_at_bright_spot)
    plain = Predictor(
        pool,
        backend,
        ModelInfo("other", "1", None, contract=FAKE_CONTRACT),
        tiling=TilingSettings(),
        triton=TritonSettings(),
    )
    result = await plain.predict_file(path, "landsat.tif", PredictOptions(0.5))
    assert result.image.resample_factor == 1.0
    assert result.image.gsd_m == pytest.approx(30.0, rel=1e-3)
    assert result.image.warnings == ()
