"""Async gRPC client for the served model on Triton, with errors in the gateway's own terms.

One ``grpc.aio`` channel carries everything. Control calls (ready, metadata, config, statistics) use
the stub generated in ``tritonclient.grpc``; ``ModelInfer`` sends bytes from
:class:`~gateway.triton.codecs.InferRequestEncoder` (one copy of the tiles instead of four in
``tritonclient.grpc.aio.InferenceServerClient.infer``'s path). Measured gain: docs/performance.md,
"Request encoding and malloc".

Shared memory: when a batch already lies in a ``/dev/shm`` region (the decode workers write there, see
:mod:`gateway.decode.arena`), the request names the region and offset instead of carrying the tiles
(768 KiB each at 512 px), and the server reads them in place. Measured gain: docs/performance.md, "Serving"
(row 3) and "What was done to get here". Regions are registered with Triton on first use
(``SystemSharedMemoryRegister``) and again after a server restart forgot them. A server that cannot map
the region (another host or container) refuses the registration once; from then on that region is
sent over gRPC like any array. ``TritonSettings.shared_memory = "off"`` never tries.

Error translation, the only place ``tritonclient``/``grpc`` errors become ours::

    grpc UNAVAILABLE, CANCELLED by the server, RESOURCE_EXHAUSTED,
    "model not ready/unknown"                          -> InferenceUnavailable (503, Retry-After)
    grpc DEADLINE_EXCEEDED while connected             -> InferenceTimeout     (503, Retry-After)
    grpc DEADLINE_EXCEEDED, server never reached       -> InferenceUnavailable
    any other status, or a response off the contract   -> InferenceError       (502)

Every call has a deadline (``settings.request_timeout_s`` unless given), and calls never wait for a
connection that is down (``wait_for_ready`` off), so an unreachable server fails fast.

Every infer call carries a priority level (the request parameter ``priority`` of Triton's
schedule-policy extension): :attr:`~gateway.scheduling.Priority.ONLINE` (1) by default,
:attr:`~gateway.scheduling.Priority.BATCH` (2) for a job's tiles. The model configs declare
``priority_levels: 2`` so the dynamic batcher serves level 1 first; a model without priority levels
treats every level as its default.

Tensor names and sizes come from the model's :class:`~gateway.pipeline.contract.ModelContract`: the
one the client was given (the runtime gives it the contract agreed between the model card and the
server), else the one the server's model metadata states, asked once on first use
(:meth:`TritonClient.served_contract`).

A client is bound to the event loop of its first call (a ``grpc.aio`` rule); create one per loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

# No gRPC call is ever made in a child of this process (decode workers are exec'd fresh), so gRPC's
# fork handlers protect nothing; enabled, they log a warning on each worker spawned during a call.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.errors import InferenceError, InferenceTimeout, InferenceUnavailable
from gateway.pipeline.contract import INPUT_DATATYPE, ContractError, ModelContract, TensorSpec
from gateway.scheduling import Priority
from gateway.settings import TritonSettings
from gateway.shared_memory import SharedTiles
from gateway.triton.codecs import InferRequestEncoder, check_tiles, decode_detections
from gateway.triton.malloc import tune_malloc

logger = logging.getLogger(__name__)

_MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # After a restart of the embedded server, reconnect within a second instead of gRPC's default
    # backoff that grows to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_UNAVAILABLE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
_NOT_READY_HINTS: Final = (
    "not ready",
    "unknown model",
    "is not found",
    "no available versions",
    "not available",
    "is not healthy",  # python-backend stub died; the embedded launcher restarts the server
    "unavailable",
)


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the server says about the model it serves."""

    name: str
    version: str
    platform: str
    backend: str
    max_batch_size: int


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """Cumulative counters of one model version since the server started.

    ``inference_count`` counts tiles, ``execution_count`` model executions: with dynamic batching the
    second is smaller. ``batch_executions`` maps an executed batch size to how often it ran.
    """

    inference_count: int
    execution_count: int
    success_count: int
    failure_count: int
    queue_ns: int
    compute_infer_ns: int
    batch_executions: dict[int, int] = field(default_factory=dict)


