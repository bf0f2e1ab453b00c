"""The wire format between the gateway and its decode workers (JSON metadata, raw pixel payloads).

Requests (gateway → worker, stdin): one JSON object per line, ``{"op": ...}``:

* ``open``: ``path``, ``options`` (:class:`ReadOptions` fields), ``limits`` (:class:`LimitSettings`).
* ``tiles``: ``specs`` (lists of :class:`TileSpec` fields, the tile side among them), ``batch_size``,
  optional ``first_batch``; or, instead of ``specs``, ``grid`` (``[tile, overlap]``): the worker cuts
  :func:`~gateway.pipeline.tiling.tile_grid` of the opened raster itself (at its ``read_width`` x
  ``read_height``: resampled when its GSD is finer than the model's) and balances the batch size
  (:func:`~gateway.pipeline.tiling.balanced_batch`). A ``grid`` request may be sent right behind
  ``open`` without waiting for ``info`` (one round trip less); if that ``open`` failed, it is ignored.
  Optional ``quicklook_max_side``: paint the streamed tiles into a quicklook of at most that side too
  (:class:`~gateway.pipeline.raster.quicklook.TileCanvas`), sent just before ``end``.
* ``cancel``: stop the current ``tiles`` stream after the batch in flight.
* ``quicklook``: ``max_side``: render the open raster as an RGBA PNG whose longest side is at most
  ``max_side`` (:mod:`gateway.pipeline.raster.quicklook`); only between streams, never during one.
* ``close``: close the open raster.
* ``free`` (``slots``): these slots of the worker's shared-memory region may be written again. Sent
  whenever the gateway is done with a batch, so it may arrive between or inside any other request.

Replies (worker → gateway, the worker's original stdout): frames of a 12-byte header
``<u32 meta length><u64 payload length>``, a JSON object, then the payload bytes:

* ``ready`` (``pid``) once at start; ``info`` (``info``: :class:`RasterInfo` fields) after ``open``;
* ``batch`` (``indices`` into the ``specs`` sent, ``slot``: the shared-memory slot now holding the
  tiles as ``uint8 [n, 3, S, S]``, ``valid``: whether masks follow) with, if ``valid``, the
  payload ``bool [n, S, S]`` (``S``: the tile side of the worker's region);
* ``end`` (``skipped``, ``cancelled``, ``inputs``: the statistics of the tiles sent, see
  :mod:`gateway.pipeline.inputs`) after the last batch; ``closed`` after ``close``;
* ``quicklook`` (``width``, ``height``) with the PNG as payload, after a ``quicklook`` request or, for a
  ``tiles`` request that asked for one, right before its ``end``;
* ``error`` (``error``: a GatewayError class name, ``detail``, ``extensions``, ``recycle``: the worker
  exits after sending it).

Metadata is JSON, never pickle, so a worker compromised by a hostile file cannot make the gateway run
code by what it sends back; sizes are checked against what was asked for before anything is read, and
a batch may only name a slot the worker holds.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, fields
from typing import Any, Final

from gateway.errors import (
    CorruptRaster,
    DecoderFailed,
    GatewayError,
    InvalidParameter,
    RasterTooLarge,
    ResolutionOutOfRange,
    UnsupportedMediaType,
    UnsupportedRaster,
)
from gateway.pipeline.raster import RasterInfo, ReadOptions
from gateway.pipeline.resolution import ResolutionRequest
from gateway.pipeline.tiling import TileSpec

HEADER: Final = struct.Struct("<IQ")
MAX_META_BYTES: Final = 1024 * 1024

ERRORS: Final[dict[str, type[GatewayError]]] = {
    cls.__name__: cls
    for cls in (
        UnsupportedMediaType,
        CorruptRaster,
        UnsupportedRaster,
        RasterTooLarge,
        InvalidParameter,
        ResolutionOutOfRange,
        DecoderFailed,
    )
}
"""The only error types a worker may report; anything else becomes :class:`DecoderFailed`."""


def mask_bytes(tile_size: int) -> int:
    """Payload bytes of one tile's validity mask (``bool [S, S]``)."""
    return tile_size * tile_size


def request(op: str, **fields_: Any) -> bytes:
    """One request line."""
    return json.dumps({"op": op, **fields_}, separators=(",", ":")).encode() + b"\n"


def frame(meta: dict[str, Any], payload_length: int = 0) -> bytes:
    """Header and metadata of one reply; ``payload_length`` bytes must follow."""
    body = json.dumps(meta, separators=(",", ":")).encode()
    return HEADER.pack(len(body), payload_length) + body


def spec_to_wire(spec: TileSpec) -> list[int | bool]:
    return [getattr(spec, f.name) for f in fields(TileSpec)]


def spec_from_wire(values: list[Any]) -> TileSpec:
    names = [f.name for f in fields(TileSpec)]
    if len(values) != len(names):
        raise ValueError(f"a tile spec has {len(names)} fields, got {len(values)}")
    return TileSpec(**dict(zip(names, values, strict=True)))


def options_to_wire(options: ReadOptions) -> dict[str, Any]:
    resolution = options.resolution
    return {**asdict(options), "resolution": None if resolution is None else resolution.to_wire()}


def options_from_wire(values: dict[str, Any]) -> ReadOptions:
    bands = values.get("bands")
    drivers = values.get("drivers")
    resolution = values.get("resolution")
    return ReadOptions(
        bands=tuple(int(b) for b in bands) if bands is not None else None,
        max_pixels=values.get("max_pixels"),
        drivers=tuple(str(d) for d in drivers) if drivers is not None else None,
        resolution=ResolutionRequest.from_wire(resolution) if resolution is not None else None,
    )


def info_to_wire(info: RasterInfo) -> dict[str, Any]:
    return asdict(info)


def info_from_wire(values: dict[str, Any]) -> RasterInfo:
    """Rebuild a :class:`RasterInfo` (JSON turned its tuples into lists)."""

    def tup(value: Any) -> Any:
        return tuple(tup(v) for v in value) if isinstance(value, list) else value

    known = {f.name for f in fields(RasterInfo)}
    return RasterInfo(**{k: tup(v) for k, v in values.items() if k in known})


def error_to_wire(exc: GatewayError, *, recycle: bool = False) -> dict[str, Any]:
    name = type(exc).__name__ if type(exc).__name__ in ERRORS else "DecoderFailed"
    return {
        "kind": "error",
        "error": name,
        "detail": exc.detail,
        "extensions": exc.extensions,
        "recycle": recycle,
    }


def error_from_wire(meta: dict[str, Any]) -> GatewayError:
    cls = ERRORS.get(str(meta.get("error")), DecoderFailed)
    extensions = meta.get("extensions")
    detail = str(meta.get("detail") or "The decoder failed on this file.")
    return cls(detail, **(extensions if isinstance(extensions, dict) else {}))
