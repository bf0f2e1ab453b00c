"""``POST /v1/predict`` wiring in-process: real app, real decode workers, a scripted inference backend.

The real Triton path is covered by tests/integration; here the backend is scripted so that the test can
see what the route hands the predictor: the image's sha256 is computed only for ``format=coco``, the one
format that reports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from gateway.app import create_app
from gateway.decode import DecodePool
from gateway.pipeline.coco import ImageResult
from gateway.predictor import PredictOptions, Predictor
from gateway.settings import DecodeSettings, Settings

K = 16


class OneBoxBackend:
    """Answers every tile with one palm box at (100, 100)-(120, 120), score 0.9."""

    async def infer(self, tiles: npt.NDArray[np.uint8], **transport: object) -> npt.NDArray[np.float32]:
        out = np.zeros((tiles.shape[0], K, 6), np.float32)
        out[:, 0] = [100, 100, 120, 120, 0.9, 1]
        return out

    async def model_ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, list[str | None]]]:
    """A client of the app, and the ``sha256`` argument of every ``predict_file`` call, in order."""
    settings = Settings(data_dir=tmp_path / "data", decode=DecodeSettings(workers=1, file_timeout_s=60))
    seen: list[str | None] = []
    async with DecodePool(settings.decode, settings.limits) as pool:
        app = create_app(settings, inference=OneBoxBackend(), decode=pool)
        async with app.router.lifespan_context(app):
            predictor: Predictor = app.state.services.predictor
            original = predictor.predict_file

            async def recording(
                path: Path, file_name: str, options: PredictOptions, **kw: Any
            ) -> ImageResult:
                seen.append(kw.get("sha256"))
                return await original(path, file_name, options, **kw)

            predictor.predict_file = recording  # type: ignore[method-assign]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
                yield http, seen


async def test_coco_reports_the_uploads_sha256_and_json_does_not_hash(
    client: tuple[httpx.AsyncClient, list[str | None]], geotiff: Callable[..., Path]
) -> None:
    http, seen = client
    path = geotiff(width=256, height=256)
    content = path.read_bytes()
    files = {"file": ("scene.tif", content, "image/tiff")}

    coco = await http.post("/v1/predict", params={"format": "coco"}, files=files)
    assert coco.status_code == 200, coco.text
    (image,) = coco.json()["images"]
    assert image["sha256"] == hashlib.sha256(content).hexdigest()
    assert [a["bbox"] for a in coco.json()["annotations"]] == [[100.0, 100.0, 20.0, 20.0]]

    for fmt in ("json", "geojson"):
        response = await http.post("/v1/predict", params={"format": fmt}, files=files)
        assert response.status_code == 200, response.text
    body = (await http.post("/v1/predict", files=files)).json()
    assert [d["bbox"] for d in body["detections"]] == [[100.0, 100.0, 20.0, 20.0]]
    assert body["detections"][0]["geometry"]["type"] == "Polygon"
    assert seen == [hashlib.sha256(content).hexdigest(), None, None, None]
