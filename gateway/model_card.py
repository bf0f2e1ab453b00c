"""What the gateway knows about the served model: Triton's name and version directory, and from the model
card its release, sha256, classes, tensor contract, the ground sample distances it was trained for and
the input baseline the out-of-domain score uses (docs/bring-your-own-model.md lists the fields).

The contract (tile side, ``K``, tensor names) is the card's ``contract`` section, checked against what
Triton's model metadata states whenever the server can be asked; a model without a card (or whose card
states no contract) is served by what Triton states, and its classes are reported as ``class_<id>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gateway.pipeline.contract import ContractError, ContractMismatch, ModelContract
from gateway.pipeline.domain import DomainBaseline
from gateway.pipeline.resolution import GsdRange
from gateway.pipeline.result import Category, ModelInfo
from gateway.settings import TritonSettings

logger = logging.getLogger(__name__)

CARD_NAME = "model_card.json"
ONNX_NAME = "model.onnx"


def card_path(triton: TritonSettings) -> Path:
    """``<repository>/<model>/<version>/model_card.json``."""
    return Path(triton.model_repository) / triton.model_name / triton.model_version / CARD_NAME


def card_contract(triton: TritonSettings) -> ModelContract | None:
    """The contract the model card states; ``None`` without a card, or a card without ``contract``.

    Raises:
        ContractError: the card's ``contract`` section describes tensors the gateway cannot serve.
    """
    return _stated_contract(_read_card(card_path(triton)), card_path(triton))


def _stated_contract(content: dict[str, Any] | None, card: Path) -> ModelContract | None:
    if content is None or not content.get("contract"):
        return None
    return ModelContract.from_card(content["contract"], source=f"model card {card}")


def load_model_info(triton: TritonSettings, served: ModelContract | None = None) -> ModelInfo:
    """Read ``<repository>/<model>/<version>/model_card.json`` (written by ``python -m export.onnx``).

    The sha256 identifies the exact weights; without a card it is computed from ``model.onnx`` when the
    repository is local, and left ``None`` when the gateway only knows a remote Triton. The card's
    ``categories`` name the classes; without them every class is reported as ``class_<id>``. Its
    ``resolution`` (:meth:`GsdRange.from_card`) says which ground sample distances the model was trained
    for; a card without one (or with an unreadable one, logged) leaves every file read at its own
    resolution. Its ``input_baseline`` (and ``out_of_domain.threshold``) let the gateway score each
    file's inputs; a card without one, or with an unreadable one, scores none.

    Args:
        triton: where the model repository is and which model and version are served.
        served: the contract Triton's model metadata states; ``None`` when the server could not be asked.

    Raises:
        ContractMismatch: the card and ``served`` disagree (each difference names both values).
        ContractError: neither the card nor ``served`` states a contract, or the card's is off-contract.
    """
    version_dir = Path(triton.model_repository) / triton.model_name / triton.model_version
    sha256: str | None = None
    categories: tuple[Category, ...] = ()
    resolution: GsdRange | None = None
    release = triton.model_version
    domain: DomainBaseline | None = None
    card = version_dir / CARD_NAME
    content = _read_card(card)
    if content is None:
        onnx = version_dir / ONNX_NAME
        if onnx.is_file():
            sha256 = _file_sha256(onnx)
    else:
        try:
            sha256 = str(content["sha256"])
            release = str(content.get("version") or release)
            if content.get("categories"):
                categories = tuple(
                    Category(int(c["id"]), str(c["name"]), str(c.get("supercategory", "object")))
                    for c in content["categories"]
                )
            resolution = _resolution(content.get("resolution"), card)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("model card %s is unreadable: %s", card, exc)
        try:
            domain = DomainBaseline.from_card(content)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("model card %s has an unreadable input_baseline, no file is scored: %s", card, exc)
    if not categories:
        logger.warning(
            "model %r has no categories in %s; its classes are reported as class_<id>",
            triton.model_name,
            card,
        )
    return ModelInfo(
        name=triton.model_name,
        version=release,
        sha256=sha256,
        triton_version=triton.model_version,
        categories=categories,
        contract=_agreed_contract(triton, card, _stated_contract(content, card), served),
        resolution=resolution,
        domain=domain,
    )


def _agreed_contract(
    triton: TritonSettings, card: Path, stated: ModelContract | None, served: ModelContract | None
) -> ModelContract:
    if stated is None and served is None:
        raise ContractError(
            f"the contract of model {triton.model_name!r} is unknown: {card} states none (no card, or no "
            "'contract' section) and Triton's model metadata could not be read"
        )
    if stated is None:
        assert served is not None
        logger.warning(
            "model %r: no contract in %s; serving it as Triton describes it: %s",
            triton.model_name,
            card,
            served.describe(),
        )
        return served
    if served is not None and (differences := stated.differences(served)):
        raise ContractMismatch(
            f"model {triton.model_name!r}: the model card {card} and Triton's model configuration "
            f"disagree ({'; '.join(differences)}; card vs Triton): {stated.describe()} vs "
            f"{served.describe()}. Fix the card's 'contract' section or the model's config.pbtxt."
        )
    return stated


def _read_card(card: Path) -> dict[str, Any] | None:
    """The card's JSON object; ``None`` when there is no card or it cannot be parsed (logged)."""
    try:
        content = json.loads(card.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        logger.warning("model card %s is unreadable: %s", card, exc)
        return None
    if not isinstance(content, dict):
        logger.warning("model card %s is not a JSON object", card)
        return None
    return content


def _resolution(section: Any, card: Path) -> GsdRange | None:
    if section is None:
        return None
    try:
        return GsdRange.from_card(section)
    except (KeyError, ValueError, TypeError) as exc:
        logger.warning(
            "model card %s: its resolution section is unreadable (%s); GSD is not checked", card, exc
        )
        return None


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
