"""The one fake inference backend of the unit tests (integration tests use a real Triton)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from gateway.errors import InferenceUnavailable
from gateway.pipeline.contract import ModelContract
from gateway.scheduling import Priority

K = 64
"""Rows per tile the fake model returns."""
FAKE_CONTRACT = ModelContract(tile_size=512, top_k=K, input_name="images", output_name="detections")
"""The fake model's tensors: palm's tile side and names, :data:`K` rows."""

Rows = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]]
"""One tile ``uint8 [3, 512, 512]`` to its detection rows ``float32 [K, 6]``."""


class FakeInference:
    """Answers every tile with ``rows(tile)``; counts the tiles it saw and fails while ``fail`` is set.

    With ``delay_s`` each call takes that long, like a busy server. It records what a test of
    scheduling needs: the calls started (``calls``, and by priority in ``priorities``), those running
    now (``in_flight``), the most that ran at once (``peak``, overall and by priority) and the calls
    cancelled while running (``cancelled``).
    """

    def __init__(self, rows: Rows, *, delay_s: float = 0.0) -> None:
        self.rows = rows
        self.delay_s = delay_s
        self.tiles_seen = 0
        self.fail = False
        self.calls = 0
        self.cancelled = 0
        self.priorities: list[Priority] = []
        self.in_flight: Counter[Priority] = Counter()
        self.peak: Counter[Priority | None] = Counter()

    async def infer(
        self, tiles: npt.NDArray[np.uint8], *, priority: Priority = Priority.ONLINE, **transport: object
    ) -> npt.NDArray[np.float32]:
        if self.fail:
            raise InferenceUnavailable("scripted outage")
        self.calls += 1
        self.priorities.append(priority)
        self.in_flight[priority] += 1
        self.peak[priority] = max(self.peak[priority], self.in_flight[priority])
        self.peak[None] = max(self.peak[None], self.in_flight.total())
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight[priority] -= 1
        self.tiles_seen += tiles.shape[0]
        return np.stack([self.rows(tile) for tile in tiles])

    async def model_ready(self) -> bool:
        return not self.fail

    async def close(self) -> None:
        return None


def fixed_box(x1: float, y1: float, x2: float, y2: float, score: float = 0.9, category: int = 1) -> Rows:
    """Every tile gets the same one box."""

    def rows(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        out = np.zeros((K, 6), np.float32)
        out[0] = [x1, y1, x2, y2, score, category]
        return out

    return rows


def box_at_bright_spot(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """A 20 px box centred on the brightest pixel of the tile, if any pixel is bright."""
    out = np.zeros((K, 6), np.float32)
    grey = tile.max(axis=0)
    if grey.max() < 200:
        return out
    y, x = np.unravel_index(int(np.argmax(grey)), grey.shape)
    out[0] = [x - 10, y - 10, x + 10, y + 10, 0.9, 1]
    return out
