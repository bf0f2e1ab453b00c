"""Every file in ``../shared/corpus`` (real and hostile TIFFs) through the reading path, in process and
through the isolated decode pool: each is accepted or refused with a GatewayError naming the reason;
no other exception, no crash, no hang. Prints the table of outcomes (``pytest -s`` shows it)."""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.decode import DecodePool
from gateway.errors import GatewayError
from gateway.pipeline.raster import ReadOptions, drivers_for_name, open_raster
from gateway.pipeline.tiling import tile_grid
from gateway.settings import DecodeSettings, LimitSettings

LIMITS = LimitSettings()
PREDICT_PIXELS = LimitSettings().max_predict_pixels
FILE_BUDGET_S = 60.0

# The manifest's reference policy rejects these for a reason; we must reject them too, with this class.
EXPECTED_REJECTIONS = {
    "reject_not_tiff_magic": "UnsupportedMediaType",
    "reject_size": "UnsupportedMediaType",
    "reject_dimensions": "RasterTooLarge",
    "reject_band_count": "RasterTooLarge",
    "reject_open_error": "CorruptRaster",
    "reject_decode_error": "CorruptRaster",
}


@dataclass
class Outcome:
    path: str
    result: str  # "accepted" or the GatewayError class name
    detail: str
    tiles: int = 0
    skipped: int = 0
    seconds: float = 0.0


def corpus_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def manifest(root: Path) -> dict[str, str]:
    with (root / "MANIFEST.tsv").open(newline="") as fh:
        return {row["path"]: row["ingest_policy_result"] for row in csv.DictReader(fh, delimiter="\t")}


def options_for(path: Path) -> ReadOptions:
    """What /v1/predict would use: its pixel limit, and the formats the upload's name allows."""
    return ReadOptions(max_pixels=PREDICT_PIXELS, drivers=drivers_for_name(path.name))


def read_in_process(path: Path) -> Outcome:
    started = time.perf_counter()
    try:
        with open_raster(path, LIMITS, options_for(path)) as reader:
            info = reader.info
            tiles = sum(1 for _ in reader.tiles(tile_grid(info.width, info.height, 512, 128)))
            outcome = Outcome(str(path), "accepted", _describe(info), tiles, reader.skipped)
    except GatewayError as exc:
        outcome = Outcome(str(path), type(exc).__name__, exc.detail)
    outcome.seconds = time.perf_counter() - started
    return outcome


async def read_in_pool(pool: DecodePool, path: Path) -> Outcome:
    started = time.perf_counter()
    try:
        async with pool.open(path, options_for(path)) as session:
            info = session.info
            tiles = 0
            async for batch in session.batches(tile_grid(info.width, info.height, 512, 128), 8):
                tiles += len(batch.specs)
            outcome = Outcome(str(path), "accepted", _describe(info), tiles, session.skipped)
    except GatewayError as exc:
        outcome = Outcome(str(path), type(exc).__name__, exc.detail)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _describe(info: object) -> str:
    from gateway.pipeline.raster import RasterInfo

    assert isinstance(info, RasterInfo)
    return (
        f"{info.width}x{info.height}x{info.count} {info.dtype} {info.colour}{list(info.band_map)} "
        f"{info.scaling} mask={','.join(info.masking) or '-'} crs={(info.crs or '-')[:14]}"
    )


def table(root: Path, rows: list[Outcome]) -> str:
    lines = [f"{'file':58} {'outcome':22} {'tiles':>5} {'skip':>4} {'s':>5}  detail"]
    for row in rows:
        name = str(Path(row.path).relative_to(root))[-58:]
        counts = f"{row.tiles:5} {row.skipped:4} {row.seconds:5.2f}"
        lines.append(f"{name:58} {row.result:22} {counts}  {row.detail[:90]}")
    totals: dict[str, int] = {}
    for row in rows:
        totals[row.result] = totals.get(row.result, 0) + 1
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    return "\n".join(lines)


def check(root: Path, rows: list[Outcome]) -> None:
    reference = manifest(root)
    for row in rows:
        rel = str(Path(row.path).relative_to(root))
        assert row.result == "accepted" or row.detail, f"{rel}: refused without a reason"
        assert row.seconds < FILE_BUDGET_S, f"{rel}: took {row.seconds:.1f} s"
        expected = reference.get(rel)
        if expected == "accept":
            assert row.result == "accepted", (
                f"{rel}: reference accepts it, we said {row.result}: {row.detail}"
            )
        elif expected in EXPECTED_REJECTIONS:
            assert row.result == EXPECTED_REJECTIONS[expected], f"{rel}: {expected}, we said {row.result}"
    assert any(row.result == "accepted" for row in rows)


@pytest.mark.timeout(600)
def test_every_corpus_file_in_process(corpus_dir: Path) -> None:
    rows = [read_in_process(path) for path in corpus_files(corpus_dir)]
    print("\nin-process open_raster + tiles:\n" + table(corpus_dir, rows))  # shown with -s or on failure
    check(corpus_dir, rows)


@pytest.mark.timeout(600)
def test_every_corpus_file_through_the_decode_pool(
    corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def sweep() -> list[Outcome]:
        settings = DecodeSettings(workers=2, file_timeout_s=FILE_BUDGET_S)
        async with DecodePool(settings, LIMITS, tile_size=512) as pool:
            rows = [await read_in_pool(pool, path) for path in corpus_files(corpus_dir)]
            assert len(pool.pids) == 2
            return rows

    rows = asyncio.run(sweep())
    print("\nthrough the decode pool:\n" + table(corpus_dir, rows))
    check(corpus_dir, rows)
    # Isolation must not change any outcome.
    in_process = {row.path: row.result for row in (read_in_process(Path(r.path)) for r in rows)}
    assert {row.path: row.result for row in rows} == in_process
