"""What the gateway reports about a model and serves it by: its card, checked against Triton's view."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from gateway.model_card import card_contract, load_model_info
from gateway.pipeline.contract import ContractError, ContractMismatch, ModelContract
from gateway.settings import TritonSettings
from tests import markers

SERVED = ModelContract(markers.TILE, markers.K, markers.INPUT, markers.OUTPUT)


def settings_for(repository: Path) -> TritonSettings:
    return TritonSettings(model_name=markers.NAME, model_repository=repository, model_config_name="")


def test_the_card_names_the_categories_and_states_the_contract(tmp_path: Path) -> None:
    triton = settings_for(markers.write_repository(tmp_path))

    model = load_model_info(triton, SERVED)

    assert card_contract(triton) == SERVED
    assert model.contract == SERVED
    assert [(c.id, c.name) for c in model.categories] == [
        (10, "red_marker"),
        (20, "green_marker"),
        (30, "blue_marker"),
    ]
    assert (model.name, model.version) == ("markers", "0.1.0")
    assert model.category_name(20) == "green_marker"


def test_a_card_that_disagrees_with_triton_stops_the_start_naming_both_values(tmp_path: Path) -> None:
    triton = settings_for(markers.write_repository(tmp_path, card_tile=320))

    with pytest.raises(ContractMismatch) as raised:
        load_model_info(triton, SERVED)

    message = str(raised.value)
    assert "tile size 320 vs 256" in message
    assert "card vs Triton" in message
    assert str(tmp_path / "markers" / "1" / "model_card.json") in message


def test_without_a_card_the_server_states_the_contract_and_classes_are_numbered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    triton = settings_for(markers.write_repository(tmp_path, with_card=False))

    with caplog.at_level(logging.WARNING, logger="gateway.model_card"):
        model = load_model_info(triton, SERVED)

    assert card_contract(triton) is None
    assert model.contract == SERVED
    assert model.categories == ()
    assert model.category_name(10) == "class_10"
    assert (
        model.sha256 == hashlib.sha256((tmp_path / "markers" / "1" / "model.onnx").read_bytes()).hexdigest()
    )
    assert "classes are reported as class_<id>" in caplog.text
    assert "serving it as Triton describes it: pixels UINT8 [N, 3, 256, 256]" in caplog.text


def test_without_a_card_or_an_answer_from_triton_the_contract_is_unknown(tmp_path: Path) -> None:
    triton = settings_for(markers.write_repository(tmp_path, with_card=False))

    with pytest.raises(ContractError, match="the contract of model 'markers' is unknown"):
        load_model_info(triton, None)


def test_a_card_without_categories_reports_class_ids(tmp_path: Path) -> None:
    triton = settings_for(markers.write_repository(tmp_path, categories=False))

    model = load_model_info(triton, None)

    assert model.categories == ()
    assert model.contract == SERVED


def test_a_card_stating_an_unservable_contract_is_refused(tmp_path: Path) -> None:
    triton = settings_for(markers.write_repository(tmp_path))
    card = tmp_path / "markers" / "1" / "model_card.json"
    content = json.loads(card.read_text())
    content["contract"]["inputs"][0]["shape"] = [-1, 4, 256, 256]
    card.write_text(json.dumps(content))

    with pytest.raises(ContractError, match="has 4 channels"):
        load_model_info(triton, SERVED)
