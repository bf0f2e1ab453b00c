"""Triton python backend for a detector in ONNX: the model on onnxruntime, CPU only.

Selected with ``tritonserver --model-config-name=cpu`` (``configs/cpu.pbtxt``); the production GPU path
(``config.pbtxt``) uses Triton's own onnxruntime backend and never loads this file.

Nothing here is specific to ``palm``: the tensor names and the tile shape are the model config's
(its one ``input`` and one ``output``), so any model that meets the gateway's contract (UINT8
``[N, 3, S, S]`` in, FP32 ``[N, K, 6]`` out; docs/bring-your-own-model.md) is served by a copy of this
file next to its ``model.onnx``.

Batching: Triton's dynamic batcher hands ``execute`` every request that waited in its queue. Their
input tensors are concatenated along the batch axis and run as ONE onnxruntime call, then the
detections are split back, request by request, in order. Tiles/s by batch size: docs/performance.md,
"Model" (one session on every core) and "What was done to get here" (single-threaded sessions).

I/O goes through DLPack only. The stub bundled with the ``nvidia-pytriton`` wheel was built against
numpy<2; with numpy 2 its ``as_numpy()`` reads zeros and ``Tensor(name, ndarray)`` sends empty tensors,
silently. ``np.from_dlpack(tensor)`` and ``Tensor.from_dlpack(name, capsule)`` are correct with
numpy>=2.4 (see ``_output_tensor`` for the one wrinkle left).

Threads: the CPU config runs two instances (two stub processes), each with its share of the cores
(cores / instances onnxruntime threads), i.e. one single-threaded session per core on a 2-core machine.
Under load that beats one instance using every core: a single-threaded call never waits at a barrier
for a thread the OS gave to the decoder, and while one instance hands its answer back the other
computes. Measured gain: docs/performance.md, "What was done to get here" (two single-threaded
instances). A lone tile would then take one core's time, so a call of at most ``solo_max_tiles`` tiles
that arrives while no other instance of this model is executing runs on a second session using every
core (measured gain: docs/performance.md, "Serving", single-tile stage medians) while that has lately
been faster than the instance's own share, which it is not while other work keeps the cores busy
(:class:`_LoneCalls`). Instances mark themselves busy in a tiny shared ``/dev/shm`` table
(:class:`_Lanes`); without it every call stays on its own threads.

Errors: a request that cannot be decoded gets its own error response; the others in the batch still
run. If onnxruntime itself fails, every request of that batch gets the error (they shared the call).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The stub renames a capsule it consumed to "used_dlpack"; numpy's capsule destructor only knows the
# standard "used_dltensor" and otherwise prints a ValueError traceback for every tensor (the memory is
# fine: the stub calls the DLPack deleter itself). Module-level bytes: the name must outlive capsules.
_STUB_USED_NAME = b"used_dlpack"
_STANDARD_USED_NAME = b"used_dltensor"
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid.restype = ctypes.c_int
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name.restype = ctypes.c_int

LANES_SLOTS = 64
LANES_ENV = "PALM_LANES_NAME"
"""Set by the gateway's launcher: the ``/dev/shm`` name of the busy table, which it removes on stop."""


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    """One ``parameters { key: ... value { string_value: ... } }`` entry of the model config."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value.strip() or default


def available_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class TritonPythonModel:
    """One model instance: an onnxruntime session on its share of the cores (and one on all of them)."""

    solo: Any = None
    lanes: _Lanes | None = None
    lone_calls: _LoneCalls
    solo_max_tiles = 0
    input_name = ""
    tile_shape: tuple[int, ...] = ()

    def initialize(self, args: dict[str, str]) -> None:
        """Load ``<model dir>/<version>/<onnx_file>`` into an onnxruntime CPU session.

        Config parameters (all optional, strings):
            ``onnx_file``: file name inside the version directory (default ``model.onnx``).
            ``intra_op_threads``: threads of one onnxruntime call; ``0`` or unset means every core this
                process may use (``os.sched_getaffinity``) divided by the instance count.
            ``solo_max_tiles``: a call of at most this many tiles made while no other instance is
                executing runs on every core (default ``1``; ``0`` disables). Only with more cores than
                ``intra_op_threads``.
        """
        self.model_config = config = json.loads(args["model_config"])
        self.logger = pb_utils.Logger
        self.name = str(config.get("name") or args.get("model_name") or "model")
        inputs, outputs = config.get("input", []), config.get("output", [])
        if len(inputs) != 1 or len(outputs) != 1:
            raise pb_utils.TritonModelException(
                f"{self.name}: the config must declare one input and one output, got "
                f"{len(inputs)} and {len(outputs)}"
            )
        self.input_name = str(inputs[0]["name"])
        self.tile_shape = tuple(int(d) for d in inputs[0]["dims"])
        onnx_file = _parameter(config, "onnx_file", "model.onnx")
        path = os.path.join(args["model_repository"], args["model_version"], onnx_file)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.name}: {path} does not exist")

        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        cores = available_cores()
        threads = int(_parameter(config, "intra_op_threads", "0"))
        if threads <= 0:
            threads = max(1, cores // instances)

        self.session = _session(path, threads)
        self.output_names = [str(outputs[0]["name"])]
        self.solo_max_tiles = max(0, int(_parameter(config, "solo_max_tiles", "1")))
        self.solo = None
        self.lanes = None
        self.lone_calls = _LoneCalls()
        if self.solo_max_tiles and cores > threads:
            self.lanes = _Lanes.open(args.get("model_instance_name", ""))
            if self.lanes is not None:
                self.solo = _session(path, cores)
        self.logger.log_info(
            f"{self.name}: loaded {path} on onnxruntime {ort.__version__} with {threads} intra-op threads"
            + (f"; calls of <= {self.solo_max_tiles} tiles on an idle server may use {cores}" if self.solo else "")
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run every valid request of this batch in one onnxruntime call; answer each in order."""
        responses: list[Any] = [None] * len(requests)
        batch: list[np.ndarray] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            try:
                batch.append(self._decode(request))
                owners.append(index)
            except Exception as exc:  # this request only: DLPack may raise TypeError/BufferError too
                responses[index] = _error_response(f"{self.name}: {exc}")

        if batch:
            images = batch[0] if len(batch) == 1 else np.concatenate(batch, axis=0)
            try:
                (detections,) = self._run(images)
            except Exception as exc:  # onnxruntime raises several unrelated types
                message = f"{self.name}: onnxruntime failed on a batch of {images.shape[0]} tiles: {exc}"
                self.logger.log_error(message)
                for index in owners:
                    responses[index] = _error_response(message)
            else:
                offset = 0
                for index, tiles in zip(owners, batch, strict=True):
                    count = tiles.shape[0]
                    part = np.ascontiguousarray(detections[offset : offset + count])
                    offset += count
                    try:
                        tensor = _output_tensor(self.output_names[0], part)
                    except Exception as exc:
                        responses[index] = _error_response(f"{self.name}: cannot return detections: {exc}")
                    else:
                        responses[index] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        """One onnxruntime call, on every core when it is small, nobody else is computing and every core
        has lately been the faster way for such a call (:class:`_LoneCalls`)."""
        if self.lanes is None:
            return self.session.run(self.output_names, {self.input_name: images})
        self.lanes.enter()
        try:
            if images.shape[0] > self.solo_max_tiles or self.lanes.others_busy():
                return self.session.run(self.output_names, {self.input_name: images})
            solo = self.lone_calls.pick_solo()
            started = time.perf_counter()
            outputs = (self.solo if solo else self.session).run(self.output_names, {self.input_name: images})
            self.lone_calls.record(solo, (time.perf_counter() - started) / images.shape[0])
            return outputs
        finally:
            self.lanes.leave()

    def finalize(self) -> None:
        """Release the sessions before the stub exits."""
        self.session = self.solo = None
        if self.lanes is not None:
            self.lanes.close()
            self.lanes = None

    def _decode(self, request: Any) -> np.ndarray:
        """The request's input as a uint8 [n, *dims] array (a view over Triton's memory)."""
        name = self.input_name
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"input {name!r} is missing")
        array = np.from_dlpack(tensor)
        if array.dtype != np.uint8:
            raise ValueError(f"input {name!r} must be UINT8, got {array.dtype}")
        if array.ndim != 1 + len(self.tile_shape) or tuple(array.shape[1:]) != self.tile_shape or not len(array):
            dims = ", ".join(map(str, self.tile_shape))
            raise ValueError(f"input {name!r} must be [N, {dims}], got {list(array.shape)}")
        return array


