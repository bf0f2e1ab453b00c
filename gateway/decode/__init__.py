"""Isolated raster decoding: worker processes that turn files into tile batches (see ``pool.py``)."""

from gateway.decode.pool import DecodePool
from gateway.decode.session import DecodeSession, Quicklook, StreamPlan, TileBatch
from gateway.decode.sync import SyncDecodePool, SyncDecodeSession

__all__ = [
    "DecodePool",
    "DecodeSession",
    "Quicklook",
    "StreamPlan",
    "SyncDecodePool",
    "SyncDecodeSession",
    "TileBatch",
]
