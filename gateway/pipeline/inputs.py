"""What the model was shown: statistics of a file's 8-bit tile input, for drift monitoring (pure numpy).

The decode worker feeds every tile it cuts to an :class:`InputStatistics`; the file's summary travels
back with the end of the stream. Each tile is sampled on a 4-pixel grid inside the image (never its
padding), so the cost is a few hundredths of the tile's decode. For a tile ``x`` of channels
``r, g, b`` over its valid sampled pixels:

* ``mean[c]``, ``spread[c]``: mean and standard deviation of channel ``c`` (0 to 255);
* ``colourfulness``: the mean of ``(|r - g| + |g - b| + |r - b|) / 3`` (0 for a grey image);
* ``valid_fraction``: valid sampled pixels over all sampled pixels, fully masked tiles included.

The same numbers over the model's validation scenes are its baseline (the model card's
``input_baseline``); live values far from it mean the model is being shown something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

STRIDE = 4
CHANNELS = ("r", "g", "b")


@dataclass(frozen=True, slots=True)
class InputSummary:
    """A file's input statistics (see the module docstring)."""

    mean: tuple[float, float, float]
    spread: tuple[float, float, float]
    colourfulness: float
    valid_fraction: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "spread": list(self.spread),
            "colourfulness": self.colourfulness,
            "valid_fraction": self.valid_fraction,
        }

    @classmethod
    def from_wire(cls, values: dict[str, Any]) -> InputSummary:
        mean = [float(v) for v in values["mean"]]
        spread = [float(v) for v in values["spread"]]
        return cls(
            mean=(mean[0], mean[1], mean[2]),
            spread=(spread[0], spread[1], spread[2]),
            colourfulness=float(values["colourfulness"]),
            valid_fraction=float(values["valid_fraction"]),
        )


@dataclass(slots=True)
class InputStatistics:
    """Accumulates :class:`InputSummary` over the tiles of one file."""

    _sum: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(3))
    _sumsq: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(3))
    _colour: float = 0.0
    _valid: int = 0
    _sampled: int = 0

    def expect(self, width: int, height: int) -> None:
        """A tile of the file's grid, ``width x height`` of it inside the image: its sampled pixels
        count towards the valid fraction whether or not it is ever cut (fully masked tiles are not)."""
        self._sampled += len(range(0, height, STRIDE)) * len(range(0, width, STRIDE))

    def add(
        self, pixels: npt.NDArray[np.uint8], valid: npt.NDArray[np.bool_] | None, width: int, height: int
    ) -> None:
        """One tile that was cut: ``pixels`` ``(3, S, S)``, ``valid`` ``(S, S)`` or ``None``, the image
        part of it ``width x height`` (the rest is padding)."""
        sample = pixels[:, :height:STRIDE, :width:STRIDE].reshape(3, -1).astype(np.float64)
        if valid is not None:
            sample = sample[:, valid[:height:STRIDE, :width:STRIDE].ravel()]
        if sample.shape[1] == 0:
            return
        self._valid += sample.shape[1]
        self._sum += sample.sum(axis=1)
        self._sumsq += np.square(sample).sum(axis=1)
        r, g, b = sample
        self._colour += float((np.abs(r - g) + np.abs(g - b) + np.abs(r - b)).sum() / 3)

    def summary(self) -> InputSummary | None:
        """The file's summary, or ``None`` when no pixel was valid."""
        if not self._valid:
            return None
        mean = self._sum / self._valid
        spread = np.sqrt(np.maximum(self._sumsq / self._valid - np.square(mean), 0.0))
        return InputSummary(
            mean=(round(float(mean[0]), 3), round(float(mean[1]), 3), round(float(mean[2]), 3)),
            spread=(round(float(spread[0]), 3), round(float(spread[1]), 3), round(float(spread[2]), 3)),
            colourfulness=round(self._colour / self._valid, 3),
            valid_fraction=round(self._valid / self._sampled, 4) if self._sampled else 0.0,
        )
