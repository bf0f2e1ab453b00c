"""The model contract: what a card or a server states, what the gateway refuses, and how a mismatch reads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.pipeline.contract import ContractError, ModelContract, TensorSpec
from gateway.settings import REPO_ROOT
from tests import markers

PALM_CARD = REPO_ROOT / "model_repository" / "palm" / "1" / "model_card.json"


def section(
    input_shape: list[int] | None = None,
    output_shape: list[int] | None = None,
    *,
    input_type: str = "UINT8",
    output_type: str = "FP32",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "inputs": [{"name": "pixels", "datatype": input_type, "shape": input_shape or [-1, 3, 256, 256]}],
        "outputs": [{"name": "boxes", "datatype": output_type, "shape": output_shape or [-1, 100, 6]}],
        **extra,
    }


def test_the_shipped_palm_card_states_palms_contract() -> None:
    card = json.loads(PALM_CARD.read_text())

    contract = ModelContract.from_card(card["contract"], source=str(PALM_CARD))

    assert contract == ModelContract(tile_size=512, top_k=2048, input_name="images", output_name="detections")
    assert contract.tile_shape == (3, 512, 512)
    assert contract.tile_bytes == 3 * 512 * 512


def test_another_models_card_states_its_own() -> None:
    contract = ModelContract.from_card(markers.card()["contract"], source="card")  # type: ignore[arg-type]

    assert (contract.tile_size, contract.top_k) == (markers.TILE, markers.K)
    assert (contract.input_name, contract.output_name) == (markers.INPUT, markers.OUTPUT)
    assert contract.describe() == "pixels UINT8 [N, 3, 256, 256] -> boxes FP32 [N, 100, 6]"


def test_a_server_describes_the_same_contract_with_its_batch_dimension() -> None:
    contract = ModelContract.from_tensors(
        [TensorSpec("pixels", "UINT8", (-1, 3, 256, 256))],
        [TensorSpec("boxes", "FP32", (-1, 100, 6))],
        source="Triton",
    )

    assert contract == ModelContract(256, 100, "pixels", "boxes")


@pytest.mark.parametrize(
    ("contract_section", "message"),
    [
        (section([-1, 4, 256, 256]), "has 4 channels; the gateway sends RGB"),
        (section([-1, 3, 256, 320]), "is 256 x 320; the gateway cuts square tiles"),
        (section([3, 256, 256]), "expected [N, 3, S, S] (a leading batch dimension"),
        (section(input_type="FP32"), "input 'pixels' is FP32, expected UINT8"),
        (section(output_type="FP16"), "output 'boxes' is FP16, expected FP32"),
        (section(output_shape=[-1, 100, 5]), "expected [N, K, 6] with a fixed K"),
        (section(output_shape=[-1, -1, 6]), "expected [N, K, 6] with a fixed K"),
        (section(top_k=2048), "contract.top_k is 2048 but the output shape has K 100"),
        ({"inputs": [{"name": "pixels"}], "outputs": []}, "must list tensors with a name, a datatype"),
        ({**section(), "outputs": []}, "one input and one output, got 1 input(s) and 0 output(s)"),
    ],
)
def test_off_contract_descriptions_are_refused_naming_what_is_wrong(
    contract_section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContractError) as raised:
        ModelContract.from_card(contract_section, source="my/1/model_card.json")

    assert message in str(raised.value)
    assert str(raised.value).startswith("my/1/model_card.json: ")


def test_differences_name_both_values() -> None:
    card = ModelContract(256, 100, "pixels", "boxes")
    served = ModelContract(320, 100, "pixels", "detections")

    assert card.differences(served) == ["tile size 256 vs 320", "output name 'boxes' vs 'detections'"]
    assert card.differences(card) == []