def _session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Triton owns the process; spinning threads would steal the cores the next batch needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class _LoneCalls:
    """Which session a lone call (at most ``solo_max_tiles`` tiles, no other instance computing) has
    lately run faster on: the one on every core or the instance's own share.

    Every core helps such a call only while the other cores are free for it. When the gateway, the
    decoders or anything else on the host keep them busy, onnxruntime's threads wait for one another
    and the call takes longer than on one core. So each lone call's time per tile goes into an
    exponentially weighted mean for its session, the next one runs on the faster, and every
    ``explore_every``-th runs on the other to keep its figure current.
    """

    def __init__(self, explore_every: int = 8, weight: float = 0.5) -> None:
        self.explore_every = explore_every
        self.weight = weight
        self.mean_s: dict[bool, float | None] = {True: None, False: None}
        self.calls = 0

    def pick_solo(self) -> bool:
        """Whether the next lone call runs on every core."""
        self.calls += 1
        solo, own = self.mean_s[True], self.mean_s[False]
        if solo is None or own is None:
            return solo is None
        faster = solo <= own
        return not faster if self.calls % self.explore_every == 0 else faster

    def record(self, solo: bool, seconds_per_tile: float) -> None:
        mean = self.mean_s[solo]
        self.mean_s[solo] = seconds_per_tile if mean is None else mean + self.weight * (seconds_per_tile - mean)


