"""Bytes on the wire of an inference call, without extra copies; and malloc tuning.

The served model's :class:`~gateway.pipeline.contract.ModelContract` names the tensors and their sizes:
input UINT8 ``[N, 3, S, S]``, output FP32 ``[N, K, 6]`` with rows ``(x1, y1, x2, y2, score, class_id)``
(``images``, ``detections``, ``S`` = 512 and ``K`` = 2048 for palm 1.x). Tiles and answers off that
contract are refused here.

Why encode by hand: ``tritonclient``'s ``InferInput.set_data_from_numpy`` copies the array into
``bytes``, protobuf copies it into the message and again when serialising, and gRPC copies it once more.
:class:`InferRequestEncoder` writes the few header bytes of a ``ModelInferRequest`` itself (cached per
batch size) and appends the tile buffer as field 7 (``raw_input_contents``) with a single copy. gRPC's
Python API only accepts ``bytes`` for a request, so that one copy cannot be avoided, and a reusable
buffer cannot be handed over either; :func:`tune_malloc` makes the allocation cheap instead. Measured
gain of both: docs/performance.md, "Request encoding and malloc".

Wire format (proto3, ``grpc_service.proto``)::

    ModelInferRequest   1 model_name  2 model_version  3 id  4 parameters  5 inputs  6 outputs
                        7 raw_input_contents
    parameters          map<string, InferParameter>: one entry message per key, 1 key  2 value
    InferParameter      oneof 1 bool_param  2 int64_param  3 string_param  4 double_param
                        5 uint64_param
    InferInputTensor    1 name  2 datatype  3 shape (packed int64)
    InferRequestedOutputTensor  1 name

The only request parameter written is ``priority`` (``uint64_param``): Triton's schedule-policy
extension reads it as the request's priority level (1 is served first; 0 or none: the model's
``default_priority_level``).

This module is pure: no ``tritonclient`` import, no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.pipeline.contract import DETECTION_FIELDS, INPUT_DATATYPE, OUTPUT_DATATYPE, ModelContract

logger = logging.getLogger(__name__)

_WIRE_VARINT: Final = 0
_WIRE_LEN: Final = 2  # length-delimited wire type
_UINT64_PARAM: Final = 5  # InferParameter.uint64_param


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: tag, length, payload."""
    return _varint(number << 3 | _WIRE_LEN) + _varint(len(payload)) + payload


def priority_parameter(priority: int) -> bytes:
    """The ``parameters`` entry (field 4) ``{"priority": uint64_param}``; empty for ``priority`` 0.

    Raises:
        ValueError: ``priority`` is negative.
    """
    if priority < 0:
        raise ValueError(f"a priority level is at least 0, got {priority}")
    if priority == 0:
        return b""
    value = _varint(_UINT64_PARAM << 3 | _WIRE_VARINT) + _varint(priority)
    return _field(4, _field(1, b"priority") + _field(2, value))


def check_tiles(tiles: npt.NDArray[np.uint8], contract: ModelContract) -> npt.NDArray[np.uint8]:
    """Validate a batch of tiles against the model's input contract.

    Args:
        tiles: uint8 array ``[N, 3, S, S]``, N >= 1.
        contract: the served model's tensors (``S``).

    Returns:
        The same array if it is C-contiguous, else a C-contiguous copy.

    Raises:
        TypeError: Not a numpy array, or not uint8 (never send float32: 4x the bytes).
        ValueError: Wrong shape or an empty batch.
    """
    if not isinstance(tiles, np.ndarray):
        raise TypeError(f"tiles must be a numpy array, got {type(tiles).__name__}")
    if tiles.dtype != np.uint8:
        raise TypeError(f"tiles must be uint8, got {tiles.dtype}")
    if tiles.ndim != 4 or tuple(tiles.shape[1:]) != contract.tile_shape or tiles.shape[0] < 1:
        shape = ", ".join(map(str, contract.tile_shape))
        raise ValueError(f"tiles must have shape [N>=1, {shape}], got {list(tiles.shape)}")
    return np.ascontiguousarray(tiles)


