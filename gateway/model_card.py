"""What the gateway tells users about the model: Triton's name and version directory, and from the model
card its release, sha256, classes and input baseline (for the out-of-domain score)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gateway.pipeline.domain import DomainBaseline
from gateway.pipeline.result import PALM_CATEGORIES, Category, ModelInfo
from gateway.settings import TritonSettings

logger = logging.getLogger(__name__)

CARD_NAME = "model_card.json"
ONNX_NAME = "model.onnx"


def load_model_info(triton: TritonSettings) -> ModelInfo:
    """Read ``<repository>/<model>/<version>/model_card.json`` (written by ``python -m export.onnx``).

    The sha256 identifies the exact weights; without a card it is computed from ``model.onnx`` when the
    repository is local, and left ``None`` when the gateway only knows a remote Triton. The card's
    ``categories`` name the classes; without them the Palm model's table applies. Its
    ``input_baseline`` (and ``out_of_domain.threshold``) let the gateway score each file's inputs; a card
    without one, or an unreadable one, scores none.
    """
    version_dir = Path(triton.model_repository) / triton.model_name / triton.model_version
    sha256: str | None = None
    categories = PALM_CATEGORIES
    release = triton.model_version
    domain: DomainBaseline | None = None
    card = version_dir / CARD_NAME
    try:
        content = json.loads(card.read_text())
        sha256 = str(content["sha256"])
        release = str(content.get("version") or release)
        if content.get("categories"):
            categories = tuple(
                Category(int(c["id"]), str(c["name"]), str(c.get("supercategory", "object")))
                for c in content["categories"]
            )
        try:
            domain = DomainBaseline.from_card(content)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("model card %s has an unreadable input_baseline, no file is scored: %s", card, exc)
    except FileNotFoundError:
        onnx = version_dir / ONNX_NAME
        if onnx.is_file():
            sha256 = _file_sha256(onnx)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        logger.warning("model card %s is unreadable: %s", card, exc)
    return ModelInfo(
        name=triton.model_name,
        version=release,
        sha256=sha256,
        triton_version=triton.model_version,
        categories=categories,
        domain=domain,
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_card(card_path: Path, **sections: Any) -> None:
    """Replace top-level sections (``throughput``, ``input_baseline``, ...) of a model card, keeping
    the rest."""
    card = json.loads(card_path.read_text())
    card.update(sections)
    card_path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
