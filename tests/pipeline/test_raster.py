"""Reading policy of ``gateway.pipeline.raster``: formats, budgets, bands, dtypes, masks, georeferencing,
layouts and compressions, each asserted on the pixels and positions a model would see."""

from __future__ import annotations

import json
import tracemalloc
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp
from rasterio.env import get_gdal_config
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_gcps

from gateway.decode import protocol
from gateway.errors import (
    CorruptRaster,
    InvalidParameter,
    RasterTooLarge,
    UnsupportedMediaType,
    UnsupportedRaster,
)
from gateway.pipeline import raster
from gateway.pipeline.raster import (
    Colour,
    GeorefSource,
    MaskSource,
    RasterInfo,
    RasterReader,
    ReadOptions,
    Scaling,
    Tile,
    TileCutter,
    Window,
    describe_bytes,
    drivers_for_name,
    open_raster,
    policy,
)
from gateway.pipeline.tiling import TileSpec, tile_grid
from gateway.settings import LimitSettings
from tests.conftest import GeoTiffFactory
from tests.factories import make_image, north_up, sparse_bomb, synthetic_bands

LIMITS = LimitSettings()
T = 512


def read(path: Path, limits: LimitSettings = LIMITS, **options: Any) -> tuple[RasterInfo, list[Tile], int]:
    with open_raster(path, limits, ReadOptions(**options)) as reader:
        tiles = list(reader.tiles(tile_grid(reader.info.width, reader.info.height, 512, 128)))
        return reader.info, tiles, reader.skipped


