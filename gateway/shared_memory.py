"""Where a batch of tiles lies in shared memory: the value the decode workers, the Triton client and
the predictor pass between them (see :mod:`gateway.decode.arena` for the regions themselves)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SharedTiles:
    """Where a batch's pixels lie in shared memory: what a server needs to read them in place.

    Attributes:
        region: the region's name, also its registration name with Triton.
        key: the POSIX shared-memory key (``/<region>``).
        region_bytes: the size of the whole region.
        offset: where this batch starts in the region.
        nbytes: the batch's size (``n * 3 * S * S``, ``S`` the model's tile side).
    """

    region: str
    key: str
    region_bytes: int
    offset: int
    nbytes: int
