"""The blocking facade over the decode pool (for scripts and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.decode import SyncDecodePool
from gateway.errors import UnsupportedMediaType
from gateway.pipeline.tiling import tile_grid
from gateway.settings import DecodeSettings, LimitSettings
from tests.conftest import GeoTiffFactory


def test_sync_facade(tmp_path: Path, geotiff: GeoTiffFactory) -> None:
    mask = np.ones((700, 1100), bool)
    mask[:, 580:] = False
    masked = geotiff(width=1100, height=700, mask=mask)
    html = tmp_path / "page.tif"
    html.write_text("<html>not an image</html>")
    with SyncDecodePool(DecodeSettings(workers=1), LimitSettings(), tile_size=512) as pool:
        (pid,) = pool.pids
        with pool.open(masked) as session:
            assert session.info.width == 1100
            tiles = sum(len(b.specs) for b in session.batches(tile_grid(1100, 700, 512, 128), 4))
            assert session.skipped == 2
            assert tiles + session.skipped == len(tile_grid(1100, 700, 512, 128))
        with pytest.raises(UnsupportedMediaType), pool.open(html):
            pass
        assert pool.pids == [pid]
    assert not Path(f"/proc/{pid}").exists()
