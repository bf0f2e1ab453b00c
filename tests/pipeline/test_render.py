"""COCO / JSON / GeoJSON rendering, checked by loading the output the way users do."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pycocotools.coco import COCO

from export.synth import PALM_CATEGORIES
from gateway.pipeline.domain import DomainCheck
from gateway.pipeline.merge import Detections
from gateway.pipeline.render import (
    ROWS_PER_CHUNK,
    DetectionBatch,
    DetectionRecord,
    ImageRecord,
    OutputFormat,
    batch_records,
    coco_info,
    render,
    to_json,
    write_coco,
    write_geojson,
)
from gateway.pipeline.result import Category, ImageMeta, ImageResult, ModelInfo, TilingInfo
from tests.fakes import FAKE_CONTRACT

MODEL = ModelInfo(
    "palm", "1.1.0", "ab" * 32, triton_version="1", categories=PALM_CATEGORIES, contract=FAKE_CONTRACT
)
TILING = TilingInfo(512, 128, 0.5, 0.3)
CREATED = datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)
POLYGON = {"type": "Polygon", "coordinates": [[[1, 2], [1, 3], [2, 3], [2, 2], [1, 2]]]}


def result(name: str, n: int, georef: bool = True) -> ImageResult:
    boxes = np.array([[10 + 40 * i, 20, 40 + 40 * i, 55] for i in range(n)], np.float32)
    return ImageResult(
        image=ImageMeta(
            file_name=name,
            width=640,
            height=480,
            sha256="cd" * 32,
            crs="EPSG:32633" if georef else None,
            transform=(0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0) if georef else None,
            gsd_m=0.3 if georef else None,
            gsd_source="file" if georef else None,
            inference_gsd_m=0.3 if georef else None,
        ),
        detections=Detections(
            boxes.reshape(n, 4),
            np.linspace(0.9, 0.5, n, dtype=np.float32),
            np.array([1, 2] * (n // 2) + [1] * (n % 2), np.int32),
        ),
        geometries=[POLYGON if georef else None] * n,
        tiles_total=2,
    )


def rendered(fmt: OutputFormat, results: list[ImageResult], model: ModelInfo = MODEL) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(render(fmt, results, model, TILING, created=CREATED))
    return document


def load_coco(content: bytes, tmp_path: Path) -> COCO:
    path = tmp_path / "coco.json"
    path.write_bytes(content)
    return COCO(str(path))


def test_coco_loads_with_pycocotools_and_as_results(tmp_path: Path) -> None:
    content = render(
        OutputFormat.coco,
        [result("a.tif", 3), result("b.tif", 2, georef=False)],
        MODEL,
        TILING,
        created=CREATED,
    )
    coco = load_coco(content, tmp_path)
    doc = json.loads(content)
    assert sorted(coco.getCatIds()) == [1, 2]
    assert coco.loadCats(1)[0]["name"] == "palm_tree"
    assert len(coco.getImgIds()) == 2
    assert len(coco.getAnnIds(imgIds=[1])) == 3
    first = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert first["bbox"] == [10.0, 20.0, 30.0, 35.0]
    assert first["area"] == 30.0 * 35.0
    results = coco.loadRes(doc["annotations"])
    assert len(results.getAnnIds()) == 5
    assert doc["info"]["model"]["sha256"] == MODEL.sha256
    assert doc["info"]["tiling"]["overlap"] == 128
    assert doc["images"][0]["crs"] == "EPSG:32633"
    assert doc["images"][1]["transform"] is None


def test_one_image_coco_is_compact_json_with_fields_in_the_documented_order() -> None:
    content = render(OutputFormat.coco, [result("a.tif", 2)], MODEL, TILING, created=CREATED)
    expected = {
        "info": {
            "description": "Palm Serve detections",
            "version": "1.1.0",
            "date_created": "2024-05-01T12:30:15+00:00",
            "model": {"name": "palm", "version": "1.1.0", "triton_version": "1", "sha256": "ab" * 32},
            "tiling": {
                "tile_size": 512,
                "overlap": 128,
                "merge": "class-aware greedy NMS in image pixels, whole boxes before seam-truncated ones",
                "nms_iou": 0.5,
                "score_threshold": 0.3,
            },
        },
        "licenses": [],
        "categories": [
            {"id": 1, "name": "palm_tree", "supercategory": "vegetation"},
            {"id": 2, "name": "building", "supercategory": "structure"},
        ],
        "images": [
            {
                "id": 1,
                "file_name": "a.tif",
                "width": 640,
                "height": 480,
                "sha256": "cd" * 32,
                "crs": "EPSG:32633",
                "transform": [0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0],
                "gsd_m": 0.3,
                "gsd_source": "file",
                "inference_gsd_m": 0.3,
                "resample_factor": 1.0,
                "warnings": [],
                "out_of_domain": None,
            }
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10.0, 20.0, 30.0, 35.0],
                "area": 1050.0,
                "iscrowd": 0,
                "score": 0.9,
                "segmentation": [],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [50.0, 20.0, 30.0, 35.0],
                "area": 1050.0,
                "iscrowd": 0,
                "score": 0.5,
                "segmentation": [],
            },
        ],
    }
    assert content == orjson.dumps(expected)


def test_json_format_shape() -> None:
    body = to_json(result("scene.tif", 2), MODEL)
    assert body["model"] == {
        "name": "palm",
        "version": "1.1.0",
        "triton_version": "1",
        "sha256": MODEL.sha256,
    }
    assert body["image"]["transform"] == [0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0]
    det = body["detections"][1]
    assert det["category"] == "building"
    assert det["category_id"] == 2
    assert det["bbox"] == [50.0, 20.0, 30.0, 35.0]
    assert det["geometry"]["type"] == "Polygon"


def test_geojson_is_a_feature_collection_with_null_geometry_without_crs_and_says_why() -> None:
    plain = result("b.png", 1, georef=False)
    no_crs = "The file has no CRS: detections are in pixel coordinates without geometry."
    plain = replace(plain, image=replace(plain.image, warnings=(no_crs,)))
    doc = rendered(OutputFormat.geojson, [result("a.tif", 1), plain])
    assert doc["type"] == "FeatureCollection"
    geoms = [f["geometry"] for f in doc["features"]]
    assert geoms[0]["type"] == "Polygon"
    assert geoms[1] is None
    assert doc["features"][0]["properties"]["category"] == "palm_tree"
    assert doc["warnings"] == [{"file_name": "b.png", "message": no_crs}]
    assert doc["model"]["version"] == "1.1.0"


def test_every_format_reports_the_files_gsd_and_the_gsd_the_model_saw() -> None:
    drone = result("drone.tif", 1)
    drone = replace(
        drone,
        image=replace(
            drone.image, gsd_m=0.05, gsd_source="file", inference_gsd_m=0.3, resample_factor=6.000000001
        ),
    )
    photo = result("photo.png", 1, georef=False)
    expected = [
        {"gsd_m": 0.05, "gsd_source": "file", "inference_gsd_m": 0.3, "resample_factor": 6.0},
        {"gsd_m": None, "gsd_source": None, "inference_gsd_m": None, "resample_factor": 1.0},
    ]
    image = to_json(drone, MODEL)["image"]
    assert {key: image[key] for key in expected[0]} == expected[0]
    coco = rendered(OutputFormat.coco, [drone, photo])["images"]
    assert [{key: entry[key] for key in expected[0]} for entry in coco] == expected
    geojson = rendered(OutputFormat.geojson, [drone, photo])["images"]
    assert geojson == [{"file_name": "drone.tif", **expected[0]}, {"file_name": "photo.png", **expected[1]}]


def test_json_and_geojson_agree_and_name_unknown_classes() -> None:
    base = result("a.tif", 3)
    classes = np.array([2, 7, 1], np.int32)
    odd = ImageResult(
        image=base.image,
        detections=Detections(base.detections.boxes, base.detections.scores, classes),
        geometries=base.geometries[:2],  # fewer geometries than boxes: the rest are null
    )
    records = to_json(odd, MODEL)["detections"]
    assert [d["category"] for d in records] == ["building", "class_7", "palm_tree"]
    assert records[2]["geometry"] is None
    features = rendered(OutputFormat.geojson, [odd])["features"]
    assert [f["type"] for f in features] == ["Feature"] * 3
    assert [f["geometry"] for f in features] == [d["geometry"] for d in records]
    assert [f["properties"] for f in features] == [
        {
            "category_id": d["category_id"],
            "category": d["category"],
            "score": d["score"],
            "bbox_px": d["bbox"],
            "file_name": "a.tif",
            "model": "palm/1.1.0",
        }
        for d in records
    ]


def test_render_gives_the_bytes_of_each_format_and_json_holds_one_image() -> None:
    results = [result("a.tif", 2), result("b.tif", 1)]
    assert rendered(OutputFormat.coco, results)["images"][1]["file_name"] == "b.tif"
    assert len(rendered(OutputFormat.geojson, results)["features"]) == 3
    assert rendered(OutputFormat.json, results[:1])["image"]["file_name"] == "a.tif"
    with pytest.raises(ValueError, match="one image"):
        render(OutputFormat.json, results, MODEL, TILING, created=CREATED)


def test_images_without_detections_render_as_empty_lists() -> None:
    coco = rendered(OutputFormat.coco, [result("a.tif", 0)])
    assert [image["id"] for image in coco["images"]] == [1]
    assert coco["annotations"] == []
    assert rendered(OutputFormat.geojson, [result("a.tif", 0)])["features"] == []


def test_categories_come_from_the_model() -> None:
    model = ModelInfo(
        "trees", "3", None, categories=(Category(4, "oak", "vegetation"),), contract=FAKE_CONTRACT
    )
    base = result("a.tif", 1)
    odd = replace(
        base, detections=Detections(base.detections.boxes, base.detections.scores, np.array([4], np.int32))
    )
    assert to_json(odd, model)["detections"][0]["category"] == "oak"
    coco = rendered(OutputFormat.coco, [odd], model)
    assert coco["categories"] == [{"id": 4, "name": "oak", "supercategory": "vegetation"}]


def test_coco_names_every_class_it_annotates_even_those_the_model_lacks(tmp_path: Path) -> None:
    """A model without a card has no table: its ids become class_<id> categories (after the card's)."""
    bare = ModelInfo("nameless", "1", None, contract=FAKE_CONTRACT)
    base = result("a.tif", 3)
    odd = replace(
        base,
        detections=Detections(base.detections.boxes, base.detections.scores, np.array([7, 3, 7], np.int32)),
    )

    coco = load_coco(render(OutputFormat.coco, [odd], bare, TILING, created=CREATED), tmp_path)
    palm = rendered(OutputFormat.coco, [odd])

    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(3, "class_3"), (7, "class_7")]
    assert sorted(coco.getAnnIds(catIds=[7])) == [1, 3]
    assert [(c["id"], c["name"]) for c in palm["categories"]] == [
        (1, "palm_tree"),
        (2, "building"),
        (3, "class_3"),
        (7, "class_7"),
    ]


