"""``/v1/jobs`` over real HTTP: the app, its decode workers and job worker, around the fake inference
backend (the real Triton runs in tests/jobs/test_jobs_service.py); on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pycocotools.coco import COCO

from gateway.app import create_app
from gateway.pipeline.geo import Georef, pixel_to_lonlat
from gateway.settings import DecodeSettings, JobSettings, Settings
from tests.factories import make_geotiff, north_up, read_png
from tests.fakes import FakeInference, fixed_box
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[httpx.Client]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        decode=DecodeSettings(workers=2, file_timeout_s=60),
        jobs=JobSettings(lease_s=5, poll_s=0.2, files_in_flight=2),
    )
    app = create_app(settings, inference=FakeInference(fixed_box(100, 100, 120, 120)))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("scenes")
    return [make_geotiff(root / f"s{i}.tif", width=600, height=500, seed=i) for i in range(3)]


def upload(paths: list[Path], names: list[str] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    names = names or [p.name for p in paths]
    return [("files", (name, p.read_bytes(), "image/tiff")) for name, p in zip(names, paths, strict=True)]


def wait_done(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") and job["results"]["ready"]:
            return dict(job)
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end: {job}")


def test_a_job_with_good_and_bad_files_succeeds_listing_the_bad(
    api: httpx.Client, scenes: list[Path], tmp_path: Path
) -> None:
    html = tmp_path / "page.tif"
    html.write_bytes(b"<html><body>502 Bad Gateway</body></html>")
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    files = upload(
        [*scenes, html, empty], ["north/a.tif", "north/b.tif", "south/a.tif", "page.tif", "empty.tif"]
    )
    created = api.post("/v1/jobs", files=files, data={"name": "coast", "score_threshold": "0.5"})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.headers["location"] == f"/v1/jobs/{job_id}"
    assert created.json()["progress"]["files_total"] == 5
    assert [e["file"] for e in created.json()["errors"]] == ["page.tif", "empty.tif"]

    job = wait_done(api, job_id)
    assert job["status"] == "succeeded"
    assert (job["progress"]["files_done"], job["progress"]["files_failed"], job["progress"]["percent"]) == (
        3,
        2,
        100.0,
    )
    assert job["errors"][0]["type"].endswith("/unsupported-media-type")
    assert job["parameters"]["score_threshold"] == 0.5

    coco_response = api.get(f"/v1/jobs/{job_id}/results")
    assert coco_response.status_code == 200
    assert coco_response.headers["etag"] == f'"{job["results"]["sha256"]}"'
    assert hashlib.sha256(coco_response.content).hexdigest() == job["results"]["sha256"]
    path = tmp_path / "coco.json"
    path.write_bytes(coco_response.content)
    coco = COCO(str(path))
    images = coco.loadImgs(coco.getImgIds())
    assert [(i["id"], i["file_name"]) for i in images] == [
        (1, "north/a.tif"),
        (2, "north/b.tif"),
        (3, "south/a.tif"),
    ]
    assert images[0]["sha256"] == hashlib.sha256(scenes[0].read_bytes()).hexdigest()
    annotations = coco.loadAnns(coco.getAnnIds())
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    assert len(annotations) == job["progress"]["detections"] == job["results"]["annotations"]
    assert coco.loadRes(coco.dataset["annotations"]).getAnnIds()

    unchanged = api.get(
        f"/v1/jobs/{job_id}/results", headers={"If-None-Match": coco_response.headers["etag"]}
    )
    assert unchanged.status_code == 304
    part = api.get(f"/v1/jobs/{job_id}/results", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206
    assert part.content == coco_response.content[:10]

    geojson = api.get(f"/v1/jobs/{job_id}/results.geojson")
    assert geojson.headers["content-type"] == "application/geo+json"
    collection = geojson.json()
    assert len(collection["features"]) == len(annotations)
    assert {f["properties"]["file_name"] for f in collection["features"]} == {
        "north/a.tif",
        "north/b.tif",
        "south/a.tif",
    }

    listing = api.get(f"/v1/jobs/{job_id}/files", params={"limit": 2}).json()
    assert [f["name"] for f in listing["files"]] == ["north/a.tif", "north/b.tif"]
    rest = api.get(f"/v1/jobs/{job_id}/files", params={"cursor": listing["next_cursor"]}).json()
    assert [f["status"] for f in rest["files"]] == ["succeeded", "failed", "failed"]
    errors = api.get(f"/v1/jobs/{job_id}/errors").json()["files"]
    assert [f["name"] for f in errors] == ["page.tif", "empty.tif"]


def test_results_wait_for_the_end_and_every_error_is_problem_json(
    api: httpx.Client, scenes: list[Path]
) -> None:
    staged = api.post("/v1/jobs", json={"name": "staged"})
    assert staged.status_code == 201, staged.text
    job_id = staged.json()["id"]
    assert staged.json()["status"] == "created"
    early = api.get(f"/v1/jobs/{job_id}/results")
    assert (early.status_code, early.headers["content-type"]) == (409, "application/problem+json")
    assert api.post(f"/v1/jobs/{job_id}/start").status_code == 422  # no files yet
    assert api.post(f"/v1/jobs/{job_id}/files", files=upload(scenes[:2])).status_code == 200
    duplicate = api.post(f"/v1/jobs/{job_id}/files", files=upload(scenes[:1]))
    assert duplicate.status_code == 409
    assert "already has a file named 's0.tif'" in duplicate.json()["detail"]
    assert api.post(f"/v1/jobs/{job_id}/files", files=upload(scenes[2:])).status_code == 200
    assert api.post(f"/v1/jobs/{job_id}/start").status_code == 202
    assert api.post(f"/v1/jobs/{job_id}/start").status_code == 409
    assert wait_done(api, job_id)["progress"]["files_done"] == 3
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert api.get(f"/v1/jobs/{job_id}").status_code == 404

    for response in (
        api.post("/v1/jobs", files=upload(scenes[:1]), data={"priority": "urgent"}),
        api.post("/v1/jobs", files=upload(scenes[:1]), data={"score_threshold": "nan"}),
        api.post("/v1/jobs", files=upload(scenes[:1]), data={"colour": "red"}),
        api.post("/v1/jobs", files=upload(scenes[:2], ["same.tif", "same.tif"])),
        api.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}),
        api.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}),
        api.get("/v1/jobs", params={"status": "sleeping"}),
        api.get("/v1/jobs/nope"),
    ):
        assert response.status_code in (400, 404, 409, 415, 422), response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"]


def test_an_idempotent_retry_returns_the_same_job(api: httpx.Client, scenes: list[Path]) -> None:
    headers = {"Idempotency-Key": "batch-2026-11-29"}
    first = api.post("/v1/jobs", files=upload(scenes[:2]), headers=headers)
    again = api.post("/v1/jobs", files=upload(scenes[:2]), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/jobs", files=upload(scenes[1:]), headers=headers)
    assert other.status_code == 409
    listing = api.get("/v1/jobs").json()
    assert [j["id"] for j in listing["jobs"]] == [first.json()["id"]]


def test_jobs_list_newest_first_with_a_cursor_and_a_status_filter(
    api: httpx.Client, scenes: list[Path]
) -> None:
    ids = [api.post("/v1/jobs", json={"name": f"j{i}"}).json()["id"] for i in range(5)]
    page = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    page2 = api.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in page2["jobs"]] == ids[::-1][2:4]
    assert {j["status"] for j in api.get("/v1/jobs", params={"status": "created"}).json()["jobs"]} == {
        "created"
    }
    assert api.get("/v1/jobs", params={"status": "running"}).json()["jobs"] == []


def sse_events(
    client: httpx.Client, job_id: str, last_id: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and "event" in current:
                events.append(current)
                current = {}
                if limit is not None and len(events) >= limit:
                    break
    return events


def test_events_stream_to_the_final_status_and_resume_without_gaps(
    api: httpx.Client, scenes: list[Path]
) -> None:
    job_id = api.post("/v1/jobs", files=upload(scenes)).json()["id"]
    head = sse_events(api, job_id, limit=2)
    rest = sse_events(api, job_id, last_id=head[-1]["id"])
    events = head + rest
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "status"
    assert events[-1]["data"] == {"status": "succeeded", "results": True}
    assert sorted(e["data"]["file"] for e in events if e["event"] == "file") == ["s0.tif", "s1.tif", "s2.tif"]
    assert sse_events(api, job_id, last_id=events[-2]["id"]) == events[-1:]


def test_a_database_gone_away_is_a_503_not_a_500(tmp_path: Path, postgres_server: Any) -> None:
    name = "t_gone_away"
    postgres_server.psql(f"CREATE DATABASE {name};")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=str(postgres_server.get_uri(name)).replace("postgresql://", "postgresql+psycopg://", 1),
        decode=DecodeSettings(workers=1),
        jobs=JobSettings(poll_s=0.2),
    )
    app = create_app(settings, inference=FakeInference(fixed_box(1, 1, 2, 2)))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/jobs").status_code == 200
        postgres_server.psql(f"DROP DATABASE {name} WITH (FORCE);")
        response = client.get("/v1/jobs")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/database-unavailable")
        assert "Retry-After" in response.headers
        assert client.get("/healthz").status_code == 200


def test_uploads_of_finished_jobs_are_deleted_after_retention_and_results_stay(
    tmp_path: Path, scenes: list[Path]
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        decode=DecodeSettings(workers=1),
        jobs=JobSettings(poll_s=0.1, maintenance_s=0.2, retention_hours=0.5 / 3600),
    )
    app = create_app(settings, inference=FakeInference(fixed_box(100, 100, 120, 120)))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        job_id = client.post("/v1/jobs", files=upload(scenes[:2])).json()["id"]
        uploads = tmp_path / "data" / "storage" / "jobs" / job_id / "uploads"
        assert len(list(uploads.iterdir())) == 2
        wait_done(client, job_id)
        deadline = time.monotonic() + 10
        while uploads.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not uploads.exists()
        assert client.get(f"/v1/jobs/{job_id}/results").status_code == 200


def test_each_file_has_a_quicklook_and_a_footprint_for_the_map(api: httpx.Client, tmp_path: Path) -> None:
    georeferenced = make_geotiff(tmp_path / "geo.tif", width=3000, height=1000, seed=4)
    pixel_only = make_geotiff(tmp_path / "plain.tif", width=200, height=100, crs=None, seed=5)
    job_id = api.post("/v1/jobs", files=upload([georeferenced, pixel_only])).json()["id"]
    wait_done(api, job_id)
    first, second = api.get(f"/v1/jobs/{job_id}/files").json()["files"]

    (west, north), (east, _), (_, south), _ = first["footprint"]
    lon, lat = pixel_to_lonlat(Georef("EPSG:32633", tuple(north_up())[:6]), 0, 0)  # type: ignore[arg-type]
    assert (west, north) == pytest.approx((lon, lat))
    assert east > west
    assert north > south
    assert second["footprint"] is None

    for file, shape in ((first, (2048, 683)), (second, (200, 100))):
        response = api.get(file["links"]["quicklook"])
        assert response.headers["content-type"] == "image/png"
        assert read_png(response.content).shape == (shape[1], shape[0], 4)
    missing = api.get(f"/v1/jobs/{job_id}/files/9/quicklook")
    assert (missing.status_code, missing.headers["content-type"]) == (404, "application/problem+json")
    assert missing.json()["type"].endswith("/quicklook-not-found")
