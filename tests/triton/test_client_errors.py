"""gRPC failures become the gateway's errors; nothing from grpc/tritonclient leaks out."""

from __future__ import annotations

import grpc
import pytest

from gateway.errors import InferenceError, InferenceTimeout, InferenceUnavailable
from gateway.settings import TritonSettings
from gateway.triton.client import TritonClient


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.fixture
def client() -> TritonClient:
    return TritonClient("127.0.0.1:1", TritonSettings(), retry_after_s=3, malloc_tuning=False)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", InferenceUnavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", InferenceUnavailable),
        (grpc.StatusCode.CANCELLED, "server shutting down", InferenceUnavailable),
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'palm' is not found", InferenceUnavailable),
        (grpc.StatusCode.INVALID_ARGUMENT, "requested model 'palm' is not available", InferenceUnavailable),
        (grpc.StatusCode.INTERNAL, "Stub process 'palm_0_0' is not healthy.", InferenceUnavailable),
        (grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'images'", InferenceError),
        (grpc.StatusCode.INTERNAL, "onnxruntime failed", InferenceError),
    ],
)
def test_status_codes_map_to_gateway_errors(
    client: TritonClient, code: grpc.StatusCode, details: str, expected: type[Exception]
) -> None:
    error = client._translate(rpc_error(code, details), "infer")

    assert type(error) is expected
    assert details in error.detail
    if isinstance(error, InferenceUnavailable):
        assert error.headers() == {"Retry-After": "3"}
        assert error.status == 503
    else:
        assert error.status == 502


def test_deadline_without_a_connection_is_unavailability_not_a_timeout(client: TritonClient) -> None:
    error = client._translate(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "infer")

    assert type(error) is InferenceUnavailable
    assert "not reachable" in error.detail


def test_deadline_while_connected_is_a_timeout(client: TritonClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "_connected", lambda: True)

    error = client._translate(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "infer")

    assert type(error) is InferenceTimeout
    assert error.headers() == {"Retry-After": "3"}
