"""Where ``triton.url`` comes from: arguments, then ``PALM_TRITON__URL``, then ``PALM_TRITON_URL``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, TritonSettings


@pytest.fixture(autouse=True)
def no_triton_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PALM_TRITON_URL", "PALM_TRITON__URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def both_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALM_TRITON__URL", "nested:8001")
    monkeypatch.setenv("PALM_TRITON_URL", "alias:8001")


@pytest.mark.usefixtures("both_names")
@pytest.mark.parametrize("url", ["explicit:8001", None])
def test_explicit_triton_settings_win_over_both_environment_names(url: str | None) -> None:
    assert Settings(triton=TritonSettings(url=url)).triton.url == url


@pytest.mark.usefixtures("both_names")
def test_an_explicit_url_key_wins_and_keeps_the_other_triton_fields() -> None:
    settings = Settings(triton={"url": None, "batch_size": 2})  # type: ignore[arg-type]

    assert settings.triton.url is None
    assert settings.triton.batch_size == 2


@pytest.mark.usefixtures("both_names")
def test_the_nested_name_wins_over_the_alias() -> None:
    assert Settings().triton.url == "nested:8001"


def test_the_alias_alone_sets_the_url_next_to_other_arguments_and_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PALM_TRITON_URL", "alias:8001")
    monkeypatch.setenv("PALM_TRITON__BATCH_SIZE", "8")

    settings = Settings(data_dir=tmp_path)

    assert settings.triton.url == "alias:8001"
    assert settings.triton.batch_size == 8
    assert settings.data_dir == tmp_path


@pytest.mark.parametrize("alias", [None, ""])
def test_without_a_url_the_embedded_server_is_chosen(
    monkeypatch: pytest.MonkeyPatch, alias: str | None
) -> None:
    if alias is not None:
        monkeypatch.setenv("PALM_TRITON_URL", alias)

    assert Settings().triton.url is None
