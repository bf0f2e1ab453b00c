"""The decode pool: same tiles as in-process reading, errors crossing the process boundary, crashes,
memory and time limits failing one file only, bounded concurrency, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from gateway import procfs
from gateway.decode import DecodePool, StreamPlan, TileBatch
from gateway.decode.arena import SHM_DIR
from gateway.errors import (
    CorruptRaster,
    DecoderFailed,
    DecoderLost,
    GatewayError,
    InvalidParameter,
    RasterTooLarge,
    UnsupportedMediaType,
)
from gateway.pipeline.raster import ReadOptions, open_raster
from gateway.pipeline.tiling import balanced_batch, tile_grid
from gateway.scheduling import Priority
from gateway.settings import DecodeSettings, LimitSettings
from tests.factories import make_geotiff

pytestmark = pytest.mark.asyncio(loop_scope="module")

CRASHING_WORKER = [sys.executable, str(Path(__file__).with_name("crashing_worker.py"))]
LIMITS = LimitSettings()


def decode_children() -> set[int]:
    """Live child processes of this test process that are decode workers."""
    return {pid for pid in procfs.children(os.getpid()) if "worker" in (procfs.command_line(pid) or "")}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pool() -> AsyncIterator[DecodePool]:
    async with DecodePool(
        DecodeSettings(workers=2), LIMITS, worker_command=CRASHING_WORKER, tile_size=512
    ) as started:
        yield started
    assert decode_children() == set()
    assert list(SHM_DIR.glob(f"palm_tiles_{os.getpid()}_*")) == [], "close() unlinks the tile regions"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    mask = np.ones((700, 1100), bool)
    mask[:, 580:] = False  # the right column of tiles (x >= 588) has no valid pixel
    mask[100:150, 100:300] = False
    html = root / "page.tif"
    html.write_bytes(b"<html><body>502</body></html>")
    corrupt = make_geotiff(root / "corrupt.tif", width=1024, height=1024, blocksize=256)
    data = bytearray(corrupt.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2048] = bytes(2048)
    corrupt.write_bytes(bytes(data))
    made = {
        "masked": make_geotiff(root / "masked.tif", width=1100, height=700, mask=mask, photometric="RGB"),
        "small": make_geotiff(root / "small.tif", width=300, height=200, bands=1, dtype="uint16"),
        "html": html,
        "corrupt": corrupt,
    }
    for prefix in ("abort", "segv", "hog", "hang", "exit"):
        made[prefix] = root / f"{prefix}-file.tif"
        made[prefix].write_bytes(b"II*\x00")
    return made


async def decode_all(
    pool: DecodePool, path: Path, batch_size: int = 8, **options: object
) -> tuple[list[TileBatch], int]:
    async with pool.open(path, ReadOptions(**options)) as session:  # type: ignore[arg-type]
        specs = tile_grid(session.info.width, session.info.height, 512, 128)
        batches = [b async for b in session.batches(specs, batch_size)]
        return batches, session.skipped


async def test_pool_tiles_equal_in_process_tiles(pool: DecodePool, files: dict[str, Path]) -> None:
    batches, skipped = await decode_all(pool, files["masked"], batch_size=3)
    with open_raster(files["masked"], LIMITS) as reader:
        expected = list(reader.tiles(tile_grid(1100, 700, 512, 128)))
        assert skipped == reader.skipped > 0
    assert all(0 < len(b.specs) <= 3 for b in batches)
    got = [
        (spec, b.pixels[i], None if b.valid is None else b.valid[i])
        for b in batches
        for i, spec in enumerate(b.specs)
    ]
    assert [g[0] for g in got] == [t.spec for t in expected]
    for (_, pixels, valid), tile in zip(got, expected, strict=True):
        assert pixels.shape == (3, 512, 512)
        np.testing.assert_array_equal(pixels, tile.pixels)
        if tile.valid is None:
            assert valid is None or valid.all()
        else:
            assert valid is not None
            np.testing.assert_array_equal(valid, tile.valid)


async def test_session_reports_raster_info(pool: DecodePool, files: dict[str, Path]) -> None:
    async with pool.open(files["small"]) as session:
        info = session.info
    with open_raster(files["small"], LIMITS) as reader:
        assert info == reader.info
    assert info.stretch is not None
    assert info.transform == (0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)


@pytest.mark.parametrize(
    ("name", "options", "error", "text"),
    [
        ("html", {}, UnsupportedMediaType, "HTML page"),
        ("corrupt", {}, CorruptRaster, "cannot be decoded"),
        ("masked", {"max_pixels": 1000}, RasterTooLarge, "palm-serve predict"),
        ("masked", {"bands": (9,)}, InvalidParameter, "between 1 and 3"),
    ],
)
async def test_errors_cross_the_process_boundary(
    pool: DecodePool,
    files: dict[str, Path],
    name: str,
    options: dict[str, object],
    error: type[GatewayError],
    text: str,
) -> None:
    before = pool.pids
    with pytest.raises(error, match=text) as caught:
        await decode_all(pool, files[name], **options)
    assert type(caught.value) is error
    assert pool.pids == before  # an ordinary refusal keeps the worker


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("abort", "aborted \\(SIGABRT\\)"),
        ("segv", "SIGSEGV"),
        ("exit", "exited \\(status 3\\)"),
        ("hog", "more memory than a decode worker may use"),
    ],
)
async def test_a_crash_fails_only_that_file(
    pool: DecodePool, files: dict[str, Path], name: str, text: str
) -> None:
    before = set(pool.pids)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DecoderFailed, match=text) as caught:
        await decode_all(pool, files[name])
    assert caught.value.status == 422
    batches, _ = await decode_all(pool, files["small"])  # the pool keeps serving
    assert len(batches) == 1
    for _ in range(100):  # the lost worker is replaced in the background
        if len(pool.pids) == 2 and set(pool.pids) != before:
            break
        await asyncio.sleep(0.1)
    assert len(pool.pids) == 2
    assert len(before - set(pool.pids)) == 1
    assert set(pool.pids) == decode_children()
    assert len(os.listdir("/proc/self/fd")) == fds  # the lost worker's pipes are closed


async def test_a_worker_killed_from_outside_is_not_blamed_on_the_file(
    pool: DecodePool, tmp_path: Path
) -> None:
    victim = make_geotiff(tmp_path / "killed-scene.tif", width=64, height=64)
    with pytest.raises(DecoderLost, match="stopped from outside \\(SIGKILL\\)") as caught:
        await decode_all(pool, victim)
    assert caught.value.status == 503
    assert caught.value.retryable
    assert caught.value.headers() == {"Retry-After": "1"}
    batches, _ = await decode_all(pool, make_geotiff(tmp_path / "fine.tif", width=64, height=64))
    assert len(batches) == 1


async def test_a_lost_worker_is_logged_with_its_pid_and_how_it_ended(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    async with DecodePool(
        DecodeSettings(workers=1), LIMITS, worker_command=CRASHING_WORKER, tile_size=512
    ) as pool:
        (lost,) = pool.pids

        def replaced() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if "replaced by" in r.getMessage() and r.getMessage().startswith(f"decode worker {lost} ")
            ]

        with caplog.at_level(logging.INFO, logger="gateway.decode"):
            with pytest.raises(DecoderFailed):
                await decode_all(pool, files["segv"])
            for _ in range(100):
                if replaced():
                    break
                await asyncio.sleep(0.1)
        (replacement,) = pool.pids
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"decode worker {lost} lost" in m and "killed by SIGSEGV" in m for m in warnings), warnings
    (line,) = replaced()
    assert line.startswith(f"decode worker {lost} ")
    assert line.endswith(f"replaced by {replacement}")
    assert "SIGSEGV" in line, "the replacement names why its predecessor was retired"


async def test_leaving_a_stream_early_keeps_the_worker(pool: DecodePool, files: dict[str, Path]) -> None:
    before = pool.pids
    async with pool.open(files["masked"]) as session:
        async for _ in session.batches(tile_grid(1100, 700, 512, 128), 1):
            break
    assert pool.pids == before
    batches, _ = await decode_all(pool, files["masked"])
    assert sum(len(b.specs) for b in batches) > 0


async def test_a_planned_stream_starts_with_open_and_matches_the_grid(
    pool: DecodePool, files: dict[str, Path]
) -> None:
    plan = StreamPlan(tile=512, overlap=128, batch_size=4, first_batch=1)
    async with pool.open(files["masked"], plan=plan) as session:
        with pytest.raises(RuntimeError, match="without specs"):
            session.batches(tile_grid(1100, 700, 512, 128))
        batches = [b async for b in session.batches()]
        skipped = session.skipped
    expected, expected_skipped = await decode_all(pool, files["masked"], batch_size=4)
    assert len(batches[0].specs) == 1, "the first batch is the plan's small one"
    assert max(len(b.specs) for b in batches) <= balanced_batch(len(tile_grid(1100, 700, 512, 128)), 4)
    assert [s for b in batches for s in b.specs] == [s for b in expected for s in b.specs]
    assert skipped == expected_skipped
    got = np.concatenate([b.pixels for b in batches])
    np.testing.assert_array_equal(got, np.concatenate([b.pixels for b in expected]))


async def test_a_plan_behind_a_failed_open_is_ignored(pool: DecodePool, files: dict[str, Path]) -> None:
    before = pool.pids
    plan = StreamPlan(tile=512, overlap=128)
    with pytest.raises(UnsupportedMediaType):
        async with pool.open(files["html"], plan=plan):
            pass
    assert pool.pids == before, "the worker survives and stays in step"
    async with pool.open(files["small"], plan=plan) as session:
        assert [len(b.specs) async for b in session.batches()] == [1]


async def test_a_plan_never_consumed_is_drained(pool: DecodePool, files: dict[str, Path]) -> None:
    before = pool.pids
    async with pool.open(files["masked"], plan=StreamPlan(tile=512, overlap=128, batch_size=1)) as session:
        assert session.info.width == 1100
    assert pool.pids == before
    batches, _ = await decode_all(pool, files["small"])
    assert len(batches) == 1


async def test_a_cancelled_request_keeps_its_worker(pool: DecodePool, files: dict[str, Path]) -> None:
    before = pool.pids
    started = asyncio.Event()

    async def consume() -> None:
        async with pool.open(files["masked"]) as session:
            async for _ in session.batches(tile_grid(1100, 700, 512, 128), 1):
                started.set()
                await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.pids == before, "the stream was cancelled through the protocol, not by a kill"
    batches, _ = await decode_all(pool, files["small"])
    assert len(batches) == 1
    assert pool.pids == before
    assert set(pool.pids) == decode_children()


@pytest.mark.parametrize("plan", [None, StreamPlan(tile=512, overlap=128, batch_size=1)])
async def test_a_request_cancelled_with_half_a_frame_read_keeps_its_worker(
    pool: DecodePool, tmp_path: Path, plan: StreamPlan | None
) -> None:
    """Every frame of a ``stutter-`` file arrives in two halves 0.1 s apart: wherever the cancellation
    lands (waiting for a worker, for ``info``, inside a batch frame, between batches), the session
    completes the frame, cancels the stream and closes the file, and the worker stays."""
    path = make_geotiff(tmp_path / "stutter-scene.tif", width=1100, height=700)
    before = pool.pids

    async def consume() -> None:
        async with pool.open(path, plan=plan) as session:
            stream = session.batches() if plan else session.batches(tile_grid(1100, 700, 512, 128), 1)
            async for batch in stream:
                batch.release()

    for delay in (0.0, 0.05, 0.15, 0.25):
        task = asyncio.create_task(consume())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.pids == before
    batches, _ = await decode_all(pool, make_geotiff(tmp_path / "after.tif", width=1100, height=700))
    assert sum(len(b.specs) for b in batches) == len(tile_grid(1100, 700, 512, 128))
    assert pool.pids == before


async def test_time_budget_stops_a_hung_decoder(files: dict[str, Path]) -> None:
    settings = DecodeSettings(workers=1, file_timeout_s=1.0)
    async with DecodePool(settings, LIMITS, worker_command=CRASHING_WORKER, tile_size=512) as pool:
        first = pool.pids
        started = time.monotonic()
        with pytest.raises(DecoderFailed, match="longer than its 1 s budget"):
            await decode_all(pool, files["hang"])
        assert time.monotonic() - started < 10
        batches, _ = await decode_all(pool, files["small"])
        assert len(batches) == 1
        used = first + pool.pids
    assert not any(procfs.alive(pid) for pid in used)


async def test_concurrency_is_bounded_by_the_pool_size(files: dict[str, Path]) -> None:
    async with DecodePool(DecodeSettings(workers=1), LIMITS, tile_size=512) as pool:
        used = pool.pids
        entered = asyncio.Event()

        async def second() -> int:
            async with pool.open(files["small"]) as session:
                entered.set()
                return session.info.width

        async with pool.open(files["masked"]):
            waiting = asyncio.create_task(second())
            await asyncio.sleep(0.5)
            assert not entered.is_set()  # queued behind the first file
        assert await asyncio.wait_for(waiting, 30) == 300
    assert not any(procfs.alive(pid) for pid in used)


async def test_zero_copy_batches_lie_in_shared_memory_and_hold_the_worker_back(
    pool: DecodePool, tmp_path: Path
) -> None:
    path = make_geotiff(tmp_path / "row.tif", width=2048, height=512)
    specs = tile_grid(2048, 512, 512, 128)
    with open_raster(path, LIMITS) as reader:
        expected = [tile.pixels for tile in reader.tiles(specs)]
    assert len(specs) > pool.slots_per_worker
    async with pool.open(path) as session:
        stream = session.batches(specs, 1, zero_copy=True)
        held = [await anext(stream) for _ in range(pool.slots_per_worker)]
        for batch in held:
            assert batch.shared is not None
            assert batch.lease is not None
            np.testing.assert_array_equal(batch.pixels[0], expected[specs.index(batch.specs[0])])
        assert len({b.shared.offset for b in held if b.shared}) == pool.slots_per_worker

        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "a worker holding no free slot must wait"
        reused = held[0].shared
        held[0].release()
        following = await asyncio.wait_for(waiting, 10)
        assert following.shared == reused
        np.testing.assert_array_equal(following.pixels[0], expected[specs.index(following.specs[0])])
        for batch in held[1:]:
            batch.release()
        following.release()
        rest = [b async for b in stream]
        for batch in rest:
            batch.release()
    assert sum(len(b.specs) for b in [*held, following, *rest]) == len(specs)
    # The worker is healthy and holds its slots again: a copying stream on the same pool works.
    batches, _ = await decode_all(pool, path, batch_size=1)
    assert len(batches) == len(specs)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


class Holders:
    """Sessions that enter in a given lane and stay open until told to leave; records who entered."""

    def __init__(self, pool: DecodePool, path: Path) -> None:
        self.pool = pool
        self.path = path
        self.entered: list[str] = []
        self.leave: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, priority: Priority) -> None:
        self.leave[name] = asyncio.Event()

        async def hold() -> None:
            async with self.pool.open(self.path, priority=priority):
                self.entered.append(name)
                await self.leave[name].wait()

        self.tasks[name] = asyncio.create_task(hold())

    async def finish(self, name: str) -> None:
        self.leave[name].set()
        await asyncio.wait_for(self.tasks[name], 10)


async def test_batch_files_never_take_the_worker_reserved_for_online_ones(files: dict[str, Path]) -> None:
    settings = DecodeSettings(workers=2, reserved_online_workers=1)
    async with DecodePool(settings, LIMITS, tile_size=512) as pool:
        holders = Holders(pool, files["small"])
        holders.start("batch 1", Priority.BATCH)
        await until(lambda: holders.entered == ["batch 1"])
        holders.start("batch 2", Priority.BATCH)
        await asyncio.sleep(0.5)
        assert holders.entered == ["batch 1"], "the idle worker is kept for online requests"

        holders.start("online", Priority.ONLINE)
        await until(lambda: "online" in holders.entered, timeout_s=5)
        assert pool.leased == {Priority.ONLINE: 1, Priority.BATCH: 1}

        await holders.finish("online")
        await asyncio.sleep(0.3)
        assert "batch 2" not in holders.entered, "batch files hold one worker at most"
        await holders.finish("batch 1")
        await until(lambda: "batch 2" in holders.entered)
        await holders.finish("batch 2")
        assert holders.entered == ["batch 1", "online", "batch 2"]


async def test_an_online_file_queued_after_a_batch_file_gets_the_next_worker(files: dict[str, Path]) -> None:
    settings = DecodeSettings(workers=2, reserved_online_workers=1)
    async with DecodePool(settings, LIMITS, tile_size=512) as pool:
        holders = Holders(pool, files["small"])
        holders.start("online 1", Priority.ONLINE)
        holders.start("online 2", Priority.ONLINE)
        await until(lambda: len(holders.entered) == 2)
        holders.start("batch", Priority.BATCH)
        await asyncio.sleep(0.2)
        holders.start("online 3", Priority.ONLINE)
        await asyncio.sleep(0.2)

        await holders.finish("online 1")
        await until(lambda: len(holders.entered) == 3)
        assert holders.entered[2] == "online 3"
        await holders.finish("online 2")
        await until(lambda: len(holders.entered) == 4)
        assert holders.entered[3] == "batch"
        await holders.finish("online 3")
        await holders.finish("batch")


async def test_batch_files_keep_one_worker_when_every_worker_is_reserved(files: dict[str, Path]) -> None:
    settings = DecodeSettings(workers=1, reserved_online_workers=4)
    async with (
        DecodePool(settings, LIMITS, tile_size=512) as pool,
        asyncio.timeout(10),
        pool.open(files["small"], priority=Priority.BATCH) as session,
    ):
        assert session.info.width == 300


async def test_workers_cut_and_share_tiles_of_the_models_side(files: dict[str, Path]) -> None:
    """A model with 256 px tiles: the slots in /dev/shm, the batches and masks are 256 px, and equal to
    what the reader cuts in process."""
    async with DecodePool(DecodeSettings(workers=1), LIMITS, tile_size=256, slot_tiles=4) as small:
        plan = StreamPlan(tile=256, overlap=64, batch_size=4)
        async with small.open(files["masked"], plan=plan) as session:
            batches = [b async for b in session.batches(zero_copy=True)]
            skipped = session.skipped
        with open_raster(files["masked"], LIMITS) as reader:
            expected = list(reader.tiles(tile_grid(1100, 700, 256, 64)))
            assert skipped == reader.skipped > 0
        assert {b.pixels.shape[1:] for b in batches} == {(3, 256, 256)}
        assert all(b.shared is not None and b.shared.nbytes == len(b.specs) * 3 * 256 * 256 for b in batches)
        got = [
            (s, b.pixels[i].copy(), None if b.valid is None else b.valid[i])
            for b in batches
            for i, s in enumerate(b.specs)
        ]
        for batch in batches:
            batch.release()
        assert [g[0] for g in got] == [t.spec for t in expected]
        for (_, pixels, valid), tile in zip(got, expected, strict=True):
            np.testing.assert_array_equal(pixels, tile.pixels)
            if tile.valid is None:
                assert valid is None or valid.all()
            else:
                assert valid is not None
                np.testing.assert_array_equal(valid, tile.valid)
        with pytest.raises(ValueError, match="cuts 256 px tiles"):
            small.open(files["masked"], plan=StreamPlan(tile=512, overlap=128))
        async with small.open(files["masked"]) as session:
            with pytest.raises(ValueError, match="256 px tiles only"):
                session.batches(tile_grid(1100, 700, 512, 128))