def test_coco_info_records_the_given_time_in_utc_and_the_job() -> None:
    paris = timezone(timedelta(hours=2))
    info = coco_info(MODEL, TILING, job_id="job-7", created=datetime(2024, 5, 1, 14, 30, 15, 999, paris))
    assert info["date_created"] == "2024-05-01T12:30:15+00:00"
    assert info["job_id"] == "job-7"
    assert "job_id" not in coco_info(MODEL, TILING, created=CREATED)
    with pytest.raises(ValueError, match="timezone"):
        coco_info(MODEL, TILING, created=datetime(2024, 5, 1, 12, 30, 15))


# A job: files at upload positions 1..8 of which 3, 5 and 6 failed, detections read back row by row.

POSITIONS = (1, 2, 4, 7, 8)


def job_images() -> list[ImageRecord]:
    return [
        ImageRecord(
            id=position,
            file_name=f"scene-{position}.tif",
            width=4000,
            height=3000,
            sha256=f"{position:02d}" * 32,
            crs=None if position == 2 else "EPSG:32633",
            transform=None if position == 2 else (0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0),
            warnings=("The file has no CRS.",) if position == 2 else (),
        )
        for position in POSITIONS
    ]


def job_rows(per_image: dict[int, int], seed: int = 17) -> Iterator[DetectionRecord]:
    """Detection rows in (image position, detection order), the order a job's store reads them back."""
    rng = np.random.default_rng(seed)
    for position, count in per_image.items():
        xy = rng.uniform(0, 3000, (count, 2))
        # Sides with two decimals make width * height land on decimal ties often.
        wh = np.round(rng.uniform(1, 90, (count, 2)), 2)
        scores = rng.uniform(0.3, 1.0, count)
        classes = rng.integers(1, 3, count)
        for i in range(count):
            x, y = xy[i].tolist()
            w, h = wh[i].tolist()
            geometry = None if position == 2 else {"type": "Polygon", "coordinates": [[[x, y], [x + w, y]]]}
            yield DetectionRecord(position, int(classes[i]), (x, y, w, h), float(scores[i]), geometry)


