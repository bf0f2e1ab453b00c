"""Calibrate and measure the out-of-domain score (:mod:`gateway.pipeline.domain`) on files the way the
gateway reads them.

Every file goes through the gateway's decode workers (:class:`~gateway.decode.SyncDecodePool`, the
reader's band and scaling rules, 512 px tiles with 128 px overlap), whose input statistics are scored
against the model card's baseline. Three sets of files:

* **in-domain**, generated: held-out scenes (seeds ``>= HELDOUT_MIN_SEED``) at sizes cycling through
  :data:`SIZES`, every fifth one grey (the luma as a 1-band GeoTIFF, as the model was trained with 20%
  grey crops and is validated on grey: the card's ``evaluation_grey``), every other run of six with the
  generator's distractors. A *calibration* run (``--calibrate-seed``) sets the threshold: the largest
  calibration score rounded up to a multiple of 0.5. A separate *measurement* run (``--seed``) gives the
  false-alarm rate at that threshold. The threshold sits at the edge of the in-domain scores on purpose:
  every step above it lets more foreign inputs through (docs/model.md).
* **foreign**, generated: inputs the model was never meant for (:func:`foreign_inputs`): a scanned
  grey document, a thermal band, an over-exposed (saturated) scene, a night scene, a scene with its
  bands in BGR order, a photo-like picture.
* **corpus**: every file under ``--corpus`` that the gateway reads (others are counted as refused).

``python -m export.domain [--card]`` prints the figures; with ``--card`` it stores the threshold and
the figures as the card's ``out_of_domain`` section (run ``python -m export.baseline --grey --card``
first: the score is relative to that baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import rasterio

from export.baseline import card_tile_size
from export.synth import HELDOUT_MIN_SEED, Scene, fractal_noise, render_scene, to_grey, write_geotiff
from gateway.decode import SyncDecodePool
from gateway.errors import GatewayError
from gateway.model_card import update_card
from gateway.pipeline.domain import STD_FLOOR, DomainBaseline, DomainCheck, assess
from gateway.pipeline.raster import ReadOptions, drivers_for_name
from gateway.pipeline.tiling import default_overlap, tile_grid
from gateway.settings import REPO_ROOT, DecodeSettings, LimitSettings

CARD = REPO_ROOT / "model_repository" / "palm" / "1" / "model_card.json"
SIZES: Final = (256, 384, 512, 768, 1024, 1280)


@dataclass(frozen=True, slots=True)
class Scored:
    """One file and its score (``None`` when the gateway refused it)."""

    name: str
    check: DomainCheck | None
    detail: str = ""


def in_domain(seed: int, index: int) -> tuple[str, Scene, bool]:
    """The ``index``-th in-domain file of a run: its name, its scene and whether it is grey."""
    size = SIZES[index % len(SIZES)]
    grey = index % 5 == 4
    distractors = (index // len(SIZES)) % 2 == 1
    scene = render_scene(seed, size, distractors=distractors)
    name = f"scene_{seed}_{size}{'_grey' if grey else ''}{'_distractors' if distractors else ''}.tif"
    return name, scene, grey


def write_grey(pixels: npt.NDArray[np.uint8], path: Path, scene: Scene | None = None) -> Path:
    """A 1-band ``uint8`` GeoTIFF (georeferenced like ``scene`` when given)."""
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": pixels.shape[-1],
        "height": pixels.shape[-2],
        "count": 1,
        "dtype": str(pixels.dtype),
    }
    if scene is not None:
        profile.update(crs=scene.crs, transform=scene.transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels.reshape(1, *pixels.shape[-2:]))
    return path


def _write_rgb(pixels: npt.NDArray[np.uint8], path: Path) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=3, dtype="uint8"
    ) as dst:
        dst.write(pixels)
    return path


def foreign_inputs(folder: Path) -> Iterator[Path]:
    """Generated files that are not aerial RGB imagery at 0.3-0.6 m (seeded; see the module docstring)."""
    rng = np.random.default_rng(15)
    # A scanned page: white paper, lines of dark text.
    page = np.full((1100, 850), 236, np.float32) + rng.normal(0, 3, (1100, 850)).astype(np.float32)
    for top in range(120, 1000, 34):
        for left in range(90, 760, 9):
            if rng.random() < 0.8:
                page[top : top + 14, left : left + 6] = rng.uniform(20, 70)
    yield write_grey(np.clip(page, 0, 255).astype(np.uint8), folder / "grey_document_scan.tif")
    # A thermal band: brightness temperature in centikelvin (uint16), smooth with a few hot spots.
    field = fractal_noise(rng, 800, 800, (400, 200, 100, 50, 25))
    temp = 29_500 + 600 * field
    yy, xx = np.mgrid[0:800, 0:800]
    for _ in range(6):
        cx, cy = rng.uniform(0, 800, 2)
        temp += 1500 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(6, 20) ** 2))
    yield write_grey(temp.astype(np.uint16), folder / "thermal_band.tif")
    scene = render_scene(HELDOUT_MIN_SEED + 999_000, 1024)
    bright = np.clip(scene.pixels.astype(np.float32) * 3.0, 0, 255).astype(np.uint8)
    yield write_geotiff(replace(scene, pixels=bright), folder / "saturated_scene.tif")
    night = np.rint(scene.pixels.astype(np.float32) * 0.15).astype(np.uint8)
    yield write_geotiff(replace(scene, pixels=night), folder / "night_scene.tif")
    yield write_geotiff(replace(scene, pixels=scene.pixels[::-1].copy()), folder / "bgr_scene.tif")
    # A photo-like picture: a sky gradient, a face-coloured ellipse, a red shirt, no georeferencing.
    h, w = 900, 700
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    photo = np.empty((3, h, w), np.float32)
    photo[0], photo[1], photo[2] = 110 + 60 * yy / h, 160 + 40 * yy / h, 235 - 10 * yy / h
    face = ((xx - 350) / 150) ** 2 + ((yy - 380) / 200) ** 2 < 1
    photo[:, face] = np.array([224, 172, 140], np.float32)[:, None]
    shirt = yy > 620
    photo[:, shirt] = np.array([190, 30, 40], np.float32)[:, None]
    photo += rng.normal(0, 4, photo.shape).astype(np.float32)
    yield _write_rgb(np.clip(photo, 0, 255).astype(np.uint8), folder / "photo_like.tif")


def score_files(
    pool: SyncDecodePool, paths: Sequence[tuple[str, Path]], baseline: DomainBaseline
) -> list[Scored]:
    """Each file's score as the gateway computes it (``None`` for a file the gateway refuses)."""
    side = card_tile_size()
    out = []
    for name, path in paths:
        try:
            with pool.open(path, ReadOptions(drivers=drivers_for_name(path.name))) as session:
                for batch in session.batches(tile_grid(*session.info.read_size, side, default_overlap(side))):
                    del batch
                summary = session.inputs
        except GatewayError as exc:
            out.append(Scored(name, None, f"refused: {type(exc).__name__}"))
            continue
        if summary is None:
            out.append(Scored(name, None, "no valid pixel"))
            continue
        out.append(Scored(name, assess(summary, baseline)))
    return out


