"""open_runtime sizes the engine by the served model's card (a fake backend stands in for Triton here;
tests/integration/test_any_model.py does the same against a real tritonserver)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.options import PredictOptions
from gateway.pipeline.contract import ContractError
from gateway.runtime import open_runtime
from gateway.settings import DecodeSettings, Settings, TritonSettings
from tests import markers
from tests.factories import make_geotiff
from tests.fakes import FakeInference


def settings_for(repository: Path, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        triton=TritonSettings(model_name=markers.NAME, model_repository=repository, model_config_name=""),
        decode=DecodeSettings(workers=1, file_timeout_s=60),
    )


def no_boxes(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return np.zeros((markers.K, 6), np.float32)


async def test_the_cards_contract_sizes_the_decode_workers_and_the_grid(tmp_path: Path) -> None:
    settings = settings_for(markers.write_repository(tmp_path / "repo"), tmp_path / "data")
    backend = FakeInference(no_boxes)
    image = make_geotiff(tmp_path / "six.tif", width=600, height=500)

    async with open_runtime(settings, inference=backend) as runtime:
        result = await runtime.predictor.predict_file(image, image.name, PredictOptions(0.5))

    assert runtime.decode.tile_size == 256
    assert [c.name for c in runtime.model.categories] == ["red_marker", "green_marker", "blue_marker"]
    assert runtime.predictor.tiling_info(0.5).tile_size == 256
    assert result.tiles_total == 9
    assert backend.tiles_seen == 9


async def test_a_model_nobody_describes_does_not_start(tmp_path: Path) -> None:
    settings = settings_for(markers.write_repository(tmp_path / "repo", with_card=False), tmp_path / "data")

    with pytest.raises(ContractError, match="the contract of model 'markers' is unknown"):
        async with open_runtime(settings, inference=FakeInference(no_boxes)):
            pass


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_configured_triton_that_cannot_be_asked_leaves_the_card_unchecked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(markers.write_repository(tmp_path / "repo"), tmp_path / "data")
    settings.triton.url = f"127.0.0.1:{closed_port()}"

    with caplog.at_level(logging.WARNING, logger="gateway.runtime"):
        async with open_runtime(settings) as runtime:
            assert runtime.model.contract.tile_size == 256
            assert runtime.decode.tile_size == 256
            assert not await runtime.inference.model_ready()

    assert "cannot ask Triton at 127.0.0.1" in caplog.text


async def test_without_a_card_a_configured_triton_that_cannot_be_asked_stops_the_start(
    tmp_path: Path,
) -> None:
    settings = settings_for(markers.write_repository(tmp_path / "repo", with_card=False), tmp_path / "data")
    settings.triton.url = f"127.0.0.1:{closed_port()}"

    with pytest.raises(ContractError, match=r"states none .* and Triton's model metadata could not be read"):
        async with open_runtime(settings):
            pass
