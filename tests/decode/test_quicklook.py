"""Quicklooks: the same pixels as the tiles, alpha from validity, a real PNG, rendered in a decode worker
between streams without disturbing them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from gateway.decode import DecodePool
from gateway.errors import CorruptRaster
from gateway.pipeline.raster import open_raster, quicklook
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


async def test_quicklook_is_refused_while_a_stream_runs(pool: DecodePool, files: dict[str, Path]) -> None:
    async with pool.open(files["wide"]) as session:
        stream = session.batches(tile_grid(session.info.width, session.info.height, 512, 128), 1)
        await anext(stream)
        with pytest.raises(RuntimeError, match="no stream"):
            await session.quicklook(100)
        await stream.aclose()