def generated_run(
    pool: SyncDecodePool, seeds: range, baseline: DomainBaseline, folder: Path, log: Callable[[str], None]
) -> list[Scored]:
    """Score the in-domain files of ``seeds`` (rendered, written, read back, deleted one by one)."""
    scored: list[Scored] = []
    for index, seed in enumerate(seeds):
        name, scene, grey = in_domain(seed, index)
        path = folder / name
        if grey:
            write_grey(to_grey(scene.pixels)[0], path, scene)
        else:
            write_geotiff(scene, path)
        scored += score_files(pool, [(name, path)], baseline)
        path.unlink()
        if (index + 1) % 50 == 0:
            log(f"  {index + 1}/{len(seeds)} scenes")
    return scored


def threshold_from(scores: Sequence[float]) -> float:
    """The largest calibration score rounded up to a multiple of 0.5."""
    return math.ceil(max(scores) * 2) / 2


def _summary(scored: Sequence[Scored], threshold: float) -> dict[str, Any]:
    checks = [s.check for s in scored if s.check is not None]
    scores = sorted(c.score for c in checks)
    flagged = [s for s in scored if s.check is not None and s.check.score > threshold]

    def part(keep: Callable[[str], bool]) -> dict[str, int]:
        sel = [s for s in scored if keep(s.name)]
        return {"files": len(sel), "flagged": sum(s in flagged for s in sel)}

    return {
        "files": len(scored),
        "flagged": len(flagged),
        "false_alarm_rate": round(len(flagged) / max(len(scored), 1), 4),
        "score_max": scores[-1] if scores else None,
        "score_p99": round(float(np.percentile(scores, 99)), 2) if scores else None,
        "score_median": round(statistics.median(scores), 2) if scores else None,
        "grey": part(lambda n: "_grey" in n),
        "colour": part(lambda n: "_grey" not in n),
        "with_distractors": part(lambda n: "_distractors" in n),
        "by_size": {str(size): part(_has(f"_{size}")) for size in SIZES},
        "flagged_files": [{"file": s.name, **s.check.to_json()} for s in flagged if s.check is not None],
    }


def _has(text: str) -> Callable[[str], bool]:
    return lambda name: text in name


