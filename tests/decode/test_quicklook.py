"""Quicklooks: the same pixels as the tiles, alpha from validity, a real PNG, rendered in a decode worker
between streams without disturbing them, or painted from a stream's own tiles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from gateway.decode import DecodePool, StreamPlan
from gateway.errors import CorruptRaster
from gateway.pipeline.raster import RasterReader, open_raster, quicklook
from gateway.pipeline.raster.policy import UInt8Array
from gateway.pipeline.tiling import tile_grid
from gateway.settings import DecodeSettings, LimitSettings
from tests.factories import make_geotiff, read_png

LIMITS = LimitSettings()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quicklook")
    mask = np.ones((200, 300), bool)
    mask[50:80, 100:200] = False
    corrupt = make_geotiff(root / "corrupt.tif", width=1024, height=1024, blocksize=256)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2048] = bytes(2048)
    corrupt.write_bytes(bytes(data))
    return {
        "masked16": make_geotiff(root / "m.tif", width=300, height=200, dtype="uint16", mask=mask),
        "grey": make_geotiff(root / "g.tif", width=300, height=200, bands=1),
        "wide": make_geotiff(root / "w.tif", width=3000, height=120, overviews=(2, 4)),
        "corrupt": corrupt,
    }


@pytest.mark.parametrize(
    ("width", "height", "max_side", "expected"),
    [
        (300, 200, 2048, (200, 300)),
        (3000, 120, 1000, (40, 1000)),
        (100, 5000, 50, (50, 1)),
        (1, 1, 8, (1, 1)),
    ],
)
def test_the_longest_side_is_capped_and_the_aspect_kept(
    width: int, height: int, max_side: int, expected: tuple[int, int]
) -> None:
    assert quicklook.quicklook_shape(width, height, max_side) == expected


def test_the_png_decodes_to_the_pixels_written() -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    png = quicklook.encode_png(rgba)
    assert len(png) <= quicklook.png_max_bytes(37, 53)
    np.testing.assert_array_equal(read_png(png), rgba)


def test_a_png_written_in_pieces_equals_one_written_whole() -> None:
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (20, 9, 4), dtype=np.uint8)
    writer = quicklook.PngWriter(20, 9)
    for start, stop in ((0, 1), (1, 1), (1, 12), (12, 20)):
        writer.add(rgba[start:stop])
    np.testing.assert_array_equal(read_png(writer.finish()), rgba)
    with pytest.raises(ValueError, match="do not fit"):
        writer.add(rgba[:1])
    short = quicklook.PngWriter(20, 9)
    short.add(rgba[:19])
    with pytest.raises(ValueError, match="19 of 20 rows"):
        short.finish()


def _painted(reader: RasterReader, max_side: int) -> UInt8Array:
    info = reader.info
    canvas = quicklook.TileCanvas(info.width, info.height, *info.read_size, max_side)
    for tile in reader.tiles(tile_grid(*info.read_size, 512, 128)):
        canvas.add(tile.spec, tile.pixels, tile.valid)
    return read_png(canvas.png())


@pytest.mark.parametrize("name", ["masked16", "grey", "wide"])
def test_a_canvas_painted_from_the_tiles_is_the_image_sampled_at_its_pixel_centres(
    files: dict[str, Path], name: str
) -> None:
    with open_raster(files[name], LIMITS) as reader:
        width, height = reader.info.width, reader.info.height
        full = quicklook.render(reader, reader.plan, width, height, max(width, height))
        assert_array_equal_rgba(_painted(reader, max(width, height)), full)
        small = _painted(reader, 100)
    rows, cols = quicklook.quicklook_shape(width, height, 100)
    ys = ((np.arange(rows) + 0.5) * height / rows).astype(int)
    xs = ((np.arange(cols) + 0.5) * width / cols).astype(int)
    assert_array_equal_rgba(small, full[ys][:, xs])


def test_a_canvas_leaves_uncovered_pixels_transparent_and_wants_row_major_tiles() -> None:
    pixels = np.full((3, 512, 512), 7, np.uint8)
    top_left, top_right, bottom_left, _ = tile_grid(1024, 1024, 512, 0)
    canvas = quicklook.TileCanvas(1024, 1024, 1024, 1024, 1024)
    canvas.add(top_right, pixels, None)
    canvas.add(bottom_left, pixels, None)
    with pytest.raises(ValueError, match="row-major"):
        canvas.add(top_left, pixels, None)
    rgba = read_png(canvas.png())
    painted = np.zeros((1024, 1024), bool)
    painted[:512, 512:] = painted[512:, :512] = True
    assert (rgba[painted] == (7, 7, 7, 255)).all()
    assert (rgba[~painted] == 0).all(), "pixels no tile covered stay transparent"


def assert_array_equal_rgba(actual: UInt8Array, expected: UInt8Array) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual[..., 3], expected[..., 3])
    np.testing.assert_array_equal(actual[..., :3], expected[..., :3])


@pytest.mark.parametrize("name", ["masked16", "grey"])
def test_a_full_size_quicklook_has_the_tiles_pixels_and_alpha_from_validity(
    files: dict[str, Path], name: str
) -> None:
    with open_raster(files[name], LIMITS) as reader:
        rgba = quicklook.render(reader, reader.plan, 300, 200, 2048)
        (tile,) = reader.tiles(tile_grid(300, 200, 512, 128))
    assert rgba.shape == (200, 300, 4)
    np.testing.assert_array_equal(np.moveaxis(rgba[..., :3], -1, 0), tile.pixels[:, :200, :300])
    valid = np.ones((200, 300), bool) if tile.valid is None else tile.valid[:200, :300]
    np.testing.assert_array_equal(rgba[..., 3] == 255, valid)
    assert set(np.unique(rgba[..., 3])) <= {0, 255}
    if name == "masked16":
        assert not valid[50:80, 100:200].any()


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[DecodePool]:
    async with DecodePool(DecodeSettings(workers=1), LIMITS, tile_size=512) as started:
        yield started


async def test_a_worker_renders_it_between_streams_and_keeps_serving(
    pool: DecodePool, files: dict[str, Path]
) -> None:
    worker = pool.pids
    async with pool.open(files["wide"]) as session:
        look = await session.quicklook(1000)
        specs = tile_grid(session.info.width, session.info.height, 512, 128)
        tiles = sum([len(b.specs) async for b in session.batches(specs, 4)])
        again = await session.quicklook(100)
    assert (look.width, look.height) == (1000, 40)
    assert tiles == len(specs)
    pixels = read_png(look.png)
    assert pixels.shape == (40, 1000, 4)
    assert (pixels[..., 3] == 255).all()
    assert read_png(again.png).shape == (4, 100, 4)

    with pytest.raises(CorruptRaster):
        async with pool.open(files["corrupt"]) as session:
            await session.quicklook(2048)
    async with pool.open(files["grey"]) as session:
        assert (await session.quicklook(64)).width == 64
    assert pool.pids == worker, "errors and quicklooks leave the worker in step"


async def test_a_stream_that_asks_for_a_quicklook_paints_it_from_its_tiles(
    pool: DecodePool, files: dict[str, Path]
) -> None:
    worker = pool.pids
    plan = StreamPlan(tile=512, overlap=128, batch_size=2, quicklook_max_side=1000)
    async with pool.open(files["wide"], plan=plan) as session:
        tiles = sum([len(b.specs) async for b in session.batches()])
        look = session.stream_quicklook
        rendered = await session.quicklook(1000)
    assert tiles == len(tile_grid(3000, 120, 512, 128))
    assert look is not None
    assert (look.width, look.height) == (1000, 40)
    with open_raster(files["wide"], LIMITS) as reader:
        assert_array_equal_rgba(read_png(look.png), _painted(reader, 1000))
    assert read_png(rendered.png).shape == read_png(look.png).shape
    async with pool.open(files["grey"], plan=StreamPlan(tile=512, overlap=128)) as session:
        assert sum([len(b.specs) async for b in session.batches()]) == 1
        assert session.stream_quicklook is None, "no quicklook unless the plan asks"
    assert pool.pids == worker


async def test_quicklook_is_refused_while_a_stream_runs(pool: DecodePool, files: dict[str, Path]) -> None:
    async with pool.open(files["wide"]) as session:
        stream = session.batches(tile_grid(session.info.width, session.info.height, 512, 128), 1)
        await anext(stream)
        with pytest.raises(RuntimeError, match="no stream"):
            await session.quicklook(100)
        await stream.aclose()
