"""Shared-memory tile regions: created at full size or not at all, leases that always give slots back,
and regions of a killed gateway removed by the next one."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from gateway.decode.arena import (
    SHM_DIR,
    SharedMemoryUnavailable,
    TileRegion,
    region_name,
    sweep_stale_regions,
)


@pytest.fixture
def given() -> list[int]:
    """The slots handed back to the (imaginary) worker, in order."""
    return []


@pytest.fixture
def region(given: list[int]) -> Iterator[TileRegion]:
    made = TileRegion(region_name(secrets.token_hex(4), 0), slots=3, slot_tiles=2, tile_size=512)
    made.give_back = given.extend
    yield made
    made.close()
    assert not made.path.exists()


def test_slots_are_views_of_one_file_that_a_worker_maps_too(region: TileRegion) -> None:
    assert region.path.stat().st_size == 3 * 2 * 3 * 512 * 512
    region.pixels(2, 2)[1, 0, 5, 7] = 42
    other = TileRegion(region.name, 3, 2, create=False, tile_size=512)
    try:
        assert other.pixels(2, 2)[1, 0, 5, 7] == 42
        shared = region.shared(2, 1)
        assert (shared.key, shared.offset, shared.nbytes) == (
            f"/{region.name}",
            2 * region.slot_bytes,
            786432,
        )
    finally:
        other.close()
    assert region.path.exists(), "a worker closing its mapping leaves the region in place"


def test_a_slot_outside_the_region_is_refused(region: TileRegion) -> None:
    with pytest.raises(ValueError, match="outside region"):
        region.pixels(3, 1)
    with pytest.raises(ValueError, match="outside region"):
        region.pixels(0, 3)


def test_a_region_of_the_wrong_size_is_not_mapped(region: TileRegion) -> None:
    with pytest.raises(SharedMemoryUnavailable):
        TileRegion(region.name, 4, 2, create=False, tile_size=512)


def test_a_full_dev_shm_fails_clearly_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs reports ENOSPC here (reserving more than /dev/shm holds for real could wake the OOM killer
    on a machine whose /dev/shm is as large as its memory, so the refusal is simulated)."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    name = region_name(secrets.token_hex(4), 0)
    with pytest.raises(SharedMemoryUnavailable, match="--shm-size"):
        TileRegion(name, 4, 8, tile_size=512)
    assert not (SHM_DIR / name).exists()


def test_a_lease_gives_its_slot_back_once(region: TileRegion, given: list[int]) -> None:
    lease = region.lease(1)
    assert region.free_slots() == [0, 2]
    lease.release()
    lease.release()
    assert given == [1]
    assert region.free_slots() == [0, 1, 2]


def test_a_forgotten_lease_gives_its_slot_back_when_collected(region: TileRegion, given: list[int]) -> None:
    region.lease(0)
    gc.collect()
    assert given == [0]
    assert region.leased == set()


async def test_a_quarantined_slot_comes_back_after_the_delay(region: TileRegion, given: list[int]) -> None:
    lease = region.lease(2)
    lease.quarantine(0.05)
    lease.release()  # a late release does not shorten the quarantine
    assert region.free_slots() == [0, 1]
    assert given == []
    await asyncio.sleep(0.1)
    assert given == [2]
    assert region.free_slots() == [0, 1, 2]


def test_regions_of_a_dead_process_are_swept_and_live_ones_kept(region: TileRegion) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = SHM_DIR / f"palm_tiles_{int(dead.stdout)}_deadbeef_0"
    stale.write_bytes(np.zeros(16, np.uint8).tobytes())
    assert sweep_stale_regions() >= 1
    assert not stale.exists()
    assert region.path.exists()