def _row(s: Scored) -> str:
    if s.check is None:
        return f"{s.name:60s} {'-':>6s}  {s.detail}"
    c = s.check
    mark = "FLAGGED" if c.out_of_domain else "ok"
    return (
        f"{s.name:60s} {c.score:6.2f}  {mark:7s} {c.variant:6s} {c.statistic} = {c.value:.1f} "
        f"(validation mean {c.reference:.1f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m export.domain", description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate-scenes", type=int, default=240)
    parser.add_argument("--calibrate-seed", type=int, default=1_100_000)
    parser.add_argument("--scenes", type=int, default=480, help="in-domain files for the false-alarm rate")
    parser.add_argument("--seed", type=int, default=1_200_000, help="first seed of the measured files")
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT.parent / "shared" / "corpus")
    parser.add_argument("--threshold", type=float, help="use this threshold instead of calibrating one")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--card", action="store_true", help=f"store in {CARD.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    for start in (args.calibrate_seed, args.seed):
        if start < HELDOUT_MIN_SEED:
            parser.error(f"use held-out seeds (>= {HELDOUT_MIN_SEED})")
    calibration = range(args.calibrate_seed, args.calibrate_seed + args.calibrate_scenes)
    measured = range(args.seed, args.seed + args.scenes)
    if set(calibration) & set(measured):
        parser.error("the calibration and measurement seeds overlap")
    card = json.loads(CARD.read_text())
    base = DomainBaseline.from_card(card)
    if base is None:
        parser.error(f"{CARD} has no input_baseline; run python -m export.baseline --grey --card")
    started = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    result: dict[str, Any] = {"rule": "min over variants of max |x - mean| / max(std, floor)"}
    result["std_floor"] = STD_FLOOR
    result["variants"] = [v.name for v in base.variants]
    with (
        SyncDecodePool(DecodeSettings(workers=1), LimitSettings(), tile_size=card_tile_size()) as pool,
        tempfile.TemporaryDirectory(prefix="palm-domain-") as tmp,
    ):
        folder = Path(tmp)
        if args.threshold is None:
            seeds = f"{calibration.start}-{calibration.stop - 1}"
            log(f"calibration: {len(calibration)} in-domain files, seeds {seeds}")
            cal = generated_run(pool, calibration, base, folder, log)
            cal_scores = [s.check.score for s in cal if s.check is not None]
            threshold = threshold_from(cal_scores)
            result["calibration"] = {
                "seeds": [calibration.start, calibration.stop - 1],
                "files": len(cal),
                "score_max": max(cal_scores),
                "score_p99": round(float(np.percentile(cal_scores, 99)), 2),
                "rounding": "up to a multiple of 0.5",
            }
            worst = max(cal, key=lambda s: s.check.score if s.check else -1.0)
            if worst.check is not None:
                worst = replace(worst, check=replace(worst.check, threshold=threshold))
            log(f"  largest calibration score: {_row(worst)}")
        else:
            threshold = args.threshold
        base = replace(base, threshold=threshold)
        result["threshold"] = threshold
        log(f"threshold {threshold}")

        log(f"in-domain: {len(measured)} files, seeds {measured.start}-{measured.stop - 1}, sizes {SIZES}")
        run = generated_run(pool, measured, base, folder, log)
        result["in_domain"] = {"seeds": [measured.start, measured.stop - 1], **_summary(run, threshold)}
        summary = result["in_domain"]
        log(
            f"  false alarms {summary['flagged']}/{summary['files']} "
            f"({100 * summary['false_alarm_rate']:.2f}%); "
            f"grey {summary['grey']['flagged']}/{summary['grey']['files']}, "
            f"colour {summary['colour']['flagged']}/{summary['colour']['files']}; "
            f"score median {summary['score_median']}, p99 {summary['score_p99']}, max {summary['score_max']}"
        )
        for size, part in summary["by_size"].items():
            log(f"    {size:>5s} px: {part['flagged']}/{part['files']}")
        for row in summary["flagged_files"]:
            log(f"    flagged: {row['file']} {row['score']} {row['statistic']}")

        log("foreign inputs:")
        foreign = score_files(pool, [(p.name, p) for p in foreign_inputs(folder)], base)
        for s in foreign:
            log("  " + _row(s))
        result["foreign"] = [
            {"file": s.name, **(s.check.to_json() if s.check else {"refused": s.detail})} for s in foreign
        ]

        if args.corpus.is_dir():
            files = sorted(
                p for p in args.corpus.rglob("*") if p.is_file() and p.suffix.lower() in (".tif", ".tiff")
            )
            log(f"corpus: {len(files)} .tif/.tiff files under {args.corpus}")
            corpus = score_files(pool, [(str(p.relative_to(args.corpus)), p) for p in files], base)
            for s in corpus:
                log("  " + _row(s))
            read = [s for s in corpus if s.check is not None]
            flagged = [s for s in read if s.check is not None and s.check.out_of_domain]
            log(f"  read {len(read)}, flagged {len(flagged)}, refused or empty {len(corpus) - len(read)}")
            result["corpus"] = {
                "files": len(files),
                "read": len(read),
                "flagged": len(flagged),
                "scores": {s.name: s.check.score for s in read if s.check is not None},
            }
    result["command"] = "python -m export.domain " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.card:
        update_card(CARD, out_of_domain=result)
        log(f"stored in {CARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