class _Lanes:
    """Which instances of this model are executing: one byte per instance in a shared ``/dev/shm`` file.

    Every instance of one server maps the same file: named by ``$PALM_LANES_NAME`` (the launcher sets
    it and removes the file when the server stops) or else by the server's pid. An instance sets its
    byte before it looks at the others, so two instances starting together both see the other busy
    (on x86 the store may still pass the load; the worst case is one oversubscribed call, never a
    wrong answer).
    """

    def __init__(self, path: str, view: mmap.mmap, slot: int) -> None:
        self.path = path
        self.view = view
        self.slot = slot

    @classmethod
    def open(cls, instance_name: str) -> _Lanes | None:
        """The table of this server, or ``None`` (no ``/dev/shm``, an unknown instance name)."""
        group, _, index = instance_name.rpartition("_")
        group_index = group.rpartition("_")[2]
        if not (index.isdigit() and group_index.isdigit()):
            return None
        slot = (int(group_index) * 8 + int(index)) % LANES_SLOTS
        name = os.environ.get(LANES_ENV) or f"palm_lanes_{os.getppid()}"
        path = os.path.join("/dev/shm", os.path.basename(name))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < LANES_SLOTS:
                os.ftruncate(fd, LANES_SLOTS)
            view = mmap.mmap(fd, LANES_SLOTS)
        except OSError:
            return None
        finally:
            os.close(fd)
        view[slot] = 0
        return cls(path, view, slot)

    def enter(self) -> None:
        self.view[self.slot] = 1

    def leave(self) -> None:
        self.view[self.slot] = 0

    def others_busy(self) -> bool:
        return self.view.find(b"\x01", 0, self.slot) >= 0 or self.view.find(b"\x01", self.slot + 1) >= 0

    def close(self) -> None:
        self.leave()
        self.view.close()
        # Every instance of this server mapped the table when it loaded; later ones create it anew.
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _output_tensor(name: str, array: np.ndarray) -> Any:
    """A ``pb_utils.Tensor`` over ``array`` via DLPack, marking the capsule consumed the standard way."""
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    if _capsule_is_valid(capsule, _STUB_USED_NAME):
        _capsule_set_name(capsule, _STANDARD_USED_NAME)
    return tensor


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