def one_batch_per_image(rows: Iterator[DetectionRecord]) -> Iterator[DetectionBatch]:
    return batch_records(rows, max_rows=10**9)


PER_IMAGE = {1: 40, 2: 7, 4: ROWS_PER_CHUNK + 5, 8: 3}  # no detections on 7


def job_coco(batches: Iterator[DetectionBatch]) -> bytes:
    out = io.BytesIO()
    info = coco_info(MODEL, TILING, job_id="job-7", created=CREATED)
    write_coco(out, info=info, categories=MODEL.categories, images=iter(job_images()), detections=batches)
    return out.getvalue()


def job_geojson(batches: Iterator[DetectionBatch]) -> bytes:
    out = io.BytesIO()
    write_geojson(out, model=MODEL, images=iter(job_images()), detections=batches)
    return out.getvalue()


def test_job_coco_keeps_file_positions_and_numbers_annotations_densely(tmp_path: Path) -> None:
    content = job_coco(batch_records(job_rows(PER_IMAGE)))
    coco = load_coco(content, tmp_path)
    assert coco.getImgIds() == list(POSITIONS)
    assert [image["file_name"] for image in coco.loadImgs(list(POSITIONS))] == [
        f"scene-{p}.tif" for p in POSITIONS
    ]
    annotations = json.loads(content)["annotations"]
    total = sum(PER_IMAGE.values())
    assert [a["id"] for a in annotations] == list(range(1, total + 1))
    assert [a["image_id"] for a in annotations] == [p for p, n in PER_IMAGE.items() for _ in range(n)]
    assert {p: len(coco.getAnnIds(imgIds=[p])) for p in POSITIONS} == {
        **dict.fromkeys(POSITIONS, 0),
        **PER_IMAGE,
    }
    assert len(coco.loadRes(annotations).getAnnIds()) == total
    assert json.loads(content)["info"]["job_id"] == "job-7"


