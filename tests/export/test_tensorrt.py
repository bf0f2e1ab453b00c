"""export.tensorrt says clearly when it cannot build (no TensorRT / CUDA here)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from export.tensorrt import EXIT_SKIPPED, main


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None and shutil.which("nvidia-smi") is not None,
    reason="TensorRT and a GPU are present: the build would run",
)
def test_skips_with_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--out", f"{tmp_path}/model.plan"]) == EXIT_SKIPPED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("export.tensorrt: skipped")
