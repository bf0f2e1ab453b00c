"""``POST /v1/predict`` in-process: the real app and decode workers around the fake inference backend.

The real Triton path is covered by tests/integration; here every tile gets one known box, so the test
can check each format's body exactly and the json body against the documented response schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from export.synth import PALM_CATEGORIES
from gateway.admission import EMBEDDED_BUSY_UPLOAD_BYTES_PER_S, Admission
from gateway.api.schemas import PredictResponse
from gateway.app import create_app, upload_pacer
from gateway.decode import DecodePool
from gateway.pipeline.result import ModelInfo
from gateway.predictor import Predictor
from gateway.settings import DecodeSettings, LimitSettings, Settings, TritonSettings
from tests.fakes import FAKE_CONTRACT, FakeInference, fixed_box


@asynccontextmanager
async def serving(
    settings: Settings, inference: FakeInference
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app, decode worker included, around ``inference``, and a client talking to it in process."""
    async with DecodePool(settings.decode, settings.limits, tile_size=512) as pool:
        predictor = Predictor(
            pool,
            inference,
            ModelInfo("palm", "1", "ab" * 32, categories=PALM_CATEGORIES, contract=FAKE_CONTRACT),
            tiling=settings.tiling,
            triton=settings.triton,
        )
        app = create_app(settings, predictor=predictor)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield app, client


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path / "data", decode=DecodeSettings(workers=1, file_timeout_s=60))
    async with serving(settings, FakeInference(fixed_box(100, 100, 120, 120))) as (_, client):
        yield client


async def test_each_format_reports_the_box(http: httpx.AsyncClient, geotiff: Callable[..., Path]) -> None:
    path = geotiff(width=256, height=256)
    content = path.read_bytes()
    files = {"file": ("scene.tif", content, "image/tiff")}

    coco = await http.post("/v1/predict", params={"format": "coco"}, files=files)
    assert coco.status_code == 200, coco.text
    (image,) = coco.json()["images"]
    assert image["sha256"] == hashlib.sha256(content).hexdigest()
    assert [a["bbox"] for a in coco.json()["annotations"]] == [[100.0, 100.0, 20.0, 20.0]]

    geojson = await http.post("/v1/predict", params={"format": "geojson"}, files=files)
    assert geojson.status_code == 200, geojson.text
    assert geojson.headers["content-type"] == "application/geo+json"
    (feature,) = geojson.json()["features"]
    assert feature["properties"]["bbox_px"] == [100.0, 100.0, 20.0, 20.0]

    response = await http.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    body = PredictResponse.model_validate(response.json(), strict=True)
    assert [d.bbox for d in body.detections] == [[100.0, 100.0, 20.0, 20.0]]
    assert body.detections[0].category == "palm_tree"
    assert body.detections[0].geometry is not None
    assert body.detections[0].geometry["type"] == "Polygon"
    assert body.model.sha256 == "ab" * 32
    assert set(response.json()) == set(PredictResponse.model_fields)


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({"fromat": "geojson"}, 422, "unknown query parameter 'fromat'; /v1/predict takes: bands, format,"),
        ({"score_threshold": "nan"}, 422, "score_threshold must be a number from 0 to 1, got nan"),
        ({"score_threshold": "5"}, 422, "score_threshold must be a number from 0 to 1, got 5.0"),
        ({"bands": "1_0"}, 422, "bands must be comma-separated band numbers"),
    ],
)
async def test_parameter_errors_name_the_parameter(
    http: httpx.AsyncClient, geotiff: Callable[..., Path], params: dict[str, str], status: int, detail: str
) -> None:
    files = {"file": ("scene.tif", geotiff(width=64, height=64).read_bytes(), "image/tiff")}
    response = await http.post("/v1/predict", params=params, files=files)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"]


async def test_the_image_in_a_wrongly_named_part_or_twice_is_explained(
    http: httpx.AsyncClient, geotiff: Callable[..., Path]
) -> None:
    content = geotiff(width=600, height=600).read_bytes()
    assert len(content) > 65536
    wrong = await http.post("/v1/predict", files={"image": ("scene.tif", content, "image/tiff")})
    assert wrong.status_code == 400
    assert "no part named 'file'; it sends a file in a part named 'image'" in wrong.json()["detail"]
    twice = await http.post(
        "/v1/predict",
        files=[("file", ("a.tif", content, "image/tiff")), ("file", ("b.tif", content, "image/tiff"))],
    )
    assert twice.status_code == 400
    assert "more than one part named 'file'" in twice.json()["detail"]


async def test_a_large_upload_is_paced_while_another_prediction_is_in_progress(
    tmp_path: Path, geotiff: Callable[..., Path]
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        decode=DecodeSettings(workers=1, file_timeout_s=60),
        limits=LimitSettings(busy_upload_bytes_per_s=2 * 1024**2),
    )
    not_an_image = {"file": ("noise.tif", os.urandom(4 * 1024**2), "image/tiff")}  # refused once in
    tile = {"file": ("scene.tif", geotiff(width=256, height=256).read_bytes(), "image/tiff")}
    slow = FakeInference(fixed_box(100, 100, 120, 120), delay_s=2.0)
    async with serving(settings, slow) as (app, http):

        async def upload_seconds() -> float:
            started = time.perf_counter()
            assert (await http.post("/v1/predict", files=not_an_image)).status_code == 415
            return time.perf_counter() - started

        idle = await upload_seconds()
        predicting = asyncio.ensure_future(http.post("/v1/predict", files=tile))
        while not app.state.services.admission.active:  # the tile is in and predicting
            await asyncio.sleep(0.01)
        busy = await upload_seconds()
        assert (await predicting).status_code == 200
    # 2 MiB past the free ones at 2 MiB/s: about a second more.
    assert busy > idle + 0.6, (idle, busy)


def test_uploads_are_paced_by_default_only_beside_the_embedded_triton() -> None:
    admission = Admission(1)
    embedded = upload_pacer(Settings(triton=TritonSettings(url=None), limits=LimitSettings()), admission)
    assert embedded is not None
    assert embedded.bytes_per_s == EMBEDDED_BUSY_UPLOAD_BYTES_PER_S
    external = Settings(triton=TritonSettings(url="127.0.0.1:8001"), limits=LimitSettings())
    assert upload_pacer(external, admission) is None
    assert upload_pacer(Settings(limits=LimitSettings(busy_upload_bytes_per_s=0)), admission) is None


def test_a_pace_that_would_time_out_honest_uploads_is_refused() -> None:
    with pytest.raises(ValueError, match="busy_upload_bytes_per_s must be 0 or at least"):
        Settings(limits=LimitSettings(busy_upload_bytes_per_s=100_000))
    assert Settings(limits=LimitSettings(busy_upload_bytes_per_s=0)).limits.busy_upload_bytes_per_s == 0
