"""The served model's tensor contract: what the gateway sends it and what it must answer (pure; no I/O).

Any detector is served the same way::

    input   <input_name>   UINT8 [N, 3, S, S]   RGB, channel-first, 0..255 (normalisation is the model's)
    output  <output_name>  FP32  [N, K, 6]      x1, y1, x2, y2, score, class_id in tile pixels,
                                                score-sorted descending, all-zero rows as padding

``S`` (the tile side) and ``K`` (rows per tile) are the model's choice. The model card's ``contract``
section states them (:meth:`ModelContract.from_card`); Triton's model metadata states them too
(:meth:`ModelContract.from_tensors` over what the server reports), and the two must agree
(:meth:`ModelContract.differences`). Everything that cuts, moves or reads tiles takes its sizes from a
:class:`ModelContract`, never from a constant. The full contract, with an example card, is
``docs/bring-your-own-model.md``.

Errors::

    ContractError (ValueError)       a card or a server describes tensors the gateway cannot serve
    └── ContractMismatch             the card and the server disagree (both values named)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

CHANNELS: Final = 3
"""The gateway reads every raster into RGB (docs/raster-policy.md); a model takes three channels."""
INPUT_DATATYPE: Final = "UINT8"
OUTPUT_DATATYPE: Final = "FP32"
DETECTION_FIELDS: Final = 6
"""``x1, y1, x2, y2, score, class_id``."""


class ContractError(ValueError):
    """A model card or a server describes tensors outside the contract the gateway serves."""


class ContractMismatch(ContractError):
    """The model card and the server's model configuration describe different tensors."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor as a card or a server describes it; ``-1`` marks a variable size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelContract:
    """The tensors of one served model (see the module docstring).

    Attributes:
        tile_size: ``S``, the side of the square tiles the model takes.
        top_k: ``K``, the detection rows the model returns per tile.
        input_name: the name of the ``UINT8 [N, 3, S, S]`` input.
        output_name: the name of the ``FP32 [N, K, 6]`` output.

    Raises:
        ContractError: a size is not positive, or a name is empty.
    """

    tile_size: int
    top_k: int
    input_name: str
    output_name: str

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.top_k < 1:
            raise ContractError(
                f"tile size and K must be positive, got tile size {self.tile_size} and K {self.top_k}"
            )
        if not self.input_name or not self.output_name:
            raise ContractError("the input and output tensors need names")

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """One tile as the model takes it: ``(3, S, S)``."""
        return (CHANNELS, self.tile_size, self.tile_size)

    @property
    def tile_bytes(self) -> int:
        """Bytes of one uint8 tile."""
        return CHANNELS * self.tile_size * self.tile_size

    def describe(self) -> str:
        """``images UINT8 [N, 3, 512, 512] -> detections FP32 [N, 2048, 6]``."""
        s, k = self.tile_size, self.top_k
        return (
            f"{self.input_name} {INPUT_DATATYPE} [N, {CHANNELS}, {s}, {s}] -> "
            f"{self.output_name} {OUTPUT_DATATYPE} [N, {k}, {DETECTION_FIELDS}]"
        )

    def differences(self, other: ModelContract) -> list[str]:
        """What differs between this contract and ``other``, each naming both values."""
        return [
            f"{label} {mine!r} vs {theirs!r}"
            for label, mine, theirs in (
                ("tile size", self.tile_size, other.tile_size),
                ("K", self.top_k, other.top_k),
                ("input name", self.input_name, other.input_name),
                ("output name", self.output_name, other.output_name),
            )
            if mine != theirs
        ]

    @classmethod
    def from_tensors(
        cls, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *, source: str
    ) -> ModelContract:
        """The contract of a model with these tensors; shapes may lead with the batch dimension.

        Args:
            inputs: the model's inputs (exactly one).
            outputs: the model's outputs (exactly one).
            source: where the description came from, for error messages (a card's path, a server).

        Raises:
            ContractError: naming the tensor and what it should be.
        """
        if len(inputs) != 1 or len(outputs) != 1:
            raise ContractError(
                f"{source}: a served model has one input and one output, got {len(inputs)} input(s) "
                f"and {len(outputs)} output(s)"
            )
        (image,), (detections,) = inputs, outputs
        side = _tile_side(image, source)
        rows = _rows(detections, source)
        return cls(tile_size=side, top_k=rows, input_name=image.name, output_name=detections.name)

    @classmethod
    def from_card(cls, section: Mapping[str, Any], *, source: str) -> ModelContract:
        """The contract stated in a model card's ``contract`` section.

        The section lists ``inputs`` and ``outputs`` as ``{"name", "datatype", "shape"}`` objects; a
        ``top_k`` entry, when present, must equal the output's ``K``.

        Raises:
            ContractError: a field is missing or off the contract (naming it).
        """
        try:
            inputs = [_tensor(t) for t in section["inputs"]]
            outputs = [_tensor(t) for t in section["outputs"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(
                f"{source}: contract.inputs and contract.outputs must list tensors with a name, a "
                f"datatype and a shape ({type(exc).__name__}: {exc})"
            ) from exc
        contract = cls.from_tensors(inputs, outputs, source=source)
        stated = section.get("top_k")
        if stated is not None and stated != contract.top_k:
            raise ContractError(
                f"{source}: contract.top_k is {stated!r} but the output shape has K {contract.top_k}"
            )
        return contract


def _tensor(entry: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(str(entry["name"]), str(entry["datatype"]), tuple(int(d) for d in entry["shape"]))


def _without_batch(tensor: TensorSpec, dims: int, source: str, expected: str) -> tuple[int, ...]:
    """The tensor's shape after its leading batch dimension (which must be there)."""
    if len(tensor.shape) != dims + 1:
        raise ContractError(
            f"{source}: {tensor.name!r} has shape {list(tensor.shape)}, expected {expected} (a leading "
            "batch dimension: in Triton, max_batch_size above 0)"
        )
    return tensor.shape[1:]


def _tile_side(tensor: TensorSpec, source: str) -> int:
    expected = f"[N, {CHANNELS}, S, S]"
    channels, height, width = _without_batch(tensor, 3, source, expected)
    if tensor.datatype != INPUT_DATATYPE:
        raise ContractError(
            f"{source}: input {tensor.name!r} is {tensor.datatype}, expected {INPUT_DATATYPE} "
            "(0..255; normalise inside the model)"
        )
    if channels != CHANNELS:
        raise ContractError(
            f"{source}: input {tensor.name!r} has {channels} channels; the gateway sends RGB, "
            f"{expected} with {CHANNELS} channels"
        )
    if height != width or height < 1:
        raise ContractError(
            f"{source}: input {tensor.name!r} is {height} x {width}; the gateway cuts square tiles of a "
            f"fixed side, {expected}"
        )
    return height


def _rows(tensor: TensorSpec, source: str) -> int:
    expected = f"[N, K, {DETECTION_FIELDS}]"
    rows, fields = _without_batch(tensor, 2, source, expected)
    if tensor.datatype != OUTPUT_DATATYPE:
        raise ContractError(
            f"{source}: output {tensor.name!r} is {tensor.datatype}, expected {OUTPUT_DATATYPE}"
        )
    if fields != DETECTION_FIELDS or rows < 1:
        raise ContractError(
            f"{source}: output {tensor.name!r} has shape {list(tensor.shape)}, expected {expected} with a "
            "fixed K (x1, y1, x2, y2, score, class_id per row)"
        )
    return rows
