"""The hand-written ModelInferRequest bytes are exactly what protobuf would produce."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from gateway.pipeline.contract import ModelContract
from gateway.triton.codecs import InferRequestEncoder, check_tiles, decode_detections
from gateway.triton.malloc import tune_malloc

PALM = ModelContract(tile_size=512, top_k=512, input_name="images", output_name="detections")
MARKERS = ModelContract(tile_size=256, top_k=100, input_name="pixels", output_name="boxes")


def tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 512, 512), dtype=np.uint8)


@pytest.mark.parametrize("batch", [1, 3, 16, 200])
def test_encoded_request_parses_as_model_infer_request(batch: int) -> None:
    x = tiles(batch) if batch < 200 else np.zeros((batch, 3, 512, 512), np.uint8)

    request = service_pb2.ModelInferRequest.FromString(InferRequestEncoder("palm", PALM, "1").encode(x))

    assert (request.model_name, request.model_version, request.id) == ("palm", "1", "")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("images", "UINT8", [batch, 3, 512, 512])
    assert [o.name for o in request.outputs] == ["detections"]
    (raw,) = request.raw_input_contents
    assert raw == x.tobytes()


def test_another_model_is_encoded_with_its_own_names_and_tile_side() -> None:
    x = np.zeros((2, 3, 256, 256), np.uint8)

    request = service_pb2.ModelInferRequest.FromString(InferRequestEncoder("markers", MARKERS).encode(x))

    (tensor,) = request.inputs
    assert (tensor.name, list(tensor.shape)) == ("pixels", [2, 3, 256, 256])
    assert [o.name for o in request.outputs] == ["boxes"]
    with pytest.raises(ValueError, match=r"\[N>=1, 3, 256, 256\]"):
        InferRequestEncoder("markers", MARKERS).encode(tiles(1))


def test_encoding_matches_protobuf_byte_for_byte() -> None:
    x = tiles(2)
    expected = service_pb2.ModelInferRequest(model_name="palm", model_version="1", id="req-7")
    tensor = expected.inputs.add(name="images", datatype="UINT8")
    tensor.shape.extend(x.shape)
    expected.outputs.add(name="detections")
    expected.raw_input_contents.append(x.tobytes())

    encoded = InferRequestEncoder("palm", PALM, "1").encode(x, request_id="req-7")

    assert encoded == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("priority", [1, 2, 2**40])
def test_a_priority_is_the_request_parameter_triton_reads(priority: int) -> None:
    x = tiles(1)
    expected = service_pb2.ModelInferRequest(model_name="palm", model_version="1", id="req-8")
    expected.parameters["priority"].uint64_param = priority
    tensor = expected.inputs.add(name="images", datatype="UINT8")
    tensor.shape.extend(x.shape)
    expected.outputs.add(name="detections")
    expected.raw_input_contents.append(x.tobytes())

    encoded = InferRequestEncoder("palm", PALM, "1").encode(x, request_id="req-8", priority=priority)

    assert encoded == expected.SerializeToString(deterministic=True)
    assert service_pb2.ModelInferRequest.FromString(encoded).parameters["priority"].uint64_param == priority


def test_priority_zero_leaves_the_model_default() -> None:
    request = service_pb2.ModelInferRequest.FromString(
        InferRequestEncoder("palm", PALM).encode(tiles(1), priority=0)
    )
    assert "priority" not in request.parameters


def test_a_negative_priority_is_refused() -> None:
    with pytest.raises(ValueError, match="priority"):
        InferRequestEncoder("palm", PALM).encode(tiles(1), priority=-1)


def test_empty_version_is_omitted() -> None:
    request = service_pb2.ModelInferRequest.FromString(InferRequestEncoder("palm", PALM).encode(tiles(1)))
    assert request.model_version == ""


def test_non_contiguous_tiles_are_sent_in_logical_order() -> None:
    base = tiles(4, seed=3)
    strided = base[::2]
    assert not strided.flags.c_contiguous

    request = service_pb2.ModelInferRequest.FromString(InferRequestEncoder("palm", PALM, "1").encode(strided))

    assert request.raw_input_contents[0] == np.ascontiguousarray(strided).tobytes()


@pytest.mark.parametrize(
    ("array", "error"),
    [
        (np.zeros((1, 3, 512, 512), np.float32), TypeError),
        (np.zeros((3, 512, 512), np.uint8), ValueError),
        (np.zeros((1, 512, 512, 3), np.uint8), ValueError),
        (np.zeros((0, 3, 512, 512), np.uint8), ValueError),
        ([[0]], TypeError),
    ],
)
def test_off_contract_tiles_are_refused(array: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_tiles(array, PALM)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [100, 2048])
def test_decode_detections_takes_the_rows_the_model_has(k: int) -> None:
    contract = ModelContract(tile_size=512, top_k=k, input_name="images", output_name="detections")
    out = decode_detections(
        b"\0" * (2 * k * 6 * 4), datatype="FP32", shape=[2, k, 6], batch=2, contract=contract
    )
    assert out.shape == (2, k, 6)


def test_decode_detections_refuses_another_k_than_the_contract_states() -> None:
    with pytest.raises(ValueError, match=r"'boxes' is FP32 \[2, 512, 6\], expected FP32 \[2, 100, 6\]"):
        decode_detections(
            b"\0" * (2 * 512 * 6 * 4), datatype="FP32", shape=[2, 512, 6], batch=2, contract=MARKERS
        )


def test_decode_detections_is_a_read_only_view() -> None:
    expected = np.random.default_rng(1).random((3, 512, 6), dtype=np.float32)
    raw = expected.tobytes()

    out = decode_detections(raw, datatype="FP32", shape=[3, 512, 6], batch=3, contract=PALM)

    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32
    assert not out.flags.writeable


@pytest.mark.parametrize(
    ("datatype", "shape", "nbytes"),
    [
        ("FP16", [2, 512, 6], 2 * 512 * 6 * 4),
        ("FP32", [1, 512, 6], 1 * 512 * 6 * 4),
        ("FP32", [2, 100, 5], 2 * 100 * 5 * 4),
        ("FP32", [2, 0, 6], 0),
        ("FP32", [2, 512], 2 * 512 * 4),
        ("FP32", [2, 512, 6], 100),
    ],
)
def test_decode_detections_refuses_off_contract_outputs(datatype: str, shape: list[int], nbytes: int) -> None:
    with pytest.raises(ValueError, match="detections"):
        decode_detections(b"\0" * nbytes, datatype=datatype, shape=shape, batch=2, contract=PALM)


def test_tune_malloc_is_accepted_by_glibc_and_idempotent() -> None:
    assert tune_malloc() is True
    assert tune_malloc() is True