def test_job_boxes_scores_and_areas_are_rounded_as_documented() -> None:
    rows = list(job_rows(PER_IMAGE))
    annotations = json.loads(job_coco(batch_records(iter(rows))))["annotations"]
    for row, annotation in zip(rows, annotations, strict=True):
        assert annotation["bbox"] == pytest.approx(row.bbox, abs=0.005 + 1e-9)
        assert annotation["bbox"] == [round(v, 2) for v in annotation["bbox"]]
        assert annotation["score"] == round(row.score, 4)
        assert annotation["area"] == round(annotation["bbox"][2] * annotation["bbox"][3], 2)
        assert annotation["category_id"] == row.category_id


def test_same_input_gives_the_same_bytes_however_it_is_batched() -> None:
    references = (
        job_coco(one_batch_per_image(job_rows(PER_IMAGE))),
        job_geojson(one_batch_per_image(job_rows(PER_IMAGE))),
    )
    for max_rows in (1, 3, 1000):
        assert job_coco(batch_records(job_rows(PER_IMAGE), max_rows)) == references[0]
        assert job_geojson(batch_records(job_rows(PER_IMAGE), max_rows)) == references[1]
    assert job_coco(batch_records(job_rows(PER_IMAGE, seed=18))) != references[0]


def test_job_geojson_carries_each_files_name_geometry_and_warnings() -> None:
    rows = list(job_rows(PER_IMAGE))
    doc = json.loads(job_geojson(batch_records(iter(rows))))
    assert list(doc) == ["type", "model", "warnings", "images", "features"]
    assert doc["type"] == "FeatureCollection"
    assert doc["model"] == {"name": "palm", "version": "1.1.0", "triton_version": "1", "sha256": "ab" * 32}
    assert doc["warnings"] == [{"file_name": "scene-2.tif", "message": "The file has no CRS."}]
    features = doc["features"]
    assert len(features) == len(rows)
    for row, feature in zip(rows, features, strict=True):
        assert feature["type"] == "Feature"
        assert feature["geometry"] == row.geometry
        properties = feature["properties"]
        assert list(properties) == ["category_id", "category", "score", "bbox_px", "file_name", "model"]
        assert properties["file_name"] == f"scene-{row.image_id}.tif"
        assert properties["category"] == MODEL.category_name(row.category_id)
        assert properties["score"] == round(row.score, 4)
        assert properties["bbox_px"] == pytest.approx(row.bbox, abs=0.005 + 1e-9)
        assert properties["model"] == "palm/1.1.0"


