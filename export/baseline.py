"""The model's input baseline: what its validation imagery looks like to it, for drift monitoring.

For each held-out synthetic scene, the scene is written as a GeoTIFF and read back through the
gateway's own reader and tiling (``open_raster``, ``tile_grid``), and its tiles are summarised exactly
as the decode workers summarise a user's file (:class:`gateway.pipeline.inputs.InputStatistics`), plus
its ground sample distance, and its colour balance (``balance_rg = mean_r - mean_g``, ``balance_bg =
mean_b - mean_g``). The baseline records, per statistic, the mean and standard deviation over scenes and
their range; live values are compared with it (the Prometheus rules in ``deploy/prometheus/alerts.yml``:
docs/operations.md; the per-file out-of-domain score, :mod:`gateway.pipeline.domain`).

With ``--grey`` (for a model validated on 1-band imagery) the same scenes are also summarised as the
grey image a panchromatic sensor gives (their luma, :func:`export.synth.to_grey`), under ``grey``.

``python -m export.baseline --scenes 40 --seed 1000000 [--grey] [--card]`` prints the baseline and,
with ``--card``, stores it as ``input_baseline`` in the model card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.synth import HELDOUT_MIN_SEED, render_scene, to_grey, write_geotiff
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
    values["balance_rg"] = round(summary.mean[0] - summary.mean[1], 3)
    values["balance_bg"] = round(summary.mean[2] - summary.mean[1], 3)
    values["valid_fraction"] = summary.valid_fraction
    if gsd is not None:
        values["gsd_m"] = gsd
    return values


def _aggregate(rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = {
            "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.pstdev(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    return out


def baseline(seeds: Sequence[int], size: int, grey: bool = False) -> dict[str, Any]:
    """Mean, standard deviation and range over the scenes of each statistic (and of their luma when
    ``grey``)."""
    rows, grey_rows = [], []
    with tempfile.TemporaryDirectory(prefix="palm-baseline-") as tmp:
        for seed in seeds:
            scene = render_scene(seed, size=size)
            path = write_geotiff(scene, Path(tmp) / f"scene_{seed}.tif")
            rows.append(scene_statistics(path))
            if grey:
                write_geotiff(replace(scene, pixels=to_grey(scene.pixels)), path)
                grey_rows.append(scene_statistics(path))
            path.unlink()
    result: dict[str, Any] = {
        "scenes": len(rows),
        "seeds": [seeds[0], seeds[-1]],
        "scene_size": size,
        "method": "gateway reader and tiling, tiles sampled on a 4-pixel grid (gateway.pipeline.inputs)",
        "statistics": _aggregate(rows),
    }
    if grey:
        result["grey"] = {
            "method": "the luma of the same scenes (export.synth.to_grey), as a 1-band sensor gives them",
            "statistics": _aggregate(grey_rows),
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=HELDOUT_MIN_SEED, help="first held-out scene seed")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--grey", action="store_true", help="also summarise the scenes' luma (grey variant)")
    parser.add_argument("--card", action="store_true", help=f"store it in {CARD.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    if args.seed < HELDOUT_MIN_SEED:
        parser.error(f"use held-out seeds (>= {HELDOUT_MIN_SEED})")
    result = baseline(list(range(args.seed, args.seed + args.scenes)), args.size, args.grey)
    print(json.dumps(result, indent=2))
    if args.card:
        update_card(CARD, input_baseline=result)
        print(f"stored in {CARD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
