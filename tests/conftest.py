"""Shared fixtures: the seeded GeoTIFF factory and the shared real-world corpus."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.factories import make_geotiff

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"

GeoTiffFactory = Callable[..., Path]


@pytest.fixture
def geotiff(tmp_path: Path) -> GeoTiffFactory:
    """``geotiff(width=..., bands=..., dtype=..., crs=..., nodata=..., ...)`` → path of a fresh GeoTIFF.

    Takes every keyword of :func:`tests.factories.make_geotiff`; files land in the test's tmp_path.
    """
    counter = itertools.count()

    def make(name: str | None = None, **kwargs: Any) -> Path:
        return make_geotiff(tmp_path / (name or f"fixture-{next(counter)}.tif"), **kwargs)

    return make


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """``../shared/corpus`` next to the repository; tests using it skip when it is absent."""
    if not (CORPUS_DIR / "MANIFEST.tsv").is_file():
        pytest.skip(f"real-world corpus not found at {CORPUS_DIR} (it lives outside the repository)")
    return CORPUS_DIR
