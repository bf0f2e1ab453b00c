"""The Palm ONNX model as a SAHI ``DetectionModel`` over onnxruntime, as a SAHI user would wrap it.

SAHI ships wrappers for torch-based frameworks only; a custom model implements ``load_model``,
``set_model``, ``perform_inference`` and ``_create_object_prediction_list_from_original_predictions``.
SAHI's base class picks a torch device at construction, importing torch when it is installed; this
model runs on onnxruntime's CPU provider and needs no torch, so it keeps SAHI's device probe out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from sahi.models.base import DetectionModel
from sahi.prediction import ObjectPrediction

TILE = 512


class OnnxPalmDetectionModel(DetectionModel):
    """Input ``uint8 [1, 3, 512, 512]`` RGB; output rows ``x1, y1, x2, y2, score, class_id`` in slice
    pixels. Slices smaller than 512 px (images smaller than a slice) are zero-padded."""

    def set_device(self, device: str | None = None) -> None:
        self.device = "cpu"

    def load_model(self) -> None:
        self.set_model(ort.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"]))

    def set_model(self, model: Any, **kwargs: Any) -> None:
        self.model = model

    def perform_inference(self, image: npt.NDArray[np.uint8]) -> None:
        height, width = image.shape[:2]
        if height > TILE or width > TILE:
            raise ValueError(f"the model takes {TILE} px slices, got {width}x{height}")
        batch = np.zeros((1, 3, TILE, TILE), np.uint8)
        batch[0, :, :height, :width] = image[:, :, :3].transpose(2, 0, 1)
        self._original_predictions = self.model.run(None, {"images": batch})[0]

    def _create_object_prediction_list_from_original_predictions(
        self,
        shift_amount_list: list[list[int | float]] | None = None,
        full_shape_list: list[list[int | float]] | None = None,
    ) -> None:
        # get_prediction passes one flat [x, y] / [h, w] for a single image, the sliced path a list.
        if shift_amount_list and not isinstance(shift_amount_list[0], list):
            shift_amount_list = [shift_amount_list]
        if full_shape_list and not isinstance(full_shape_list[0], list):
            full_shape_list = [full_shape_list]
        shift_amount_list = shift_amount_list or [[0, 0]]
        names = self.category_mapping or {}
        per_image: list[list[ObjectPrediction]] = []
        for i, rows in enumerate(self._original_predictions):
            rows = rows[rows[:, 4] > self.confidence_threshold]
            full_shape = full_shape_list[i] if full_shape_list else None
            per_image.append(
                [
                    ObjectPrediction(
                        bbox=[float(x1), float(y1), float(x2), float(y2)],
                        category_id=int(c),
                        category_name=names.get(str(int(c)), str(int(c))),
                        score=float(s),
                        shift_amount=list(shift_amount_list[i]),
                        full_shape=full_shape,
                    )
                    for x1, y1, x2, y2, s, c in rows.tolist()
                ]
            )
        self._object_prediction_list_per_image = per_image
