"""Reading at the model's ground sample distance: real GeoTIFFs from the seeded factory, asserted on the
pixels and validity the model would see (the rule itself is in tests/pipeline/test_resolution.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp

from gateway.errors import ResolutionOutOfRange
from gateway.pipeline.raster import RasterInfo, ReadOptions, Tile, open_raster
from gateway.pipeline.resolution import GsdRange, ResampleMode, ResolutionRequest
from gateway.pipeline.tiling import tile_grid
from gateway.settings import LimitSettings
from tests.conftest import GeoTiffFactory
from tests.factories import north_up, synthetic_bands

PALM = GsdRange(0.3, 0.6, resample_to_m=0.3)
RESAMPLED = ReadOptions(resolution=ResolutionRequest(PALM))


def read(path: Path, options: ReadOptions = RESAMPLED) -> tuple[RasterInfo, list[Tile], int]:
    with open_raster(path, LimitSettings(), options) as reader:
        tiles = list(reader.tiles(tile_grid(*reader.info.read_size, 512, 128)))
        return reader.info, tiles, reader.skipped


def block_means(data: np.ndarray, factor: int) -> np.ndarray:
    bands, rows, cols = data.shape
    blocks = data.reshape(bands, rows // factor, factor, cols // factor, factor).astype(np.float64)
    return blocks.mean(axis=(2, 4))


def test_finer_imagery_is_read_at_the_models_gsd_each_pixel_the_average_behind_it(
    geotiff: GeoTiffFactory,
) -> None:
    data = synthetic_bands(1500, 900, seed=4)
    info, tiles, skipped = read(
        geotiff(width=1500, height=900, data=data, transform=north_up(pixel_size=0.1))
    )
    assert (info.width, info.height) == (1500, 900)
    assert info.read_size == (500, 300)
    assert info.resample_factor == pytest.approx(3.0)
    assert (info.gsd_m, info.gsd_source, info.inference_gsd_m) == (0.1, "file", 0.3)
    assert info.warnings == ()
    (tile,) = tiles
    assert skipped == 0
    assert (tile.spec.width, tile.spec.height) == (500, 300)
    expected = block_means(data, 3)
    assert np.abs(tile.pixels[:, :300, :500].astype(np.float64) - expected).max() <= 1.0
    assert tile.valid is not None  # padding past the resampled image
    assert tile.valid[:300, :500].all()
    assert not tile.valid[300:, :].any()


def test_imagery_within_the_range_is_read_exactly_as_before(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(700, 600, seed=5)
    path = geotiff(width=700, height=600, data=data, transform=north_up(pixel_size=0.45))
    info, tiles, _ = read(path)
    _plain_info, plain_tiles, _ = read(path, ReadOptions())
    assert (info.read_size, info.resample_factor) == ((700, 600), 1.0)
    assert info.inference_gsd_m == info.gsd_m == pytest.approx(0.45, abs=1e-3)
    assert [t.spec for t in tiles] == [t.spec for t in plain_tiles]
    for tile, plain in zip(tiles, plain_tiles, strict=True):
        assert np.array_equal(tile.pixels, plain.pixels)
    assert np.array_equal(tiles[0].pixels[:, :512, :512], data[:, :512, :512])


def test_resampled_reads_come_from_the_files_overviews(geotiff: GeoTiffFactory) -> None:
    # A one-pixel checkerboard averages to mid-grey at full resolution, but its nearest-neighbour
    # overviews are one flat colour: what the model sees tells which level GDAL read.
    rows, cols = np.indices((1200, 1200))
    board = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)[None].repeat(3, 0)
    fine = north_up(pixel_size=0.05)
    _, (full,), _ = read(geotiff(width=1200, height=1200, data=board, transform=fine))
    _, (overview,), _ = read(geotiff(width=1200, height=1200, data=board, transform=fine, overviews=(2, 4)))
    assert np.unique(full.pixels[:, :200, :200]).tolist() == [128]
    assert np.unique(overview.pixels[:, :200, :200]).tolist() in ([0], [255])


@pytest.mark.parametrize("masking", ["nodata", "mask", "alpha"])
def test_invalid_pixels_stay_invalid_and_empty_tiles_are_skipped_after_resampling(
    geotiff: GeoTiffFactory, masking: str
) -> None:
    # 4800 x 600 px at 0.1 m is read at 1600 x 200 (tiles at x = 0, 384, 768, 1088). Source columns from
    # 2101 on are invalid: resampled column 700 (source 2100-2103) holds one valid column and stays
    # valid, with that column's value; the tiles at 768 and 1088 have no valid pixel and are skipped.
    data = synthetic_bands(4800, 600, seed=6)
    data[:, :, :2101] = np.maximum(data[:, :, :2101], 1)
    valid = np.zeros((600, 4800), np.bool_)
    valid[:, :2101] = True
    kwargs: dict[str, object] = {"transform": north_up(pixel_size=0.1)}
    if masking == "nodata":
        data[:, ~valid] = 0
        kwargs.update(data=data, nodata=0)
    elif masking == "mask":
        kwargs.update(data=data, mask=valid)
    else:
        alpha = np.where(valid, 255, 0).astype(np.uint8)[None]
        kwargs.update(
            data=np.concatenate([data, alpha]),
            bands=4,
            colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha],
        )
    info, tiles, skipped = read(geotiff(width=4800, height=600, **kwargs))
    assert info.read_size == (1600, 200)
    assert [t.spec.x for t in tiles] == [0, 384]
    assert skipped == 2
    first, second = tiles
    assert first.valid is not None
    assert first.valid[:200].all()
    edge = 700 - 384  # resampled column 700 within the second tile
    assert second.valid is not None
    assert second.valid[:200, : edge + 1].all()
    assert not second.valid[:, edge + 1 :].any()
    assert not second.pixels[:, :, edge + 1 :].any()
    column = data[:3, :, 2100].reshape(3, 200, 3).astype(np.float64).mean(axis=2)
    assert np.abs(second.pixels[:, :200, edge].astype(np.float64) - column).max() <= 1.0


def test_palette_imagery_is_resampled_without_inventing_colours(geotiff: GeoTiffFactory) -> None:
    palette = {0: (200, 10, 10, 255), 1: (10, 200, 10, 255), 2: (10, 10, 200, 255)}
    indices = (np.indices((600, 600)).sum(axis=0) % 3).astype(np.uint8)[None]
    info, (tile,), _ = read(
        geotiff(
            width=600, height=600, bands=1, data=indices, palette=palette, transform=north_up(pixel_size=0.1)
        )
    )
    assert info.read_size == (200, 200)
    colours = {tuple(int(v) for v in tile.pixels[:, y, x]) for y in range(200) for x in range(200)}
    assert colours <= {rgb[:3] for rgb in palette.values()}


def test_gsd_is_measured_for_gcp_and_geographic_files_and_drives_resampling(geotiff: GeoTiffFactory) -> None:
    # 1e-6 degree per pixel at the equator is 0.111 m on the ground.
    step = 1e-6
    corners = [(0, 0), (900, 0), (900, 600), (0, 600)]
    gcps = [GroundControlPoint(row=r, col=c, x=10.0 + c * step, y=0.5 - r * step) for c, r in corners]
    fitted, _, _ = read(geotiff(width=900, height=600, gcps=gcps, gcp_crs="EPSG:4326"))
    geographic, _, _ = read(
        geotiff(width=900, height=600, crs="EPSG:4326", transform=Affine(step, 0, 10.0, 0, -step, 0.5))
    )
    for info in (fitted, geographic):
        assert info.gsd_m == pytest.approx(0.1112, abs=2e-4)
        assert info.resample_factor == pytest.approx(0.3 / info.gsd_m)
        assert info.read_size == (round(900 / info.resample_factor), round(600 / info.resample_factor))
    assert fitted.georef == "gcps"


def test_far_coarser_files_are_refused_at_open_unless_resampling_is_off(geotiff: GeoTiffFactory) -> None:
    landsat = geotiff(width=300, height=200, transform=north_up(pixel_size=30.0))
    with pytest.raises(ResolutionOutOfRange, match="30 m"):
        read(landsat)
    info, tiles, _ = read(landsat, ReadOptions(resolution=ResolutionRequest(PALM, ResampleMode.OFF)))
    assert info.read_size == (300, 200)
    assert info.gsd_m == pytest.approx(30.0, rel=1e-3)
    assert len(tiles) == 1
    assert any("resample=off" in w for w in info.warnings)


def test_a_file_without_crs_is_read_as_it_is_unless_its_gsd_is_stated(geotiff: GeoTiffFactory) -> None:
    path = geotiff(width=900, height=600, crs=None)
    info, _, _ = read(path)
    assert (info.gsd_m, info.gsd_source, info.read_size) == (None, None, (900, 600))
    assert any("ground sample distance is unknown" in w for w in info.warnings)
    stated, _, _ = read(path, ReadOptions(resolution=ResolutionRequest(PALM, stated_gsd_m=0.1)))
    assert (stated.gsd_m, stated.gsd_source, stated.read_size) == (0.1, "caller", (300, 200))
    assert not any("ground sample distance" in w for w in stated.warnings)


@pytest.mark.parametrize(
    ("name", "gsd"),
    [("rasterio/tests/data/RGB.byte.tif", 300.2), ("rio-tiler/tests/fixtures/cog_hirise_mars.tif", 5.0)],
)
def test_landsat_and_mars_from_the_corpus_are_refused_by_their_gsd(
    corpus_dir: Path, name: str, gsd: float
) -> None:
    with pytest.raises(ResolutionOutOfRange) as refused:
        read(corpus_dir / name)
    assert refused.value.extensions["gsd_m"] == pytest.approx(gsd, rel=1e-3)
