"""export.synth: determinism, boxes that match what was drawn, georeferencing, the COCO CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from export.synth import (
    BUILDING,
    GSD_RANGE,
    PALM,
    PalmAt,
    main,
    render_scene,
    write_geotiff,
)


def test_same_seed_same_scene_and_bytes(tmp_path: Path) -> None:
    a, b = render_scene(7, 384), render_scene(7, 384)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.boxes, b.boxes)
    assert np.array_equal(a.categories, b.categories)
    assert a.transform == b.transform
    assert (
        write_geotiff(a, tmp_path / "a.tif").read_bytes() == write_geotiff(b, tmp_path / "b.tif").read_bytes()
    )


def test_different_seeds_differ() -> None:
    assert not np.array_equal(render_scene(1, 256).pixels, render_scene(2, 256).pixels)


def _changed(with_palm: np.ndarray, without: np.ndarray) -> np.ndarray:
    return np.abs(with_palm.astype(np.int16) - without.astype(np.int16)).max(axis=0) > 0


@pytest.mark.parametrize(("x", "y", "diameter", "gsd"), [(100.0, 120.0, 6.0, 0.3), (40.5, 200.0, 3.0, 0.6)])
def test_palm_box_is_what_was_drawn(x: float, y: float, diameter: float, gsd: float) -> None:
    """Without shadows, the only pixels a palm changes lie in its box (plus the 1 px anti-aliased rim and
    1 px of optics blur), and the box is no larger than the changed pixels' extent."""
    bare = render_scene(3, 256, gsd, populate=False, shadows=False)
    scene = render_scene(3, 256, gsd, palms=[PalmAt(x, y, diameter)], populate=False, shadows=False)
    assert scene.categories.tolist() == [PALM]
    assert len(bare.boxes) == 0
    x1, y1, x2, y2 = scene.boxes[0]
    assert abs((x1 + x2) / 2 - x) <= 1.5
    assert abs((y1 + y2) / 2 - y) <= 1.5
    assert 0.8 * diameter / gsd <= max(x2 - x1, y2 - y1) <= diameter / gsd + 1
    rows, cols = np.nonzero(_changed(scene.pixels, bare.pixels))
    assert cols.min() >= x1 - 2
    assert cols.max() + 1 <= x2 + 2
    assert rows.min() >= y1 - 2
    assert rows.max() + 1 <= y2 + 2
    assert cols.min() <= x1
    assert cols.max() + 1 >= x2
    assert rows.min() <= y1
    assert rows.max() + 1 >= y2


def test_populated_scene_has_both_categories_inside_the_image() -> None:
    scenes = [render_scene(s, 768) for s in range(4)]
    cats = np.concatenate([s.categories for s in scenes])
    assert (cats == PALM).sum() > 50
    assert (cats == BUILDING).sum() > 0
    for s in scenes:
        assert s.pixels.dtype == np.uint8
        assert s.pixels.shape == (3, 768, 768)
        assert np.all(s.boxes[:, :2] >= 0)
        assert np.all(s.boxes[:, 2:] <= 768)
        assert np.all(s.boxes[:, 2:] > s.boxes[:, :2])
        assert GSD_RANGE[0] <= s.gsd <= GSD_RANGE[1]


def test_geotiff_is_tiled_deflate_utm(tmp_path: Path) -> None:
    scene = render_scene(11, 300, 0.45)
    path = write_geotiff(scene, tmp_path / "s.tif")
    with rasterio.open(path) as src:
        assert (src.count, src.dtypes[0], src.width, src.height) == (3, "uint8", 300, 300)
        assert src.crs.to_epsg() // 100 in (326, 327)
        assert src.res == pytest.approx((0.45, 0.45))
        assert src.compression is not None
        assert src.compression.value == "DEFLATE"
        assert src.block_shapes[0] == (256, 256)
        assert np.array_equal(src.read(), scene.pixels)


def test_lonlat_round_trip_places_a_palm_at_a_known_position() -> None:
    probe = render_scene(5, 256, 0.5, populate=False)
    lon, lat = probe.pixel_to_lonlat(128.0, 64.0)
    assert -180 <= lon <= 180
    assert -60 <= lat <= 60
    x, y = probe.lonlat_to_pixel(lon, lat)
    assert (x, y) == pytest.approx((128.0, 64.0), abs=1e-6)
    scene = render_scene(5, 256, 0.5, palms=[PalmAt(x, y)], populate=False)
    bx1, by1, bx2, by2 = scene.boxes[0]
    assert bx1 < x < bx2
    assert by1 < y < by2


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gsd"):
        render_scene(0, 64, 2.5)
    with pytest.raises(ValueError, match="gsd"):
        render_scene(0, 64, 0.01)
    with pytest.raises(ValueError, match="size"):
        render_scene(0, 0)


def test_cli_writes_geotiffs_and_coco(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--scenes", "2", "--size", "320", "--seed", "1000000"]) == 0
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2]
    assert [i["file_name"] for i in coco["images"]] == ["scene_1000000.tif", "scene_1000001.tif"]
    expected = sum(len(render_scene(s, 320).boxes) for s in (1_000_000, 1_000_001))
    assert len(coco["annotations"]) == expected
    for image in coco["images"]:
        assert (tmp_path / image["file_name"]).is_file()
    assert "annotations.json" in capsys.readouterr().out


def test_imports_without_torch() -> None:
    code = "import sys, export.synth; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_distractors_keep_every_object_and_draw_only_on_free_ground() -> None:
    """The distractor layer has its own random stream: the scene's objects, their boxes and every other
    draw are those of the seed without it; it adds round non-palm things away from the ground truth."""
    plain = render_scene(1_000_003, 768, 0.3)
    busy = render_scene(1_000_003, 768, 0.3, distractors=True)
    assert np.array_equal(plain.boxes, busy.boxes)
    assert np.array_equal(plain.categories, busy.categories)
    assert (plain.crs, plain.transform, plain.gsd) == (busy.crs, busy.transform, busy.gsd)
    changed = _changed(busy.pixels, plain.pixels)
    assert changed.mean() > 0.01
    # Distractors are never placed on a palm's crown or a building: inside the boxes only the odd shadow
    # and the optics blur of a neighbour reach (a few percent of the boxes' pixels at most).
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in plain.boxes.astype(int):
        inside[y1:y2, x1:x2] = True
    assert changed[inside].mean() < 0.05
    assert changed[~inside].mean() > changed[inside].mean()
    again = render_scene(1_000_003, 768, 0.3, distractors=True)
    assert np.array_equal(busy.pixels, again.pixels)


def test_distractors_off_is_the_scene_as_it_always_was() -> None:
    # The pixels of render_scene(1_000_000, 256) before the distractor layer existed (commit 439022b).
    pixels = render_scene(1_000_000, 256).pixels
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == (
        "17c30d13f891ff87c912606eb13956b35b77d2c2edeadef10c39faf12922dee4"
    )