def mosaic(tiles: list[Tile], width: int, height: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """Reassemble the image the tiles show, checking that overlapping tiles agree."""
    image = np.zeros((3, height, width), np.uint8)
    valid = np.zeros((height, width), np.bool_)
    seen = np.zeros((height, width), np.bool_)
    for tile in tiles:
        s = tile.spec
        assert tile.pixels.shape == (3, s.size, s.size)
        assert tile.pixels.dtype == np.uint8
        window = (slice(s.y, s.y + s.height), slice(s.x, s.x + s.width))
        pixels = tile.pixels[:, : s.height, : s.width]
        tile_valid = (
            np.ones((s.height, s.width), bool) if tile.valid is None else tile.valid[: s.height, : s.width]
        )
        if tile.valid is not None:
            assert tile.valid.shape == (s.size, s.size)
            assert not tile.valid[s.height :, :].any()
            assert not tile.valid[:, s.width :].any()
        assert not tile.pixels[:, s.height :, :].any(), "padding must be 0"
        assert not tile.pixels[:, :, s.width :].any(), "padding must be 0"
        overlap = seen[window]
        np.testing.assert_array_equal(image[:, window[0], window[1]][:, overlap], pixels[:, overlap])
        np.testing.assert_array_equal(valid[window][overlap], tile_valid[overlap])
        image[:, window[0], window[1]] = pixels
        valid[window] = tile_valid
        seen[window] = True
    return image, valid


def damage_pixel_data(path: Path) -> None:
    """Overwrite bytes inside the compressed blocks (the directory, at the start, stays intact)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + 512] = bytes(512)  # zeros in the middle of the compressed tile data
    data[start + 1024 : start + 1536] = b"\xff" * 512
    path.write_bytes(bytes(data))


# -- format sniffing -------------------------------------------------------------------------------


def test_png_named_tif_is_refused_when_the_name_says_tiff(tmp_path: Path) -> None:
    png = tmp_path / "real.png"
    data = synthetic_bands(20, 10, 3, "uint8", seed=1)
    make_image(png, data, "PNG")
    disguised = tmp_path / "scene.tif"
    disguised.write_bytes(png.read_bytes())
    with pytest.raises(UnsupportedMediaType, match="named as a TIFF but its content is a PNG image"):
        open_raster(disguised, LIMITS, ReadOptions(drivers=drivers_for_name("scene.tif")))
    # Judged by content alone it is a PNG, read by the PNG driver, never as a TIFF.
    info, tiles, _ = read(disguised)
    assert info.driver == "PNG"
    image, valid = mosaic(tiles, 20, 10)
    np.testing.assert_array_equal(image, data)
    assert valid.all()


def test_vrt_named_tif_never_reaches_gdal(tmp_path: Path, geotiff: GeoTiffFactory) -> None:
    secret = geotiff("secret.tif", width=8, height=8, bands=1)
    vrt = tmp_path / "upload.tif"
    vrt.write_text(
        f'<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
        f"<SimpleSource><SourceFilename>{secret}</SourceFilename><SourceBand>1</SourceBand>"
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )
    with pytest.raises(UnsupportedMediaType, match="GDAL VRT") as caught:
        open_raster(vrt, LIMITS)
    assert str(secret) not in caught.value.detail


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML page"),
        (b'<?xml version="1.0"?>\n<VRTDataset rasterXSize="1">', "GDAL VRT"),
        (b"GIF89a\x01\x00", "GIF"),
        (b"PK\x03\x04zipzip", "ZIP archive"),
        (b"\x00\x01\x02\x03\xfe\xfd", "binary data"),
    ],
)
def test_non_images_are_unsupported_media(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "upload.tif"
    path.write_bytes(content)
    with pytest.raises(UnsupportedMediaType, match=expected):
        open_raster(path, LIMITS)
    assert expected in describe_bytes(content)


def test_truncated_tiff_header_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    path.write_bytes(b"II*\x00\x08")
    with pytest.raises(CorruptRaster, match="truncated"):
        open_raster(path, LIMITS)


def test_jpeg_upload_is_read_with_the_jpeg_driver(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    data = np.full((3, 40, 60), 90, np.uint8)
    data[0, 10:20, 10:30] = 200
    make_image(path, data, "JPEG", quality=95)
    info, tiles, _ = read(path, drivers=drivers_for_name(path.name))
    assert info.driver == "JPEG"
    image, _ = mosaic(tiles, 60, 40)
    assert np.abs(image.astype(int) - data).mean() < 5  # lossy, but the same picture in the same place
    assert image[0, 15, 20] > 170
    assert image[0, 30, 50] < 120


def test_sidecars_are_neither_read_nor_written(tmp_path: Path, geotiff: GeoTiffFactory) -> None:
    path = geotiff("scene.tif", width=40, height=30)
    # An external mask that would hide everything if GDAL looked next to the file.
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(path, "r+") as dst:
        dst.write_mask(np.zeros((30, 40), np.uint8))
    assert (tmp_path / "scene.tif.msk").exists()
    (tmp_path / "scene.tif.aux.xml").write_text(
        '<PAMDataset><Metadata><MDI key="AREA_OR_POINT">Point</MDI></Metadata>'
        '<PAMRasterBand band="1"><NoDataValue>0</NoDataValue></PAMRasterBand></PAMDataset>'
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    info, tiles, skipped = read(path)
    assert info.masking == ()
    assert info.nodata is None
    assert skipped == 0
    assert tiles[0].valid is not None  # padding only
    assert tiles[0].valid[:30, :40].all()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- budgets ---------------------------------------------------------------------------------------


def test_dimension_bomb_is_refused_before_any_decode(tmp_path: Path) -> None:
    path = sparse_bomb(tmp_path / "bomb.tif")
    assert path.stat().st_size < 400_000  # the tile index; no pixel data
    with pytest.raises(RasterTooLarge, match="run it with `palm-serve predict`") as caught:
        open_raster(path, LIMITS, ReadOptions(max_pixels=64_000_000))
    assert caught.value.status == 413
    assert caught.value.extensions["limit"] == "max_pixels"
    assert caught.value.extensions["pixels"] == 10**10


@pytest.mark.parametrize(
    ("limits", "limit"),
    [
        (LimitSettings(max_width=99), "dimensions"),
        (LimitSettings(max_height=59), "dimensions"),
        (LimitSettings(max_bands=3), "bands"),
        (LimitSettings(max_decoded_bytes=100 * 60 * 4 - 1), "decoded_bytes"),
    ],
)
def test_each_budget_is_enforced(geotiff: GeoTiffFactory, limits: LimitSettings, limit: str) -> None:
    path = geotiff(width=100, height=60, bands=4)
    with pytest.raises(RasterTooLarge) as caught:
        open_raster(path, limits)
    assert caught.value.extensions["limit"] == limit
    open_raster(path, LimitSettings()).close()


# -- bands -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1100, 700), (300, 200), (512, 512), (513, 1030)])
def test_rgb_tiles_show_the_image_where_it_is(geotiff: GeoTiffFactory, width: int, height: int) -> None:
    data = synthetic_bands(width, height, 3, "uint8", seed=width)
    info, tiles, skipped = read(geotiff(width=width, height=height, data=data, photometric="RGB"))
    assert (info.colour, info.band_map, info.scaling) == ("rgb", (1, 2, 3), "none")
    assert len(tiles) == len(tile_grid(width, height, 512, 128))
    assert skipped == 0
    image, valid = mosaic(tiles, width, height)
    np.testing.assert_array_equal(image, data)
    assert valid.all()
    padded = width < T or height < T
    assert all((t.valid is None) != padded for t in tiles)


def test_band_order_follows_colour_interpretation(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(64, 48, 3, "uint8", seed=3)
    path = geotiff(
        width=64,
        height=48,
        data=data,
        colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red],
    )
    info, tiles, _ = read(path)
    assert info.band_map == (3, 2, 1)
    image, _ = mosaic(tiles, 64, 48)
    np.testing.assert_array_equal(image, data[::-1])


def test_grey_is_replicated_to_three_channels(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(600, 40, 1, "uint8", seed=4)
    info, tiles, _ = read(geotiff(width=600, height=40, bands=1, data=data))
    assert (info.colour, info.band_map) == ("grey", (1, 1, 1))
    image, _ = mosaic(tiles, 600, 40)
    for channel in range(3):
        np.testing.assert_array_equal(image[channel], data[0])


def test_grey_with_alpha_masks_transparent_pixels(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(50, 40, 2, "uint8", seed=5)
    data[0] = np.maximum(data[0], 1)
    data[1] = 255
    data[1, 10:20, 5:25] = 0
    path = geotiff(width=50, height=40, bands=2, data=data, photometric="MINISBLACK", alpha="YES")
    info, tiles, _ = read(path)
    assert (info.colour, info.alpha_band, info.masking) == ("grey", 2, ("alpha",))
    image, valid = mosaic(tiles, 50, 40)
    np.testing.assert_array_equal(valid, data[1] > 0)
    assert not image[:, 10:20, 5:25].any()
    np.testing.assert_array_equal(image[1][valid], data[0][valid])


def test_rgba_alpha_becomes_the_valid_mask(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(700, 100, 4, "uint8", seed=6)
    data[3] = 255
    data[3, :, 600:] = 0
    path = geotiff(width=700, height=100, bands=4, data=data, photometric="RGB", alpha="YES")
    info, tiles, _ = read(path)
    assert (info.band_map, info.alpha_band) == ((1, 2, 3), 4)
    image, valid = mosaic(tiles, 700, 100)
    np.testing.assert_array_equal(valid, data[3] > 0)
    np.testing.assert_array_equal(image[:, :, :600], data[:3, :, :600])
    assert not image[:, :, 600:].any()


def test_two_bands_without_alpha_read_band_one_as_grey(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(30, 20, 2, "uint8", seed=7)
    info, tiles, _ = read(geotiff(width=30, height=20, bands=2, data=data))
    assert (info.colour, info.band_map) == ("grey", (1, 1, 1))
    assert any("band 1 is read as grey" in w for w in info.warnings)
    image, _ = mosaic(tiles, 30, 20)
    np.testing.assert_array_equal(image[2], data[0])


def test_palette_is_expanded(geotiff: GeoTiffFactory) -> None:
    index = np.zeros((1, 30, 40), np.uint8)
    index[0, :, 10:20] = 1
    index[0, :, 20:] = 2
    palette = {0: (0, 0, 0), 1: (255, 0, 0), 2: (10, 200, 30)}
    info, tiles, _ = read(
        geotiff(width=40, height=30, bands=1, data=index, palette=palette, photometric="PALETTE")
    )
    assert (info.colour, info.scaling, info.masking) == ("palette", "none", ())
    image, valid = mosaic(tiles, 40, 30)
    assert (image[:, 5, 5] == (0, 0, 0)).all()
    assert (image[:, 5, 15] == (255, 0, 0)).all()
    assert (image[:, 5, 30] == (10, 200, 30)).all()
    assert valid.all()


def test_transparent_palette_entries_are_masked(tmp_path: Path) -> None:
    index = np.zeros((1, 30, 40), np.uint8)
    index[0, :, 10:] = 1
    path = tmp_path / "indexed.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", width=40, height=30, count=1, dtype="uint8") as dst:
            dst.write(index)
            dst.write_colormap(1, {0: (0, 0, 0, 0), 1: (255, 0, 0, 255)})
    info, tiles, _ = read(path)
    assert info.colour == "palette"
    assert "palette-alpha" in info.masking
    image, valid = mosaic(tiles, 40, 30)
    assert not valid[:, :10].any()
    assert valid[:, 10:].all()
    assert (image[:, 5, 15] == (255, 0, 0)).all()


def test_multispectral_default_and_band_mapping(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(40, 30, 6, "uint8", seed=8)
    path = geotiff(width=40, height=30, bands=6, data=data)
    info, tiles, _ = read(path)
    assert info.band_map == (1, 2, 3)
    assert any("bands=" in w for w in info.warnings)
    np.testing.assert_array_equal(mosaic(tiles, 40, 30)[0], data[:3])

    info, tiles, _ = read(path, bands=(5, 3, 2))
    assert info.band_map == (5, 3, 2)
    assert not any("bands=" in w for w in info.warnings)
    np.testing.assert_array_equal(mosaic(tiles, 40, 30)[0], data[[4, 2, 1]])

    info, tiles, _ = read(path, bands=(6,))
    assert (info.colour, info.band_map) == ("grey", (6, 6, 6))
    np.testing.assert_array_equal(mosaic(tiles, 40, 30)[0][1], data[5])


@pytest.mark.parametrize("bands", [(7, 2, 1), (0,), (1, 2)])
def test_band_numbers_outside_the_file_are_invalid(geotiff: GeoTiffFactory, bands: tuple[int, ...]) -> None:
    path = geotiff(width=16, height=16, bands=6)
    with pytest.raises(InvalidParameter, match="between 1 and 6"):
        open_raster(path, LIMITS, ReadOptions(bands=bands))


# -- sample types ----------------------------------------------------------------------------------


def expected_stretch(values: npt.NDArray[Any], low: float, high: float) -> npt.NDArray[np.uint8]:
    scaled = (values.astype(np.float64) - low) * 255.0 / (high - low) + 0.5
    return np.clip(scaled, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32", "float32", "float64", "int8"])
def test_non_byte_samples_get_a_2_98_percentile_stretch(geotiff: GeoTiffFactory, dtype: str) -> None:
    data = synthetic_bands(700, 90, 3, dtype, seed=9)
    info, tiles, _ = read(geotiff(width=700, height=90, dtype=dtype, data=data, photometric="RGB"))
    assert info.scaling == "percentile"
    assert info.scaling_source == "all pixels"
    assert info.stretch is not None
    image, _ = mosaic(tiles, 700, 90)
    for c in range(3):
        low, high = np.percentile(data[c].astype(np.float64), [2, 98])
        assert info.stretch[c] == pytest.approx((low, high))
        expected = expected_stretch(data[c], low, high)
        assert np.abs(image[c].astype(int) - expected).max() <= 1
        assert (image[c] == 0).mean() == pytest.approx(0.02, abs=0.01)
        assert (image[c] == 255).mean() == pytest.approx(0.02, abs=0.01)


def test_one_scale_for_all_tiles_of_a_file(geotiff: GeoTiffFactory) -> None:
    data = np.full((1, 64, 1100), 1000, np.uint16)
    data[0, :, 600:] = 3000  # the right tiles only see bright values
    data[0, :, 300:310] = 2000
    data[0, :, 900:910] = 2000
    _, tiles, _ = read(geotiff(width=1100, height=64, bands=1, dtype="uint16", data=data))
    left = next(t for t in tiles if t.spec.x == 0)
    right = next(t for t in tiles if t.spec.x + t.spec.width == 1100)
    assert left.pixels[0, 10, 305] == right.pixels[0, 10, 900 - right.spec.x + 5]
    assert 0 < left.pixels[0, 10, 305] < 255


def test_stretch_comes_from_an_overview_or_sampled_blocks(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(2100, 2000, 1, "uint16", seed=10)
    with_overviews = geotiff(width=2100, height=2000, bands=1, dtype="uint16", data=data, overviews=(2, 4))
    without = geotiff(width=2100, height=2000, bands=1, dtype="uint16", data=data)
    for path, source in ((with_overviews, "overview 1/2"), (without, "sampled blocks")):
        with open_raster(path, LIMITS) as reader:
            assert reader.info.scaling_source is not None
            assert source in reader.info.scaling_source
            assert reader.info.stretch is not None
            low, high = reader.info.stretch[0]
            exact_low, exact_high = np.percentile(data, [2, 98])
            assert low == pytest.approx(exact_low, rel=0.02)
            assert high == pytest.approx(exact_high, rel=0.02)


def test_nan_and_inf_are_masked(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(40, 30, 1, "float32", seed=11)
    data[0, 0:5, :] = np.nan
    data[0, 5:8, :] = np.inf
    data[0, 8:10, :] = -np.inf
    info, tiles, _ = read(geotiff(width=40, height=30, bands=1, dtype="float32", data=data))
    assert "nan" in info.masking
    image, valid = mosaic(tiles, 40, 30)
    assert not valid[:10].any()
    assert valid[10:].all()
    assert not image[:, :10].any()
    assert info.stretch is not None
    assert all(np.isfinite(v) for pair in info.stretch for v in pair)


def test_few_bit_grey_is_scaled_to_full_range(geotiff: GeoTiffFactory) -> None:
    data = (np.arange(16, dtype=np.uint8).repeat(4)[None, None, :]).repeat(8, axis=1)
    info, tiles, _ = read(geotiff(width=64, height=8, bands=1, data=data, nbits=4, compress=None))
    assert info.scaling == "nbits"
    image, _ = mosaic(tiles, 64, 8)
    assert image[0, 0, 0] == 0
    assert image[0, 0, -1] == 255
    assert image[0, 0, 4 * 8] == 136  # 8 * 255 / 15, rounded


def test_complex_samples_are_unsupported(geotiff: GeoTiffFactory) -> None:
    data = np.ones((1, 8, 8), np.complex64)
    path = geotiff(width=8, height=8, bands=1, dtype="complex64", data=data, compress=None)
    with pytest.raises(UnsupportedRaster, match="complex"):
        open_raster(path, LIMITS)


# -- nodata and masks ------------------------------------------------------------------------------


def test_nodata_masks_pixels_where_every_band_is_nodata(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(60, 40, 3, "uint8", seed=12)
    data = np.maximum(data, 1)
    data[:, 0:10, :] = 0  # all bands nodata: invalid
    data[0, 10:20, :] = 0  # one band nodata: still a pixel
    info, tiles, _ = read(geotiff(width=60, height=40, data=data, nodata=0, photometric="RGB"))
    assert info.nodata == 0
    assert info.masking == ("nodata",)
    image, valid = mosaic(tiles, 60, 40)
    assert not valid[:10].any()
    assert valid[10:].all()
    np.testing.assert_array_equal(image[:, 10:], data[:, 10:])


def test_internal_mask_and_fully_masked_tiles_are_skipped(geotiff: GeoTiffFactory) -> None:
    width, height = 1100, 600
    data = synthetic_bands(width, height, 3, "uint8", seed=13)
    mask = np.ones((height, width), bool)
    mask[:, 500:] = False  # everything right of x=500: no data
    info, tiles, skipped = read(geotiff(width=width, height=height, data=data, mask=mask, photometric="RGB"))
    assert info.masking == ("mask",)
    specs = tile_grid(width, height, 512, 128)
    assert skipped == sum(1 for s in specs if s.x >= 500)
    assert {t.spec for t in tiles} == {s for s in specs if s.x < 500}
    image, valid = mosaic(tiles, width, height)
    np.testing.assert_array_equal(valid[:, :500], True)
    assert not image[:, :, 500:].any()
    np.testing.assert_array_equal(image[:, :, :500], data[:, :, :500])


def test_all_nodata_image_yields_no_tiles(geotiff: GeoTiffFactory) -> None:
    data = np.full((1, 700, 700), -9999, np.float32)
    info, tiles, skipped = read(
        geotiff(width=700, height=700, bands=1, dtype="float32", data=data, nodata=-9999)
    )
    assert tiles == []
    assert skipped == 4
    assert any("No valid pixel" in w for w in info.warnings)


def test_info_crosses_the_worker_wire_as_the_same_strings(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(40, 30, 1, "float32", seed=16)
    info, _, _ = read(geotiff(width=40, height=30, bands=1, dtype="float32", data=data, nodata=-1.0))
    wire = json.loads(json.dumps(protocol.info_to_wire(info)))
    assert (wire["colour"], wire["scaling"], wire["georef"]) == ("grey", "percentile", "transform")
    assert wire["masking"] == ["nodata", "nan"]
    back = protocol.info_from_wire(wire)
    assert back == info
    assert (back.colour, back.scaling, back.georef) == (
        Colour.GREY,
        Scaling.PERCENTILE,
        GeorefSource.TRANSFORM,
    )
    assert back.masking == (MaskSource.NODATA, MaskSource.NAN)
    assert all(isinstance(m, MaskSource) for m in back.masking)


# -- georeferencing --------------------------------------------------------------------------------


def test_epsg_crs_and_transform_are_reported(geotiff: GeoTiffFactory) -> None:
    info, _, _ = read(geotiff(width=20, height=10, crs="EPSG:32633"))
    assert info.crs == "EPSG:32633"
    assert info.transform == (0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)
    assert info.georef == "transform"
    assert info.warnings == ()


def test_crs_without_authority_is_reported_as_wkt(geotiff: GeoTiffFactory) -> None:
    custom = "+proj=tmerc +lat_0=0 +lon_0=15.123 +k=0.9996 +x_0=500000 +y_0=0 +ellps=GRS80 +units=m +no_defs"
    info, _, _ = read(geotiff(width=20, height=10, crs=custom))
    assert info.crs is not None
    assert info.crs.startswith(("PROJCS[", "PROJCRS["))
    assert "15.123" in info.crs


def test_no_crs_is_pixel_only_not_an_error(geotiff: GeoTiffFactory) -> None:
    info, tiles, _ = read(geotiff(width=20, height=10, crs=None))
    assert (info.crs, info.transform, info.georef) == (None, None, "none")
    assert any("no CRS" in w for w in info.warnings)
    assert len(tiles) == 1


def test_rotated_transform_is_kept(geotiff: GeoTiffFactory) -> None:
    transform = north_up(rotation_deg=30.0)
    info, _, _ = read(geotiff(width=20, height=10, transform=transform))
    assert info.transform == pytest.approx(tuple(transform)[:6])
    assert info.transform is not None
    assert info.transform[1] != 0
    assert info.transform[3] != 0


def gcps_for(width: int, height: int) -> list[GroundControlPoint]:
    corners = [(0, 0), (width, 0), (width, height), (0, height), (width / 2, height / 2)]
    return [GroundControlPoint(row=r, col=c, x=10.0 + c * 1e-4, y=50.0 - r * 1e-4) for c, r in corners]


def test_gcp_only_file_is_georeferenced_from_its_gcps(geotiff: GeoTiffFactory) -> None:
    gcps = gcps_for(40, 30)
    info, _, _ = read(geotiff(width=40, height=30, gcps=gcps, gcp_crs="EPSG:4326"))
    assert (info.georef, info.crs) == ("gcps", "EPSG:4326")
    assert info.transform == pytest.approx(tuple(from_gcps(gcps))[:6])
    assert any("ground control points" in w for w in info.warnings)


def test_gcps_without_crs_are_pixel_only(geotiff: GeoTiffFactory) -> None:
    info, _, _ = read(geotiff(width=40, height=30, gcps=gcps_for(40, 30), gcp_crs=None))
    assert (info.georef, info.crs, info.transform) == ("none", None, None)
    assert any("ground control points but no usable CRS" in w for w in info.warnings)


# -- layouts and compressions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compress", "options"),
    [
        (None, {}),
        ("deflate", {"predictor": 2}),
        ("lzw", {}),
        ("zstd", {}),
        ("lzma", {}),
        ("packbits", {}),
        ("webp", {"webp_lossless": True}),
        ("jpeg", {"jpeg_quality": 95}),
    ],
)
@pytest.mark.parametrize("tiled", [True, False])
def test_compressions_and_layouts(
    geotiff: GeoTiffFactory, compress: str | None, options: dict[str, Any], tiled: bool
) -> None:
    width, height = 700, 560
    block_rows = 8 if compress == "jpeg" else 7  # JPEG strips must be a multiple of 8 rows
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([(xx // 4) % 256, (yy // 3) % 256, ((xx + yy) // 8) % 256]).astype(np.uint8)
    path = geotiff(
        width=width,
        height=height,
        data=smooth,
        compress=compress,
        tiled=tiled,
        blocksize=256 if tiled else block_rows,
        photometric="RGB",
        **options,
    )
    info, tiles, _ = read(path)
    assert info.block_shape == ((256, 256) if tiled else (block_rows, width))
    image, _ = mosaic(tiles, width, height)
    if compress == "jpeg":
        assert np.abs(image.astype(int) - smooth).mean() < 3
    else:
        np.testing.assert_array_equal(image, smooth)


def test_band_interleaved_file(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(600, 300, 3, "uint16", seed=14)
    info, tiles, _ = read(geotiff(width=600, height=300, dtype="uint16", data=data, interleave="band"))
    image, _ = mosaic(tiles, 600, 300)
    assert info.stretch is not None
    low, high = info.stretch[2]
    assert np.abs(image[2].astype(int) - expected_stretch(data[2], low, high)).max() <= 1


class CountingSource:
    """A :class:`BlockSource` over an open reader that records every window read."""

    def __init__(self, reader: RasterReader) -> None:
        self.reader = reader
        self.windows: list[Window] = []

    def read(
        self, bands: Sequence[int], window: Window, out: npt.NDArray[Any] | None = None
    ) -> npt.NDArray[Any]:
        self.windows.append(window)
        return self.reader.read(bands, window, out)

    def read_mask(self, band: int, window: Window) -> npt.NDArray[Any]:
        return self.reader.read_mask(band, window)


@pytest.mark.parametrize(("tiled", "block"), [(True, 256), (False, 16), (False, 1)])
def test_each_block_is_decoded_once(geotiff: GeoTiffFactory, tiled: bool, block: int) -> None:
    width, height = 1500, 1700
    data = synthetic_bands(width, height, 3, "uint8", seed=block)
    path = geotiff(width=width, height=height, data=data, tiled=tiled, blocksize=block, photometric="RGB")
    specs = tile_grid(width, height, 512, 128)
    with open_raster(path, LIMITS) as reader:
        source = CountingSource(reader)
        tiles = list(TileCutter(source, reader.plan, width, height, specs).tiles())
    assert len(tiles) == len(specs)
    np.testing.assert_array_equal(mosaic(tiles, width, height)[0], data)
    rows = np.zeros(height, int)
    for window in source.windows:
        assert window.row_off % block == 0, "reads start on block rows"
        assert (window.col_off, window.width) == (0, width)
        rows[window.row_off : window.row_off + window.height] += 1
    np.testing.assert_array_equal(rows, 1)  # every row, so every block, read exactly once


def test_memory_is_bounded_by_width_not_height(geotiff: GeoTiffFactory) -> None:
    short = geotiff(width=1024, height=1024, compress="deflate", photometric="RGB")
    tall = geotiff(width=1024, height=8192, compress="deflate", photometric="RGB", seed=1)

    def peak(path: Path) -> int:
        tracemalloc.start()
        try:
            with open_raster(path, LIMITS) as reader:
                for _ in reader.tiles(tile_grid(reader.info.width, reader.info.height, 512, 128)):
                    pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short_peak, tall_peak = peak(short), peak(tall)
    assert tall_peak < 1.5 * short_peak + 1_000_000
    assert tall_peak < 3 * 1024 * 8192 / 3  # far less than the decoded image (25 MB)


def test_tiles_come_in_row_major_order_whatever_the_request_order(geotiff: GeoTiffFactory) -> None:
    path = geotiff(width=1100, height=900)
    specs = tile_grid(1100, 900, 512, 128)
    with open_raster(path, LIMITS) as reader:
        got = [t.spec for t in reader.tiles(list(reversed(specs)))]
        assert got == sorted(specs, key=lambda s: (s.y, s.x))
        subset = [specs[-1]]
        (only,) = list(reader.tiles(subset))
        assert only.spec == specs[-1]
        with pytest.raises(ValueError, match="outside the image"):
            list(reader.tiles([TileSpec(0, 0, 0, 1000, 0, 512, 512, False, False, False, False, 512)]))


@pytest.mark.parametrize(("tile", "overlap", "width", "height"), [(256, 64, 700, 450), (320, 80, 200, 150)])
def test_tiles_are_cut_at_the_models_side(
    geotiff: GeoTiffFactory, tile: int, overlap: int, width: int, height: int
) -> None:
    data = synthetic_bands(width, height, 3, "uint8", seed=tile)
    path = geotiff(width=width, height=height, data=data, photometric="RGB")
    specs = tile_grid(width, height, tile, overlap)
    with open_raster(path, LIMITS) as reader:
        tiles = list(reader.tiles(specs))
    assert len(tiles) == len(specs)
    assert {t.pixels.shape for t in tiles} == {(3, tile, tile)}
    np.testing.assert_array_equal(mosaic(tiles, width, height)[0], data)
    if width < tile:  # one tile, padded: the padding is invalid and zero
        (only,) = tiles
        assert only.valid is not None
        assert only.valid[:height, :width].all()
        assert not only.valid[height:].any()
        assert not only.valid[:, width:].any()
        assert not only.pixels[:, height:].any()


def test_tiles_of_one_image_share_one_side(geotiff: GeoTiffFactory) -> None:
    path = geotiff(width=600, height=600)
    mixed = tile_grid(600, 600, 512, 128)[:1] + tile_grid(600, 600, 256, 64)[:1]
    with open_raster(path, LIMITS) as reader, pytest.raises(ValueError, match="one size"):
        list(reader.tiles(mixed))


def test_damaged_block_is_a_corrupt_raster_without_server_paths(geotiff: GeoTiffFactory) -> None:
    path = geotiff(width=1024, height=1024, tiled=True, blocksize=256, compress="deflate")
    damage_pixel_data(path)
    with pytest.raises(CorruptRaster) as caught:
        read(path)
    assert "cannot be decoded" in caught.value.detail
    assert str(path.parent) not in caught.value.detail
    assert caught.value.status == 422


def test_missing_codec_is_unsupported(geotiff: GeoTiffFactory) -> None:
    path = geotiff(width=32, height=32, compress="deflate", tiled=False, blocksize=32)
    data = bytearray(path.read_bytes())
    # Rewrite the Compression tag (259, SHORT, count 1) from DEFLATE (8) to JPEG XL (50002).
    tag = (259).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    at = data.index(tag)
    assert data[at + 8 : at + 10] == (8).to_bytes(2, "little")
    data[at + 8 : at + 10] = (50002).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedRaster, match="missing codec JXL"):
        read(path)


def test_giant_blocks_are_refused(geotiff: GeoTiffFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = geotiff(width=128, height=128, tiled=True, blocksize=64)
    monkeypatch.setattr(policy, "MAX_BLOCK_BYTES", 64 * 64 * 3 - 1)
    with pytest.raises(UnsupportedRaster, match="Re-save it tiled"):
        open_raster(path, LIMITS)


def test_strips_taller_than_a_read_stay_cached(geotiff: GeoTiffFactory) -> None:
    data = synthetic_bands(600, 3000, 3, "uint8", seed=15)
    path = geotiff(width=600, height=3000, data=data, tiled=False, blocksize=1500, photometric="RGB")
    with open_raster(path, LIMITS) as reader:
        assert reader.info.block_shape == (1500, 600)
        assert get_gdal_config("GDAL_CACHEMAX") == raster.BASE_CACHE_BYTES + 1500 * 600 * 3
        tiles = list(reader.tiles(tile_grid(600, 3000, 512, 128)))
    np.testing.assert_array_equal(mosaic(tiles, 600, 3000)[0], data)
    assert get_gdal_config("GDAL_CACHEMAX") != raster.BASE_CACHE_BYTES + 1500 * 600 * 3