class InferRequestEncoder:
    """Serialises ``ModelInferRequest`` messages for one model, copying the tiles exactly once.

    Measured gain over tritonclient's path: docs/performance.md, "Request encoding and malloc".

    Args:
        model_name: Triton model name.
        contract: the model's tensors: input and output names, tile shape.
        model_version: Version string; empty selects the server's policy.
    """

    def __init__(self, model_name: str, contract: ModelContract, model_version: str = "") -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.contract = contract
        prefix = _field(1, model_name.encode())
        if model_version:
            prefix += _field(2, model_version.encode())
        self._prefix = prefix
        self._requested_output = _field(6, _field(1, contract.output_name.encode()))
        self._headers: dict[int, bytes] = {}
        self._parameters: dict[int, bytes] = {}

    def _header(self, batch: int) -> bytes:
        header = self._headers.get(batch)
        if header is None:
            shape = b"".join(_varint(d) for d in (batch, *self.contract.tile_shape))
            name = self.contract.input_name.encode()
            tensor = _field(1, name) + _field(2, INPUT_DATATYPE.encode()) + _field(3, shape)
            header = _field(5, tensor) + self._requested_output
            if len(self._headers) < 256:
                self._headers[batch] = header
        return header

    def encode(self, tiles: npt.NDArray[np.uint8], request_id: str = "", *, priority: int = 0) -> bytes:
        """The serialised request for ``tiles``.

        Args:
            tiles: uint8 ``[N, 3, S, S]``; a non-contiguous array costs one more copy.
            request_id: Optional id Triton echoes back and logs.
            priority: The request's priority level at Triton (1 is served first); 0 sends none, and
                the model's default level applies.

        Returns:
            Protobuf bytes, ready for the ``ModelInfer`` RPC.

        Raises:
            TypeError: See :func:`check_tiles`.
            ValueError: See :func:`check_tiles`; or ``priority`` is negative.
        """
        tiles = check_tiles(tiles, self.contract)
        request_field = _field(3, request_id.encode()) if request_id else b""
        parameters = self._parameters.get(priority)
        if parameters is None:
            parameters = priority_parameter(priority)
            if len(self._parameters) < 16:
                self._parameters[priority] = parameters
        raw = memoryview(tiles.data).cast("B")
        return b"".join(
            (
                self._prefix,
                request_field,
                parameters,
                self._header(tiles.shape[0]),
                _varint(7 << 3 | _WIRE_LEN),
                _varint(raw.nbytes),
                raw,
            )
        )


def decode_detections(
    raw: bytes, *, datatype: str, shape: Sequence[int], batch: int, contract: ModelContract
) -> npt.NDArray[np.float32]:
    """Turn the raw detections output of a response into an array, without copying.

    Args:
        raw: The output's ``raw_output_contents`` entry.
        datatype: The datatype Triton reported for it.
        shape: The shape Triton reported for it.
        batch: The number of tiles that were sent.
        contract: the model's tensors (the output's name and ``K``).

    Returns:
        A read-only float32 view ``[batch, K, 6]`` over ``raw``; copy it before modifying.

    Raises:
        ValueError: The output does not follow the model contract.
    """
    name = contract.output_name
    expected = (batch, contract.top_k, DETECTION_FIELDS)
    if datatype != OUTPUT_DATATYPE or tuple(shape) != expected:
        raise ValueError(
            f"output {name!r} is {datatype} {list(shape)}, expected {OUTPUT_DATATYPE} {list(expected)}"
        )
    expected_bytes = int(np.prod(expected)) * 4
    if len(raw) != expected_bytes:
        raise ValueError(f"output {name!r} has {len(raw)} bytes, expected {expected_bytes}")
    return np.frombuffer(raw, dtype="<f4").reshape(expected)