@pytest.mark.parametrize("count", [1, 255, 256, 257, 512, 1000])
def test_documents_of_any_number_of_images_are_valid(count: int) -> None:
    images = [ImageRecord(i, f"{i}.tif", 10, 10, None, None, None, ("odd",)) for i in range(1, count + 1)]
    detections = [batch(i, 2) for i in range(1, count + 1)]
    out = io.BytesIO()
    info = coco_info(MODEL, TILING, created=CREATED)
    write_coco(out, info=info, categories=MODEL.categories, images=images, detections=detections)
    coco = json.loads(out.getvalue())
    assert [image["id"] for image in coco["images"]] == list(range(1, count + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 2 * count + 1))
    out = io.BytesIO()
    write_geojson(out, model=MODEL, images=images, detections=detections)
    geojson = json.loads(out.getvalue())
    assert len(geojson["warnings"]) == count
    assert len(geojson["features"]) == 2 * count


def batch(image_id: int, n: int = 1) -> DetectionBatch:
    return DetectionBatch(image_id, np.ones(n, np.int64), np.ones((n, 4)), np.full(n, 0.5))


@pytest.mark.parametrize(
    ("image_ids", "batches", "message"),
    [
        ((1, 1), [], "image ids must increase"),
        ((2, 1), [], "image ids must increase"),
        ((0,), [], "image ids must increase"),
        ((1, 2), [batch(3)], "image 3, which is not among the images"),
        ((1, 2), [batch(2), batch(1)], "image 1 after those of image 2"),
    ],
)
def test_writers_refuse_input_out_of_order(
    image_ids: tuple[int, ...], batches: list[DetectionBatch], message: str
) -> None:
    images = [ImageRecord(i, f"{i}.tif", 10, 10, None, None, None) for i in image_ids]
    info = coco_info(MODEL, TILING, created=CREATED)
    with pytest.raises(ValueError, match=message):
        write_coco(io.BytesIO(), info=info, categories=MODEL.categories, images=images, detections=batches)
    with pytest.raises(ValueError, match=message):
        write_geojson(io.BytesIO(), model=MODEL, images=images, detections=batches)


def test_a_batch_refuses_columns_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="boxes"):
        DetectionBatch(1, np.ones(2, np.int64), np.ones((3, 4)), np.ones(2))
    with pytest.raises(ValueError, match="geometries"):
        DetectionBatch(1, np.ones(2, np.int64), np.ones((2, 4)), np.ones(2), [None])
    with pytest.raises(ValueError, match="integers"):
        DetectionBatch(1, np.ones(2), np.ones((2, 4)), np.ones(2))


FLAGGED = DomainCheck(
    score=7.91, threshold=4.5, variant="colour", statistic="channel_spread_b", value=65.2, reference=14.79
)
IN_DOMAIN = replace(FLAGGED, score=1.2, statistic="channel_mean_r", value=130.0, reference=126.7)


def test_an_out_of_domain_image_says_so_with_its_score_in_every_format() -> None:
    foreign, familiar = result("landsat.tif", 2), result("scene.tif", 1)
    foreign = replace(
        foreign, image=replace(foreign.image, out_of_domain=FLAGGED, warnings=(FLAGGED.warning(),))
    )
    familiar = replace(familiar, image=replace(familiar.image, out_of_domain=IN_DOMAIN))
    expected = {
        "score": 7.91,
        "threshold": 4.5,
        "flagged": True,
        "statistic": "channel_spread_b",
        "value": 65.2,
        "baseline_mean": 14.79,
        "variant": "colour",
    }

    body = to_json(foreign, MODEL)
    assert body["image"]["out_of_domain"] == expected
    assert body["warnings"] == [FLAGGED.warning()]
    assert "7.9 standard deviations" in body["warnings"][0]
    assert "channel_spread_b" in body["warnings"][0]
    assert to_json(familiar, MODEL)["image"]["out_of_domain"]["flagged"] is False

    coco = rendered(OutputFormat.coco, [foreign, familiar])
    assert coco["images"][0]["out_of_domain"] == expected
    assert coco["images"][0]["warnings"] == [FLAGGED.warning()]
    assert coco["images"][1]["out_of_domain"]["score"] == 1.2
    assert coco["images"][1]["warnings"] == []

    geojson = rendered(OutputFormat.geojson, [foreign, familiar])
    assert geojson["warnings"] == [{"file_name": "landsat.tif", "message": FLAGGED.warning()}]


def test_a_job_image_record_carries_its_check_into_coco() -> None:
    buffer = io.BytesIO()
    record = ImageRecord(1, "a.tif", 64, 64, None, None, None, (FLAGGED.warning(),), out_of_domain=FLAGGED)
    write_coco(buffer, info={}, categories=MODEL.categories, images=[record], detections=[])
    image = json.loads(buffer.getvalue())["images"][0]
    assert DomainCheck.from_json(image["out_of_domain"]) == FLAGGED
    assert image["warnings"] == [FLAGGED.warning()]
