"""gRPC failures become the gateway's errors; nothing from grpc/tritonclient leaks out.

A real ``grpc.aio`` server on 127.0.0.1 plays Triton and answers with a chosen status; the client is
called through its public methods.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.errors import GatewayError, InferenceError, InferenceTimeout, InferenceUnavailable
from gateway.settings import TritonSettings
from gateway.triton.client import TritonClient

TILES = np.zeros((1, 3, 512, 512), dtype=np.uint8)


class ScriptedTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ready, and fails infer and metadata calls with ``code``/``details`` after ``delay_s``."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.INTERNAL
        self.details = ""
        self.delay_s = 0.0

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await asyncio.sleep(self.delay_s)
        await context.abort(self.code, self.details)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._fail(context)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._fail(context)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._fail(context)


@pytest.fixture
async def triton() -> AsyncIterator[tuple[ScriptedTriton, str]]:
    servicer = ScriptedTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(grace=None)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that accepts TCP connections into its backlog and never answers (no HTTP/2 SETTINGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def make_client(url: str) -> TritonClient:
    return TritonClient(url, TritonSettings(), retry_after_s=3, malloc_tuning=False)


async def infer(client: TritonClient) -> object:
    return await client.infer(TILES, timeout_s=5.0)


async def model_info(client: TritonClient) -> object:
    return await client.model_info(timeout_s=5.0)


@pytest.mark.parametrize("call", [infer, model_info])
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
async def test_status_codes_map_to_gateway_errors(
    triton: tuple[ScriptedTriton, str],
    call: Callable[[TritonClient], Awaitable[object]],
    code: grpc.StatusCode,
    details: str,
    expected: type[GatewayError],
) -> None:
    servicer, url = triton
    servicer.code, servicer.details = code, details

    async with make_client(url) as client:
        with pytest.raises(GatewayError) as raised:
            await call(client)

    error = raised.value
    assert type(error) is expected
    assert details in error.detail
    if isinstance(error, InferenceUnavailable):
        assert error.headers() == {"Retry-After": "3"}
        assert error.status == 503
    else:
        assert error.status == 502


async def test_deadline_while_connected_is_a_timeout(triton: tuple[ScriptedTriton, str]) -> None:
    servicer, url = triton
    servicer.delay_s = 5.0

    async with make_client(url) as client:
        assert await client.model_ready()
        with pytest.raises(InferenceTimeout) as raised:
            await client.infer(TILES, timeout_s=0.3)

    assert "exceeded its deadline" in raised.value.detail
    assert raised.value.headers() == {"Retry-After": "3"}


async def test_deadline_without_a_connection_is_unavailability_not_a_timeout(blackhole: str) -> None:
    async with make_client(blackhole) as client:
        with pytest.raises(InferenceUnavailable) as raised:
            # Shorter than the connection attempt's own timeout (the client's minimum reconnect backoff,
            # 100 ms), so the call's deadline is what ends it.
            await client.infer(TILES, timeout_s=0.05)

    assert type(raised.value) is InferenceUnavailable
    assert "not reachable" in raised.value.detail
    assert raised.value.headers() == {"Retry-After": "3"}


async def test_a_port_nobody_listens_on_is_unavailability() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"

    async with make_client(closed) as client:
        with pytest.raises(InferenceUnavailable) as raised:
            await client.model_info(timeout_s=5.0)

    assert type(raised.value) is InferenceUnavailable
    assert "UNAVAILABLE" in raised.value.detail
