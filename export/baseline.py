"""The model's input baseline: what its validation imagery looks like to it, for drift monitoring.

For each held-out synthetic scene, the scene is written as a GeoTIFF and read back through the
gateway's own reader and tiling (``open_raster``, ``tile_grid``), and its tiles are summarised exactly
as the decode workers summarise a user's file (:class:`gateway.pipeline.inputs.InputStatistics`), plus
its ground sample distance. The baseline records, per statistic, the mean and standard deviation over
scenes and their range; live values are compared with it (the Prometheus rules in
``deploy/prometheus/alerts.yml``: docs/operations.md).

``python -m export.baseline --scenes 40 --seed 1000000 [--card]`` prints the baseline and, with
``--card``, stores it as ``input_baseline`` in the model card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.synth import HELDOUT_MIN_SEED, render_scene, write_geotiff
from gateway.model_card import update_card
from gateway.pipeline.contract import ModelContract
from gateway.pipeline.inputs import CHANNELS, InputStatistics
from gateway.pipeline.raster import open_raster
from gateway.pipeline.tiling import default_overlap, tile_grid
from gateway.settings import REPO_ROOT, LimitSettings

CARD = REPO_ROOT / "model_repository" / "palm" / "1" / "model_card.json"


def card_tile_size() -> int:
    """The tile side the gateway serves the model with: its card's contract."""
    return ModelContract.from_card(json.loads(CARD.read_text())["contract"], source=str(CARD)).tile_size


def scene_statistics(path: Path) -> dict[str, float]:
    """One file's input statistics, as the decode workers compute them, and its GSD."""
    stats = InputStatistics()
    with open_raster(path, LimitSettings()) as reader:
        side = card_tile_size()
        specs = tile_grid(reader.info.width, reader.info.height, side, default_overlap(side))
        for spec in specs:
            stats.expect(spec.width, spec.height)
        for tile in reader.tiles(specs):
            stats.add(tile.pixels, tile.valid, tile.spec.width, tile.spec.height)
        gsd = reader.info.gsd_m
    summary = stats.summary()
    if summary is None:
        raise ValueError(f"{path} has no valid pixel")
    values = {f"channel_mean_{c}": m for c, m in zip(CHANNELS, summary.mean, strict=True)}
    values.update({f"channel_spread_{c}": s for c, s in zip(CHANNELS, summary.spread, strict=True)})
    values["colourfulness"] = summary.colourfulness
    values["valid_fraction"] = summary.valid_fraction
    if gsd is not None:
        values["gsd_m"] = gsd
    return values


def baseline(seeds: Sequence[int], size: int) -> dict[str, Any]:
    """Mean, standard deviation and range over the scenes of each statistic."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="palm-baseline-") as tmp:
        for seed in seeds:
            path = write_geotiff(render_scene(seed, size=size), Path(tmp) / f"scene_{seed}.tif")
            rows.append(scene_statistics(path))
            path.unlink()
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = {
            "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.pstdev(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    return {
        "scenes": len(rows),
        "seeds": [seeds[0], seeds[-1]],
        "scene_size": size,
        "method": "gateway reader and tiling, tiles sampled on a 4-pixel grid (gateway.pipeline.inputs)",
        "statistics": out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=HELDOUT_MIN_SEED, help="first held-out scene seed")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--card", action="store_true", help=f"store it in {CARD.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    if args.seed < HELDOUT_MIN_SEED:
        parser.error(f"use held-out seeds (>= {HELDOUT_MIN_SEED})")
    result = baseline(list(range(args.seed, args.seed + args.scenes)), args.size)
    print(json.dumps(result, indent=2))
    if args.card:
        update_card(CARD, input_baseline=result)
        print(f"stored in {CARD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
