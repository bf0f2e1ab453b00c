"""Atomic result files: whole or absent, with their digest, and a full disk reported as 507."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from gateway.errors import InsufficientStorage
from gateway.pipeline.atomic import atomic_write
from gateway.pipeline.render import ImageRecord, coco_info, write_coco
from gateway.pipeline.result import ModelInfo, TilingInfo
from tests.fakes import FAKE_CONTRACT

MODEL = ModelInfo("palm", "1.1.0", "ab" * 32, contract=FAKE_CONTRACT)
TILING = TilingInfo(512, 128, 0.5, 0.3)
MIB = 1 << 20


def test_the_file_appears_whole_with_its_digest_and_size(tmp_path: Path) -> None:
    target = tmp_path / "results.coco.json"
    target.write_bytes(b"the previous results")
    with atomic_write(target) as out:
        write_coco(
            out,
            info=coco_info(MODEL, TILING, created=datetime(2024, 5, 1, tzinfo=UTC)),
            categories=MODEL.categories,
            images=[ImageRecord(1, "a.tif", 10, 10, None, None, None)],
            detections=[],
        )
        assert target.read_bytes() == b"the previous results"
    content = target.read_bytes()
    assert out.sha256 == hashlib.sha256(content).hexdigest()
    assert out.size == len(content)
    assert COCO(str(target)).getImgIds() == [1]
    assert os.listdir(tmp_path) == ["results.coco.json"]


def write_then_fail(target: Path) -> None:
    with atomic_write(target) as out:
        out.write(b"x" * (3 * MIB))  # more than the buffer: part of it is on disk
        raise RuntimeError("job cancelled")


def test_a_failure_mid_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "results.geojson"
    with pytest.raises(RuntimeError, match="job cancelled"):
        write_then_fail(target)
    assert os.listdir(tmp_path) == []

    target.write_bytes(b"the previous results")
    with pytest.raises(RuntimeError, match="job cancelled"):
        write_then_fail(target)
    assert os.listdir(tmp_path) == ["results.geojson"]
    assert target.read_bytes() == b"the previous results"


def test_a_spent_quota_when_syncing_is_insufficient_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def quota_spent(fd: int) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", quota_spent)
    target = tmp_path / "results.coco.json"
    with pytest.raises(InsufficientStorage, match="quota") as caught, atomic_write(target) as out:
        out.write(b"{}")
    assert caught.value.status == 507
    assert caught.value.slug == "insufficient-storage"
    assert caught.value.retryable
    assert os.listdir(tmp_path) == []


FILL_A_SMALL_DISK = """
import json, os, sys
from pathlib import Path
from gateway.errors import InsufficientStorage
from gateway.pipeline.atomic import atomic_write

disk = Path(sys.argv[1])
try:
    with atomic_write(disk / "results.coco.json") as out:
        for _ in range(64):
            out.write(b"x" * 65536)
    outcome = {"raised": None}
except InsufficientStorage as exc:
    outcome = {"raised": exc.slug, "status": exc.status, "detail": exc.detail}
outcome["left"] = sorted(os.listdir(disk))
print(json.dumps(outcome))
"""


def test_a_full_disk_is_insufficient_storage_and_leaves_nothing(tmp_path: Path) -> None:
    """On a real 1 MiB tmpfs, mounted in a user and mount namespace of a child process."""
    unshare = shutil.which("unshare")
    probe = [unshare, "--user", "--map-root-user", "--mount", "true"] if unshare else None
    if probe is None or subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
        pytest.skip("needs unshare with unprivileged user and mount namespaces, to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1"'
    completed = subprocess.run(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            disk,
            sys.executable,
            FILL_A_SMALL_DISK,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout)
    assert outcome == {
        "raised": "insufficient-storage",
        "status": 507,
        "detail": "Could not write results.coco.json: the disk is full.",
        "left": [],
    }
