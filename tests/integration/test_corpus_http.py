"""Every file of ``../shared/corpus`` through ``/v1/predict`` on the real stack: a 200 or a clear 4xx.

Zero 5xx, zero crashes, zero hangs, and the server answers a normal request afterwards. The table of
outcomes is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from export.synth import render_scene, write_geotiff
from gateway.app import create_app
from gateway.settings import DecodeSettings, Settings, TritonSettings
from gateway.triton.launcher import EmbeddedTriton
from tests.integration.server import serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_FILE_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def corpus_gateway(
    triton_server: EmbeddedTriton, triton_settings: TritonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, list[int]]]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("corpus-gateway"),
        triton=triton_settings.model_copy(update={"url": triton_server.grpc_url}),
        decode=DecodeSettings(workers=2, file_timeout_s=60, memory_limit_bytes=2 * 1024**3),
    )
    app = create_app(settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=PER_FILE_TIMEOUT_S) as client:
        yield client, []


def corpus_files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*") if p.is_file() and p.name not in {"README.md", "MANIFEST.tsv"})


def test_every_corpus_file_gets_a_200_or_a_clear_4xx(
    corpus_dir: Path, corpus_gateway: tuple[httpx.Client, list[int]], tmp_path: Path
) -> None:
    client, _ = corpus_gateway
    files = corpus_files(corpus_dir)
    assert len(files) > 50
    rows: list[tuple[str, int, str, float]] = []
    failures: list[str] = []
    for path in files:
        started = time.monotonic()
        with open(path, "rb") as f:
            response = client.post("/v1/predict", files={"file": (path.name, f, "application/octet-stream")})
        elapsed = time.monotonic() - started
        status = response.status_code
        if status == 200:
            body = response.json()
            outcome = f"{body['image']['width']}x{body['image']['height']}, {len(body['detections'])} det"
        else:
            outcome = "?"
            if response.headers.get("content-type") != "application/problem+json":
                failures.append(f"{path.name}: {status} without problem+json")
            else:
                problem = response.json()
                outcome = f"{problem['type'].rsplit('/', 1)[-1]}: {problem['detail'][:90]}"
                if not problem.get("detail"):
                    failures.append(f"{path.name}: problem without a reason")
            if not 400 <= status < 500:
                failures.append(f"{path.name}: {status} {outcome}")
        rows.append((str(path.relative_to(corpus_dir)), status, outcome, elapsed))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'file':<{width}}  status  seconds  outcome")
    for name, status, outcome, elapsed in rows:
        print(f"{name:<{width}}  {status:>6}  {elapsed:7.2f}  {outcome}")
    print("summary:", dict(Counter(r[1] for r in rows)))
    assert not failures, "\n".join(failures)
    assert client.get("/healthz").status_code == 200

    scene = write_geotiff(render_scene(99, size=600), tmp_path / "after.tif")
    with open(scene, "rb") as f:
        after = client.post("/v1/predict", files={"file": ("after.tif", f, "image/tiff")})
    assert after.status_code == 200, "the server still answers a normal request after the sweep"