class TritonClient:
    """Talks to one Triton gRPC endpoint about one model.

    Example::

        async with TritonClient(triton.grpc_url, settings.triton) as client:
            detections = await client.infer(tiles)  # [N, K, 6] float32

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        settings: Model name/version and ``request_timeout_s``.
        contract: the model's tensors; ``None`` asks the server on first use.
        retry_after_s: ``Retry-After`` carried by the unavailability errors.
        malloc_tuning: Call :func:`~gateway.triton.malloc.tune_malloc` for this process (idempotent):
            multi-megabyte buffers reuse heap pages instead of a fresh ``mmap`` each. Measured gain:
            docs/performance.md, "Request encoding and malloc".
    """

    def __init__(
        self,
        url: str,
        settings: TritonSettings | None = None,
        *,
        contract: ModelContract | None = None,
        retry_after_s: int = 5,
        malloc_tuning: bool = True,
    ) -> None:
        self.url = url
        self.settings = settings or TritonSettings()
        self.retry_after_s = retry_after_s
        self._encoder: InferRequestEncoder | None = None
        if contract is not None:
            self.use_contract(contract)
        self._contract_lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._infer_call: Any = None
        self._registered: set[str] = set()
        self._refused: set[str] = set()
        self._register_lock = asyncio.Lock()
        self.metrics_url: str | None = None
        """Where this server's Prometheus metrics are, when known (set by whoever started or found it)."""
        if malloc_tuning:
            tune_malloc()

    @property
    def contract(self) -> ModelContract | None:
        """The tensors this client sends and expects; ``None`` until given or asked of the server."""
        return None if self._encoder is None else self._encoder.contract

    def use_contract(self, contract: ModelContract) -> None:
        """Name, shape and check every later call's tensors by ``contract``."""
        self._encoder = InferRequestEncoder(self.settings.model_name, contract, self.settings.model_version)

    # -- inference ----------------------------------------------------------------------------------

    async def infer(
        self,
        tiles: npt.NDArray[np.uint8],
        *,
        shared: SharedTiles | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        priority: int = Priority.ONLINE,
    ) -> npt.NDArray[np.float32]:
        """Run the model on a batch of tiles.

        Args:
            tiles: uint8 ``[N, 3, S, S]``, C-contiguous to avoid a copy. N may exceed the model's
                ``max_batch_size`` only if the server allows it; send at most that many per call.
            shared: where ``tiles`` lie in shared memory; the server reads them there if it can map
                the region, and ``tiles`` is sent otherwise. The memory must stay unchanged until
                this call returns (and, if it fails, until its deadline has passed).
            timeout_s: Deadline of this call; ``settings.request_timeout_s`` when ``None``.
            request_id: Echoed by Triton in its logs and response.
            priority: The request's priority level at Triton: a :class:`~gateway.scheduling.Priority`
                (1, online, is served first); 0 leaves the model's default level.

        Returns:
            Read-only float32 ``[N, K, 6]``: ``x1, y1, x2, y2, score, class_id`` per detection slot.

        Raises:
            TypeError: ``tiles`` is not uint8.
            ValueError: ``tiles`` does not have shape ``[N, 3, S, S]``, or ``priority`` is negative.
            InferenceUnavailable: The server is unreachable or the model not ready.
            InferenceTimeout: The deadline passed while the server was working on it.
            InferenceError: The server answered with an error, or with an off-contract output (or, asked
                for the model's contract, described one the gateway cannot serve).
        """
        if priority < 0:
            raise ValueError(f"a priority level is at least 0, got {priority}")
        batch = tiles.shape[0]
        self._connect()
        deadline = self._deadline(timeout_s)
        encoder = await self._encoder_for(deadline)
        contract = encoder.contract
        if shared is not None and await self._usable(shared, deadline):
            response = await self._infer_shared(
                check_tiles(tiles, contract).shape, shared, deadline, request_id, priority, contract
            )
            if response is not None:
                return self._detections(response, batch, contract)
        payload = encoder.encode(tiles, request_id, priority=priority)
        try:
            response = await self._infer_call(payload, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, f"infer of {batch} tile(s)") from exc
        return self._detections(response, batch, contract)

    async def _encoder_for(self, deadline: float) -> InferRequestEncoder:
        """The encoder of the model's contract, asking the server for it on first use."""
        if self._encoder is None:
            async with self._contract_lock:
                if self._encoder is None:
                    try:
                        self.use_contract(await self.served_contract(timeout_s=deadline))
                    except ContractError as exc:
                        raise InferenceError(str(exc)) from exc
        assert self._encoder is not None
        return self._encoder

    async def _infer_shared(
        self,
        shape: tuple[int, ...],
        shared: SharedTiles,
        deadline: float,
        request_id: str,
        priority: int,
        contract: ModelContract,
    ) -> Any:
        """The response to an infer whose input the server reads from ``shared``; ``None`` if the
        server no longer accepts the region (then the caller sends the tiles)."""
        batch = shape[0]
        payload = self._shared_request(shape, shared, request_id, priority, contract)
        for attempt in (1, 2):
            try:
                return await self._infer_call(payload, timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                if attempt == 2 or not _region_unknown(exc):
                    raise self._translate(exc, f"infer of {batch} tile(s)") from exc
            # The server restarted and forgot the region: register it again, once.
            self._registered.discard(shared.region)
            if not await self._usable(shared, deadline):
                return None
        return None

    def _shared_request(
        self,
        shape: tuple[int, ...],
        shared: SharedTiles,
        request_id: str,
        priority: int,
        contract: ModelContract,
    ) -> bytes:
        """A ``ModelInferRequest`` whose input is read from ``shared`` (a few hundred bytes)."""
        request = service_pb2.ModelInferRequest(
            model_name=self.settings.model_name, model_version=self.settings.model_version, id=request_id
        )
        if priority:
            request.parameters["priority"].uint64_param = priority
        tensor = request.inputs.add(name=contract.input_name, datatype=INPUT_DATATYPE, shape=list(shape))
        tensor.parameters["shared_memory_region"].string_param = shared.region
        tensor.parameters["shared_memory_byte_size"].int64_param = shared.nbytes
        tensor.parameters["shared_memory_offset"].int64_param = shared.offset
        request.outputs.add(name=contract.output_name)
        return bytes(request.SerializeToString())

    async def _usable(self, shared: SharedTiles, deadline: float) -> bool:
        """Whether the server reads ``shared``'s region in place (registering it on first use)."""
        if self.settings.shared_memory == "off" or shared.region in self._refused:
            return False
        if shared.region in self._registered:
            return True
        async with self._register_lock:
            if shared.region in self._registered or shared.region in self._refused:
                return shared.region in self._registered
            request = service_pb2.SystemSharedMemoryRegisterRequest(
                name=shared.region, key=shared.key, offset=0, byte_size=shared.region_bytes
            )
            try:
                await self._stub.SystemSharedMemoryRegister(request, timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    self._registered.add(shared.region)
                    return True
                if exc.code() in _UNAVAILABLE_CODES or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise self._translate(exc, "shared-memory registration") from exc
                logger.warning(
                    "Triton at %s cannot map shared memory %s (%s); sending tiles over gRPC instead",
                    self.url,
                    shared.key,
                    (exc.details() or exc.code().name).strip(),
                )
                self._refused.add(shared.region)
                return False
            self._registered.add(shared.region)
            return True

    def _detections(self, response: Any, batch: int, contract: ModelContract) -> npt.NDArray[np.float32]:
        for index, output in enumerate(response.outputs):
            if output.name != contract.output_name:
                continue
            if index >= len(response.raw_output_contents):
                break
            try:
                return decode_detections(
                    response.raw_output_contents[index],
                    datatype=output.datatype,
                    shape=list(output.shape),
                    batch=batch,
                    contract=contract,
                )
            except ValueError as exc:
                raise InferenceError(f"Triton at {self.url}: {exc}") from exc
        raise InferenceError(f"Triton at {self.url} returned no raw {contract.output_name!r} output")

    # -- control plane ------------------------------------------------------------------------------

    async def model_ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server is reachable and reports the model version ready.

        Never raises for an unreachable or failing server: that is simply "not ready".
        """
        self._connect()
        request = service_pb2.ModelReadyRequest(
            name=self.settings.model_name, version=self.settings.model_version
        )
        try:
            response = await self._stub.ModelReady(request, timeout=self._deadline(timeout_s))
        except grpc.aio.AioRpcError as exc:
            logger.debug("model_ready on %s: %s %s", self.url, exc.code(), exc.details())
            return False
        return bool(response.ready)

    async def model_info(self, *, timeout_s: float | None = None) -> ServedModel:
        """Name, version, platform and backend of the served model.

        Raises:
            InferenceUnavailable: The server is unreachable or the model not loaded.
            InferenceTimeout: No answer within the deadline.
            InferenceError: Any other server error.
        """
        self._connect()
        name, version = self.settings.model_name, self.settings.model_version
        deadline = self._deadline(timeout_s)
        try:
            metadata, config = await asyncio.gather(
                self._stub.ModelMetadata(
                    service_pb2.ModelMetadataRequest(name=name, version=version), timeout=deadline
                ),
                self._stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=name, version=version), timeout=deadline
                ),
            )
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, "model metadata") from exc
        served = (
            version if version in metadata.versions else (metadata.versions[-1] if metadata.versions else "")
        )
        return ServedModel(
            name=metadata.name,
            version=served,
            platform=metadata.platform,
            backend=config.config.backend,
            max_batch_size=int(config.config.max_batch_size),
        )

    async def served_contract(self, *, timeout_s: float | None = None) -> ModelContract:
        """The model's tensors as the server's model metadata states them.

        Raises:
            ContractError: the server describes tensors off the contract the gateway serves.
            InferenceUnavailable: The server is unreachable or the model not loaded.
            InferenceTimeout: No answer within the deadline.
            InferenceError: Any other server error.
        """
        self._connect()
        name, version = self.settings.model_name, self.settings.model_version
        try:
            metadata = await self._stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=name, version=version),
                timeout=self._deadline(timeout_s),
            )
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, "model metadata") from exc

        def tensors(entries: Any) -> list[TensorSpec]:
            return [TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in entries]

        return ModelContract.from_tensors(
            tensors(metadata.inputs),
            tensors(metadata.outputs),
            source=f"model {name!r} on Triton at {self.url}",
        )

    async def statistics(self, *, timeout_s: float | None = None) -> ModelStatistics:
        """Triton's cumulative inference statistics for the model version.

        Raises:
            InferenceUnavailable: The server is unreachable or the model not loaded.
            InferenceTimeout: No answer within the deadline.
            InferenceError: Any other server error.
        """
        self._connect()
        request = service_pb2.ModelStatisticsRequest(
            name=self.settings.model_name, version=self.settings.model_version
        )
        try:
            response = await self._stub.ModelStatistics(request, timeout=self._deadline(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, "model statistics") from exc
        if not response.model_stats:
            raise InferenceUnavailable(
                f"Triton at {self.url} has no statistics for {self.settings.model_name!r}",
                retry_after_s=self.retry_after_s,
            )
        stats = response.model_stats[0]
        inference = stats.inference_stats
        return ModelStatistics(
            inference_count=int(stats.inference_count),
            execution_count=int(stats.execution_count),
            success_count=int(inference.success.count),
            failure_count=int(inference.fail.count),
            queue_ns=int(inference.queue.ns),
            compute_infer_ns=int(inference.compute_infer.ns),
            batch_executions={int(b.batch_size): int(b.compute_infer.count) for b in stats.batch_stats},
        )

    # -- lifecycle ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Unregister our shared-memory regions (best effort) and close the channel; in-flight calls are
        cancelled. Idempotent."""
        channel, self._channel = self._channel, None
        stub, self._stub, self._infer_call = self._stub, None, None
        regions, self._registered = sorted(self._registered), set()
        if channel is None:
            return
        for region in regions:
            request = service_pb2.SystemSharedMemoryUnregisterRequest(name=region)
            try:
                await stub.SystemSharedMemoryUnregister(request, timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                logger.debug("unregistering %s from %s: %s", region, self.url, exc.code().name)
        await channel.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Create the channel on first use, inside the running loop (grpc.aio binds it there)."""
        if self._channel is not None:
            return
        self._channel = grpc.aio.insecure_channel(self.url, options=list(CHANNEL_OPTIONS))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer_call = self._channel.unary_unary(
            _MODEL_INFER,
            request_serializer=None,  # payload is already bytes
            response_deserializer=service_pb2.ModelInferResponse.FromString,
            _registered_method=True,
        )

    def _deadline(self, timeout_s: float | None) -> float:
        return self.settings.request_timeout_s if timeout_s is None else timeout_s

    def _translate(self, exc: grpc.aio.AioRpcError, what: str) -> InferenceUnavailable | InferenceError:
        """Map a gRPC failure to the gateway's error tree (see the module docstring)."""
        code = exc.code()
        details = (exc.details() or "").strip()
        where = f"Triton at {self.url}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if self._connected():
                return InferenceTimeout(
                    f"{where}: {what} exceeded its deadline", retry_after_s=self.retry_after_s
                )
            return InferenceUnavailable(
                f"{where} is not reachable ({what} timed out before a connection was made)",
                retry_after_s=self.retry_after_s,
            )
        if code in _UNAVAILABLE_CODES:
            return InferenceUnavailable(
                f"{where} is unavailable ({what}: {code.name}: {details})", retry_after_s=self.retry_after_s
            )
        lowered = details.lower()
        if self.settings.model_name in details and any(hint in lowered for hint in _NOT_READY_HINTS):
            return InferenceUnavailable(
                f"{where}: model {self.settings.model_name!r} is not ready ({details})",
                retry_after_s=self.retry_after_s,
            )
        return InferenceError(f"{where}: {what} failed: {code.name}: {details}")

    def _connected(self) -> bool:
        channel = self._channel
        return channel is not None and channel.get_state() == grpc.ChannelConnectivity.READY


def _region_unknown(exc: grpc.aio.AioRpcError) -> bool:
    """Whether Triton refused a call because it does not know a shared-memory region (it restarted)."""
    details = (exc.details() or "").lower()
    return "shared memory region" in details and ("unable to find" in details or "not registered" in details)
