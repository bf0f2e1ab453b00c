"""Is a file like the imagery the model was validated on? A per-file out-of-domain score (pure).

The model card's ``input_baseline`` (written by ``python -m export.baseline --card``) records, over the
model's held-out validation scenes, the mean ``mu_s`` and standard deviation ``sigma_s`` of each input
statistic ``s`` of :mod:`gateway.pipeline.inputs`, once per *variant* of the imagery the model was
validated on: ``colour``, and ``grey`` when the card also has ``input_baseline.grey`` (the luma of the
same scenes, for a model validated on 1-band imagery). A file's statistics ``x_s`` are

* ``channel_mean_{r,g,b}`` and ``channel_spread_{r,g,b}``: mean and standard deviation per channel;
* ``colourfulness``: mean of ``(|r - g| + |g - b| + |r - b|) / 3``;
* ``balance_rg = channel_mean_r - channel_mean_g`` and ``balance_bg = channel_mean_b - channel_mean_g``:
  the colour balance, which catches swapped bands (BGR for RGB) that leave each mean in range;

all in 8-bit levels, over the valid pixels of the tiles the model was given. The file's distance to a
variant ``v`` is the largest standardised deviation over the statistics that variant records::

    d_v = max_s |x_s - mu_vs| / max(sigma_vs, STD_FLOOR)

and the file's score is its distance to the nearest variant, ``score = min_v d_v``. The floor
(:data:`STD_FLOOR`, 2 levels) keeps a statistic that hardly varies over the validation scenes (the
colourfulness of grey imagery, exactly 0) from turning a rounding difference into an alarm. A file is
*out of domain* when ``score > threshold``: the card's ``out_of_domain.threshold``, else
:data:`DEFAULT_THRESHOLD`. The threshold is calibrated on generated in-domain scenes (``python -m
export.domain``: docs/model.md). Validity (``valid_fraction``) and ground sample distance are not part of
the score: nodata is not a domain shift, and resolution has its own check.

A model whose card has no ``input_baseline`` gets no score and no warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.pipeline.inputs import InputSummary

STD_FLOOR: Final = 2.0
"""Smallest standard deviation a statistic is judged with, in 8-bit levels."""
DEFAULT_THRESHOLD: Final = 5.0
"""The threshold for a card that records a baseline but no calibrated threshold."""
STATISTICS: Final = (
    "channel_mean_r",
    "channel_mean_g",
    "channel_mean_b",
    "channel_spread_r",
    "channel_spread_g",
    "channel_spread_b",
    "colourfulness",
    "balance_rg",
    "balance_bg",
)
"""The statistics the score can use, in the order ties are broken (the first largest wins)."""


def statistics(summary: InputSummary) -> dict[str, float]:
    """A file's statistics by name (see the module docstring)."""
    r, g, b = summary.mean
    return {
        "channel_mean_r": r,
        "channel_mean_g": g,
        "channel_mean_b": b,
        "channel_spread_r": summary.spread[0],
        "channel_spread_g": summary.spread[1],
        "channel_spread_b": summary.spread[2],
        "colourfulness": summary.colourfulness,
        "balance_rg": r - g,
        "balance_bg": b - g,
    }


@dataclass(frozen=True, slots=True)
class Reference:
    """One statistic over the validation scenes of one variant."""

    mean: float
    std: float


@dataclass(frozen=True, slots=True)
class Variant:
    """The validation imagery of one kind (``colour``, ``grey``): a reference per statistic."""

    name: str
    references: Mapping[str, Reference]


@dataclass(frozen=True, slots=True)
class DomainBaseline:
    """What the score compares a file with: the validated variants and the threshold."""

    variants: tuple[Variant, ...]
    threshold: float = DEFAULT_THRESHOLD

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> DomainBaseline | None:
        """The baseline from a model card (its ``input_baseline`` and ``out_of_domain`` sections);
        ``None`` when it has no baseline or one that records none of :data:`STATISTICS`.

        Raises:
            KeyError: a statistic lacks its ``mean`` or ``std``.
            ValueError: one of them is not a number.
        """
        section = card.get("input_baseline")
        if not section:
            return None
        variants = []
        for name, stats in (
            ("colour", section.get("statistics")),
            ("grey", (section.get("grey") or {}).get("statistics")),
        ):
            if not stats:
                continue
            refs = {
                s: Reference(float(stats[s]["mean"]), float(stats[s]["std"]))
                for s in STATISTICS
                if s in stats
            }
            if refs:
                variants.append(Variant(name, refs))
        if not variants:
            return None
        threshold = (card.get("out_of_domain") or {}).get("threshold", DEFAULT_THRESHOLD)
        return cls(tuple(variants), float(threshold))


@dataclass(frozen=True, slots=True)
class DomainCheck:
    """The outcome for one file.

    Attributes:
        score: the distance to the nearest validated variant, in (floored) standard deviations.
        threshold: above it, the file is out of domain.
        variant: the nearest variant (``colour`` or ``grey``).
        statistic: the statistic farthest from that variant's validation scenes (what drove the score).
        value: the file's value of that statistic.
        reference: the validation scenes' mean of it.
    """

    score: float
    threshold: float
    variant: str
    statistic: str
    value: float
    reference: float

    @property
    def out_of_domain(self) -> bool:
        return self.score > self.threshold

    def to_json(self) -> dict[str, Any]:
        """The ``out_of_domain`` object of the responses."""
        return {
            "score": self.score,
            "threshold": self.threshold,
            "flagged": self.out_of_domain,
            "statistic": self.statistic,
            "value": self.value,
            "baseline_mean": self.reference,
            "variant": self.variant,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DomainCheck:
        return cls(
            score=float(data["score"]),
            threshold=float(data["threshold"]),
            variant=str(data["variant"]),
            statistic=str(data["statistic"]),
            value=float(data["value"]),
            reference=float(data["baseline_mean"]),
        )

    def warning(self) -> str:
        """The warning a flagged file carries in every output format."""
        return (
            f"out of domain: the image's input statistics are {self.score:.1f} standard deviations from "
            f"the imagery the model was validated on (threshold {self.threshold:g}; {self.statistic} "
            f"{self.value:.1f}, validation mean {self.reference:.1f}); detections may be unreliable"
        )


def assess(summary: InputSummary, baseline: DomainBaseline) -> DomainCheck:
    """Score one file against ``baseline`` (the rule is in the module docstring)."""
    values = statistics(summary)
    best: DomainCheck | None = None
    for variant in baseline.variants:
        worst: DomainCheck | None = None
        for name in STATISTICS:
            ref = variant.references.get(name)
            if ref is None:
                continue
            z = abs(values[name] - ref.mean) / max(ref.std, STD_FLOOR)
            if worst is None or z > worst.score:
                worst = DomainCheck(
                    round(z, 2), baseline.threshold, variant.name, name, round(values[name], 3), ref.mean
                )
        if worst is not None and (best is None or worst.score < best.score):
            best = worst
    assert best is not None  # from_card keeps only variants with at least one statistic
    return best
