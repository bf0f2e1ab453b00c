"""COCO / JSON / GeoJSON rendering, checked by loading the output the way users do."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from gateway.pipeline.merge import Detections
from gateway.pipeline.render import OutputFormat, render, to_coco, to_geojson, to_json
from gateway.pipeline.result import Category, ImageMeta, ImageResult, ModelInfo, TilingInfo

MODEL = ModelInfo("palm", "1.1.0", "ab" * 32, triton_version="1")
TILING = TilingInfo(512, 128, 0.5, 0.3)


def result(name: str, n: int, georef: bool = True) -> ImageResult:
    boxes = np.array([[10 + 40 * i, 20, 40 + 40 * i, 55] for i in range(n)], np.float32)
    polygon = {"type": "Polygon", "coordinates": [[[1, 2], [1, 3], [2, 3], [2, 2], [1, 2]]]}
    return ImageResult(
        image=ImageMeta(
            file_name=name,
            width=640,
            height=480,
            sha256="cd" * 32,
            crs="EPSG:32633" if georef else None,
            transform=(0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0) if georef else None,
        ),
        detections=Detections(
            boxes,
            np.linspace(0.9, 0.5, n, dtype=np.float32),
            np.array([1, 2] * (n // 2) + [1] * (n % 2), np.int32),
        ),
        geometries=[polygon if georef else None] * n,
        tiles_total=2,
    )


def test_coco_loads_with_pycocotools_and_as_results(tmp_path: Path) -> None:
    doc = to_coco([result("a.tif", 3), result("b.tif", 2, georef=False)], MODEL, TILING)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(doc))
    coco = COCO(str(path))
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
    plain = ImageResult(
        image=replace(plain.image, warnings=(no_crs,)),
        detections=plain.detections,
        geometries=plain.geometries,
    )
    doc = to_geojson([result("a.tif", 1), plain], MODEL)
    assert doc["type"] == "FeatureCollection"
    geoms = [f["geometry"] for f in doc["features"]]
    assert geoms[0]["type"] == "Polygon"
    assert geoms[1] is None
    assert doc["features"][0]["properties"]["category"] == "palm_tree"
    assert doc["warnings"] == [{"file_name": "b.png", "message": no_crs}]
    assert doc["model"]["version"] == "1.1.0"


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
    features = to_geojson([odd], MODEL)["features"]
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
    assert json.loads(render(OutputFormat.coco, results, MODEL, TILING))["images"][1]["file_name"] == "b.tif"
    assert len(json.loads(render(OutputFormat.geojson, results, MODEL, TILING))["features"]) == 3
    assert json.loads(render(OutputFormat.json, results[:1], MODEL, TILING))["image"]["file_name"] == "a.tif"
    with pytest.raises(ValueError, match="one image"):
        render(OutputFormat.json, results, MODEL, TILING)


def test_categories_come_from_the_model() -> None:
    model = ModelInfo("trees", "3", None, categories=(Category(4, "oak", "vegetation"),))
    base = result("a.tif", 1)
    odd = ImageResult(
        image=base.image,
        detections=Detections(base.detections.boxes, base.detections.scores, np.array([4], np.int32)),
        geometries=base.geometries,
    )
    assert to_json(odd, model)["detections"][0]["category"] == "oak"
    coco = to_coco([odd], model, TILING)
    assert coco["categories"] == [{"id": 4, "name": "oak", "supercategory": "vegetation"}]
