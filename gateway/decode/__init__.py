"""Isolated raster decoding: worker processes that turn files into tile batches (see ``pool.py``)."""

from gateway.decode.pool import DecodePool, DecodeSession, TileBatch
from gateway.decode.sync import SyncDecodePool, SyncDecodeSession

__all__ = ["DecodePool", "DecodeSession", "SyncDecodePool", "SyncDecodeSession", "TileBatch"]
