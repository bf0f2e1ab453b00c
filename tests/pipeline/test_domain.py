"""The out-of-domain score: the rule's arithmetic, grey as its own validated variant, the card's sections."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.model_card import load_model_info
from gateway.pipeline.domain import DEFAULT_THRESHOLD, STD_FLOOR, DomainBaseline, DomainCheck, assess
from gateway.pipeline.inputs import InputSummary
from gateway.settings import REPO_ROOT, TritonSettings
from tests.fakes import FAKE_CONTRACT


def stat(mean: float, std: float) -> dict[str, float]:
    return {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}


COLOUR = {
    "channel_mean_r": stat(126.7, 22.8),
    "channel_mean_g": stat(125.6, 15.5),
    "channel_mean_b": stat(81.8, 17.5),
    "channel_spread_r": stat(25.5, 10.0),
    "channel_spread_g": stat(20.0, 5.5),
    "channel_spread_b": stat(14.8, 6.4),
    "colourfulness": stat(36.5, 6.4),
    "balance_rg": stat(1.1, 17.0),
    "balance_bg": stat(-43.8, 11.4),
    "valid_fraction": stat(1.0, 0.0),
    "gsd_m": stat(0.45, 0.08),
}
GREY = {
    **{f"channel_mean_{c}": stat(120.9, 16.3) for c in "rgb"},
    **{f"channel_spread_{c}": stat(19.9, 6.5) for c in "rgb"},
    "colourfulness": stat(0.0, 0.0),
    "balance_rg": stat(0.0, 0.0),
    "balance_bg": stat(0.0, 0.0),
}


def card(grey: bool = True, threshold: float | None = 4.5) -> dict[str, Any]:
    section: dict[str, Any] = {"scenes": 40, "statistics": COLOUR}
    if grey:
        section["grey"] = {"statistics": GREY}
    content: dict[str, Any] = {"name": "palm", "input_baseline": section}
    if threshold is not None:
        content["out_of_domain"] = {"threshold": threshold}
    return content


def summary(
    mean: tuple[float, float, float], spread: tuple[float, float, float], colourfulness: float
) -> InputSummary:
    return InputSummary(mean=mean, spread=spread, colourfulness=colourfulness, valid_fraction=1.0)


def baseline_of(content: dict[str, Any]) -> DomainBaseline:
    baseline = DomainBaseline.from_card(content)
    assert baseline is not None
    return baseline


BASELINE = baseline_of(card())
TYPICAL = summary((126.7, 125.6, 81.8), (25.5, 20.0, 14.8), 36.5)


def test_the_typical_validation_scene_scores_zero() -> None:
    check = assess(TYPICAL, BASELINE)
    assert check.score == 0.0
    assert check.variant == "colour"
    assert not check.out_of_domain


def test_the_score_is_the_largest_standardised_deviation_and_names_its_statistic() -> None:
    # channel_mean_b 81.8 + 3 * 17.5 = 134.3 (z 3.0) is outdone by channel_spread_r 25.5 + 4 * 10 (z 4.0);
    # balance_bg moves with mean_b: (134.3 - 125.6 + 43.8) / 11.4 = 4.6 is the largest.
    check = assess(summary((126.7, 125.6, 134.3), (65.5, 20.0, 14.8), 36.5), BASELINE)
    assert check.statistic == "balance_bg"
    assert check.score == pytest.approx((134.3 - 125.6 + 43.8) / 11.4, abs=0.01)
    assert check.value == pytest.approx(134.3 - 125.6)
    assert check.reference == -43.8
    assert check.out_of_domain  # 4.61 > 4.5
    assert not assess(summary((126.7, 125.6, 81.8), (65.5, 20.0, 14.8), 36.5), BASELINE).out_of_domain


def test_grey_imagery_is_judged_against_the_grey_validation_scenes() -> None:
    grey = summary((118.0, 118.0, 118.0), (22.0, 22.0, 22.0), 0.0)
    check = assess(grey, BASELINE)
    assert check.variant == "grey"
    assert check.score < 1.0
    assert not check.out_of_domain
    # A card validated on colour only: the same grey file is far from its colourfulness (0 vs 36.5).
    colour_only = baseline_of(card(grey=False))
    check = assess(grey, colour_only)
    assert check.out_of_domain
    assert check.statistic == "colourfulness"
    assert check.score == pytest.approx(36.5 / 6.4, abs=0.01)


def test_a_statistic_that_never_varied_is_judged_with_the_floor() -> None:
    # The grey variant's colourfulness has std 0: a slightly tinted grey scan (1 level) scores 1 / floor.
    tinted = summary((120.9, 120.9, 120.9), (19.9, 19.9, 19.9), 1.0)
    check = assess(tinted, BASELINE)
    assert check.variant == "grey"
    assert check.statistic == "colourfulness"
    assert check.score == pytest.approx(1.0 / STD_FLOOR)


MEANS = {"channel_mean_r", "channel_mean_g", "channel_mean_b"}
SPREADS = {"channel_spread_r", "channel_spread_g", "channel_spread_b"}


@pytest.mark.parametrize(
    ("name", "inputs", "statistics"),
    [
        ("saturated", summary((252.0, 253.0, 250.0), (6.0, 5.0, 8.0), 2.0), MEANS),
        ("night", summary((20.0, 21.0, 14.0), (4.0, 4.0, 3.0), 5.0), MEANS),
        ("thermal, stretched", summary((120.0, 120.0, 120.0), (70.0, 70.0, 70.0), 0.0), SPREADS),
        ("a photo", summary((170.0, 150.0, 190.0), (60.0, 55.0, 70.0), 40.0), SPREADS | MEANS),
    ],
)
def test_foreign_inputs_are_out_of_domain(name: str, inputs: InputSummary, statistics: set[str]) -> None:
    check = assess(inputs, BASELINE)
    assert check.out_of_domain, name
    assert check.statistic in statistics


def test_bands_in_bgr_order_show_in_the_colour_balance_but_stay_under_this_threshold() -> None:
    # The limit of a per-statistic rule (docs/model.md): each mean stays in range; only balance_bg moves,
    # by (126.7 - 125.6 + 43.8) / 11.4 = 3.9 standard deviations.
    check = assess(summary((81.8, 125.6, 126.7), (14.8, 20.0, 25.5), 36.5), BASELINE)
    assert check.statistic == "balance_bg"
    assert check.score == pytest.approx(3.94, abs=0.01)
    assert not check.out_of_domain


def test_the_card_sets_the_threshold_and_a_card_without_one_gets_the_default() -> None:
    assert BASELINE.threshold == 4.5
    assert [v.name for v in BASELINE.variants] == ["colour", "grey"]
    default = baseline_of(card(threshold=None))
    assert default.threshold == DEFAULT_THRESHOLD
    # Only the statistics the score uses are read; validity and GSD are not part of it.
    assert "gsd_m" not in BASELINE.variants[0].references
    assert "valid_fraction" not in BASELINE.variants[0].references


def test_a_card_without_a_baseline_scores_nothing() -> None:
    assert DomainBaseline.from_card({"name": "palm"}) is None
    assert DomainBaseline.from_card({"input_baseline": {"statistics": {"gsd_m": stat(0.4, 0.1)}}}) is None
    with pytest.raises(KeyError):
        DomainBaseline.from_card({"input_baseline": {"statistics": {"colourfulness": {"std": 1.0}}}})


def test_the_check_round_trips_through_json_and_its_warning_names_score_and_statistic() -> None:
    check = assess(summary((252.0, 253.0, 250.0), (6.0, 5.0, 8.0), 2.0), BASELINE)
    assert DomainCheck.from_json(json.loads(json.dumps(check.to_json()))) == check
    assert check.to_json()["flagged"] is True
    assert f"{check.score:.1f} standard deviations" in check.warning()
    assert check.statistic in check.warning()
    assert "threshold 4.5" in check.warning()


def test_the_gateway_reads_the_baseline_from_the_model_card(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version = tmp_path / "palm" / "1"
    version.mkdir(parents=True)
    (version / "model_card.json").write_text(json.dumps({"sha256": "ab" * 32, **card()}))
    info = load_model_info(TritonSettings(model_repository=tmp_path), FAKE_CONTRACT)
    assert info.domain == BASELINE

    (version / "model_card.json").write_text(json.dumps({"sha256": "ab" * 32}))
    assert load_model_info(TritonSettings(model_repository=tmp_path), FAKE_CONTRACT).domain is None

    broken = card()
    broken["input_baseline"]["statistics"]["colourfulness"] = {"mean": "bright"}
    (version / "model_card.json").write_text(json.dumps({"sha256": "ab" * 32, **broken}))
    with caplog.at_level(logging.WARNING, logger="gateway.model_card"):
        info = load_model_info(TritonSettings(model_repository=tmp_path), FAKE_CONTRACT)
    assert info.domain is None
    assert info.sha256 == "ab" * 32
    assert "input_baseline" in caplog.text


def test_the_shipped_card_records_a_grey_variant_and_a_calibrated_threshold() -> None:
    shipped = json.loads((REPO_ROOT / "model_repository" / "palm" / "1" / "model_card.json").read_text())
    baseline = baseline_of(shipped)
    assert [v.name for v in baseline.variants] == ["colour", "grey"]
    assert baseline.threshold == shipped["out_of_domain"]["threshold"]
    assert shipped["out_of_domain"]["in_domain"]["false_alarm_rate"] < 0.01
