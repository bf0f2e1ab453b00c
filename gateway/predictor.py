"""One image in, merged and georeferenced detections out: decode → Triton → merge → georeference.

Shared by every entry point (``/v1/predict``, ``palm-serve predict``) through
:func:`gateway.runtime.open_runtime`. Decoding runs in an
isolated worker process that writes tile batches into shared memory; up to ``max_inflight`` batches are
at Triton at once while the next ones decode, so the model never waits on the reader. Triton reads each
batch where the worker wrote it (the gateway never copies pixels); the slot goes back to the worker when
the call returns. Per-tile candidates are cut down to above-threshold boxes as soon as a batch returns;
only those are held until the seam merge.

Online callers and bulk jobs share the engine through two lanes (:mod:`gateway.scheduling`): a file
predicted at :attr:`Priority.BATCH` waits behind online files for a decode worker and never takes the
workers reserved for them, and its Triton calls wait behind online ones for one of the gateway's
``max_calls_in_flight`` and never hold more than ``max_batch_calls_in_flight``; at Triton its requests
carry the lower priority level. Cancelling a prediction cancels its calls at Triton first, then winds
its decoder down through the protocol (the worker stays in the pool).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from gateway.decode import DecodePool, Quicklook, StreamPlan, TileBatch
from gateway.errors import DecoderFailed, DecoderLost
from gateway.metrics import Metrics
from gateway.options import PredictOptions
from gateway.pipeline import geo
from gateway.pipeline.domain import assess
from gateway.pipeline.merge import Candidates, Detections, merge_candidates, tile_candidates
from gateway.pipeline.raster import ReadOptions, drivers_for_name
from gateway.pipeline.resolution import ResolutionRequest, to_source_boxes
from gateway.pipeline.result import ImageMeta, ImageResult, ModelInfo, TilingInfo
from gateway.pipeline.tiling import choose_overlap, tile_count
from gateway.scheduling import Priority, PriorityLimiter
from gateway.settings import TilingSettings, TritonSettings
from gateway.shared_memory import SharedTiles

logger = logging.getLogger(__name__)

T = TypeVar("T")
OFFLOAD_BOXES = 4000
"""Above this many candidate boxes, merging and georeferencing run in a worker thread."""

ProgressCallback = Callable[[int, int], None]
"""Called with (tiles done, tiles total) as batches complete."""


class InferenceBackend(Protocol):
    """What the gateway needs from an inference server (normally the Triton gRPC client)."""

    async def infer(
        self,
        tiles: npt.NDArray[np.uint8],
        *,
        shared: SharedTiles | None = None,
        priority: Priority = Priority.ONLINE,
    ) -> npt.NDArray[np.float32]:
        """uint8 ``[N, 3, S, S]`` tiles to float32 ``[N, K, 6]`` detections (the model's contract).

        ``shared``, when given, says where ``tiles`` lie in shared memory; a server that can map it
        reads them there instead of receiving them. ``priority`` is the request's priority level at
        the server (1 is served first).
        """
        ...

    async def model_ready(self) -> bool:
        """Whether the model takes requests now; bounded time, never raises."""
        ...

    async def close(self) -> None: ...


class Predictor:
    """Runs the decode → infer → merge → georeference path for one file at a time (many concurrently).

    Args:
        decode: the pool of decode workers that reads files.
        inference: the inference server (normally the Triton client).
        model: the model the server runs, reported with every result; its contract sets the tile side.
        tiling: overlap (a quarter of the tile unless set), merge IoU and the default threshold.
        triton: tiles per call, calls in flight per image and for the whole gateway (online and
            batch), and the call deadline.
        metrics: where stage times and tile counts go; none when ``None``.

    Raises:
        ValueError: the configured overlap is above half the model's tile side, or the decode workers
            cut tiles of another side than the model's.
    """

    def __init__(
        self,
        decode: DecodePool,
        inference: InferenceBackend,
        model: ModelInfo,
        *,
        tiling: TilingSettings,
        triton: TritonSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.tiling = tiling
        self.tile_size = model.contract.tile_size
        self.overlap = choose_overlap(self.tile_size, tiling.overlap)
        if decode.tile_size != self.tile_size:
            raise ValueError(
                f"the decode workers cut {decode.tile_size} px tiles; model {model.name!r} takes "
                f"{self.tile_size} px"
            )
        self.triton = triton
        self.decode = decode
        self.inference = inference
        self.model = model
        self.metrics = metrics
        self._at_triton = 0
        """Batches of any request now at the inference server (this gateway's view of its load)."""
        calls = triton.max_calls_in_flight
        self._calls = PriorityLimiter(calls, reserved=max(0, calls - triton.max_batch_calls_in_flight))
        """Inference calls in flight for the whole gateway, online calls first."""

    def tiling_info(self, score_threshold: float) -> TilingInfo:
        """How this predictor cuts and merges, as recorded in COCO ``info``."""
        return TilingInfo(self.tile_size, self.overlap, self.tiling.nms_iou, score_threshold)

    async def predict_file(
        self,
        path: Path,
        file_name: str,
        options: PredictOptions,
        *,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        priority: Priority = Priority.ONLINE,
        quicklook_max_side: int | None = None,
    ) -> ImageResult:
        """Detect objects in the raster at ``path``.

        A decode worker killed from outside while reading the file (:class:`DecoderLost`) costs one more
        attempt on a fresh worker; killed again, the file is blamed (:class:`DecoderFailed`).

        Cancelling the call (a client gone, a job cancelled) cancels its Triton calls, then ends its
        decode session through the protocol, so the worker goes back to the pool; the
        :class:`asyncio.CancelledError` propagates once that is done (within the session's control
        timeout).

        Args:
            path: the raster, a local file.
            file_name: the name the client gave it (picks the formats allowed; reported in results).
            options: the caller's choices (threshold, bands, pixel limit, resampling, stated GSD).
            sha256: the file's digest, reported in COCO results.
            progress: called with (tiles done, tiles total) as batches complete.
            priority: :attr:`Priority.ONLINE` for a caller waiting on the answer,
                :attr:`Priority.BATCH` for a job's file (served after online work, on bounded
                capacity, see :mod:`gateway.scheduling`).
            quicklook_max_side: also paint the tiles into a quicklook PNG of at most this side
                (:attr:`ImageResult.quicklook_png`) as they are read (the file is read once for
                both).

        Raises:
            GatewayError: a subclass naming why the file or the inference failed.
        """

        def attempt() -> Coroutine[Any, Any, ImageResult]:
            return self._predict_once(
                path,
                file_name,
                options,
                sha256=sha256,
                progress=progress,
                priority=priority,
                quicklook_max_side=quicklook_max_side,
            )

        try:
            return await attempt()
        except DecoderLost as lost:
            logger.warning("%s: %s; trying once more on a fresh decoder", file_name, lost.detail)
        try:
            return await attempt()
        except DecoderLost as again:
            raise DecoderFailed(
                f"The decoder was stopped twice while reading this file ({again.extensions.get('signal')}); "
                "most likely the file needs more memory than this server grants a decoder.",
                cause="killed",
            ) from again

    async def quicklook(
        self,
        path: Path,
        file_name: str,
        options: PredictOptions,
        *,
        max_side: int,
        priority: Priority = Priority.ONLINE,
    ) -> Quicklook:
        """The raster at ``path`` as an RGBA PNG (longest side at most ``max_side``), read with the
        same bands and scaling as its tiles, in a decode worker.

        Raises:
            GatewayError: a subclass naming why the file could not be read.
        """
        read = ReadOptions(bands=options.bands, max_pixels=None, drivers=drivers_for_name(file_name))
        async with self.decode.open(path, read, priority=priority) as session:
            return await session.quicklook(max_side)

    async def _predict_once(
        self,
        path: Path,
        file_name: str,
        options: PredictOptions,
        *,
        sha256: str | None,
        progress: ProgressCallback | None,
        priority: Priority,
        quicklook_max_side: int | None,
    ) -> ImageResult:
        tiling = self.tiling
        triton = self.triton
        started = time.perf_counter()
        read = ReadOptions(
            bands=options.bands,
            max_pixels=options.max_pixels,
            drivers=drivers_for_name(file_name),
            resolution=ResolutionRequest(self.model.resolution, options.resample, options.gsd_m),
        )
        # The decoder starts on the tiles right after opening (no round trip). If the model is idle, a
        # small first batch starts inference while the rest of the image decodes; if other requests keep
        # it busy, full batches spare it an execution (each costs the server a few ms of hand-over).
        ramp = self._at_triton == 0
        plan = StreamPlan(
            self.tile_size,
            self.overlap,
            triton.batch_size,
            first_batch=max(1, triton.batch_size // 4) if ramp else None,
            quicklook_max_side=quicklook_max_side,
        )
        saturated = 0
        first_result = 0.0

        async def run(batch: TileBatch) -> list[Candidates]:
            nonlocal saturated, first_result
            raw = await self._infer(batch, priority)
            first_result = first_result or time.perf_counter()
            # The model returns its top K rows per tile; if even the last one clears the threshold, the
            # tile may hold more objects than the model can report.
            saturated += int(np.count_nonzero(raw[:, -1, 4] >= max(options.score_threshold, 1e-6)))
            return [
                tile_candidates(
                    raw[i], spec, options.score_threshold, None if batch.valid is None else batch.valid[i]
                )
                for i, spec in enumerate(batch.specs)
            ]

        batches = _Inflight(run, triton.max_inflight)
        try:
            async with self.decode.open(path, read, plan=plan, priority=priority) as session:
                opened = time.perf_counter()
                info = session.info
                total = tile_count(info.read_width, info.read_height, self.tile_size, self.overlap)

                def report(done: int) -> None:
                    if progress is not None:
                        progress(done + session.skipped, total)

                try:
                    async for batch in session.batches(zero_copy=True):
                        await batches.submit(batch, report)
                except BaseException:
                    # Failed or cancelled: stop the calls at Triton before the decoder winds down
                    # (which waits for the worker to finish the batch it is on).
                    await batches.cancel()
                    raise
                skipped = session.skipped
                inputs = session.inputs
                look = session.stream_quicklook
            # The decoder is back in the pool while the last batches are still at Triton.
            candidates = await batches.drain(report)
        finally:
            await batches.cancel()
        if progress is not None:
            progress(total, total)
        decoded = time.perf_counter()
        # Small results merge inline: a thread hop costs more than the work. Large ones leave the loop.
        offload = sum(len(c.detections) for c in candidates) > OFFLOAD_BOXES
        merged = await _maybe_thread(offload, merge_candidates, candidates, tiling.nms_iou)
        # Tiles of a resampled file are cut from the image at its read size; boxes go back to the file's.
        size, read_size = (info.width, info.height), info.read_size
        merged = Detections(to_source_boxes(merged.boxes, size, read_size), merged.scores, merged.class_ids)
        merged_at = time.perf_counter()
        geometries = await _maybe_thread(offload, geo.box_polygons, merged.boxes, info)
        finished_at = time.perf_counter()
        if self.metrics is not None:
            self.metrics.tiles.labels("inferred").inc(total - skipped)
            self.metrics.tiles.labels("skipped").inc(skipped)
            self.metrics.stage_latency.labels("open").observe(opened - started)
            self.metrics.stage_latency.labels("decode_infer").observe(decoded - opened)
            self.metrics.stage_latency.labels("merge").observe(merged_at - decoded)
            self.metrics.stage_latency.labels("georeference").observe(finished_at - merged_at)
            self.metrics.observe_inputs(
                inputs, info.gsd_m, [len(c.detections) for c in candidates], merged.scores
            )
        domain = assess(inputs, self.model.domain) if inputs is not None and self.model.domain else None
        domain_warning = (domain.warning(),) if domain is not None and domain.out_of_domain else ()
        return ImageResult(
            image=ImageMeta(
                file_name=file_name,
                width=info.width,
                height=info.height,
                sha256=sha256,
                crs=info.crs,
                transform=info.transform,
                warnings=tuple(info.warnings) + _saturation_warning(saturated) + domain_warning,
                gsd_m=info.gsd_m,
                gsd_source=None if info.gsd_source is None else str(info.gsd_source),
                inference_gsd_m=info.inference_gsd_m,
                resample_factor=info.resample_factor,
                out_of_domain=domain,
            ),
            detections=merged,
            inputs=inputs,
            geometries=geometries,
            tiles_total=total,
            tiles_skipped=skipped,
            quicklook_png=None if look is None else look.png,
            timings={
                "open": opened - started,
                "first_result": (first_result or decoded) - opened,
                "tiles": decoded - opened,
                "merge": merged_at - decoded,
                "georeference": finished_at - merged_at,
            },
        )

    async def _infer(self, batch: TileBatch, priority: Priority) -> npt.NDArray[np.float32]:
        """Run one batch once a call slot of ``priority`` is free; its slot goes back to the decoder
        once the server has answered."""
        try:
            await self._calls.acquire(priority)
        except BaseException:
            batch.release()  # never sent
            raise
        start = time.perf_counter()
        self._at_triton += 1
        try:
            detections = await self.inference.infer(batch.pixels, shared=batch.shared, priority=priority)
        except BaseException as exc:
            # Cancelled, timed out or failed: the server may still be reading the slot.
            batch.quarantine(self.triton.request_timeout_s)
            if self.metrics is not None and isinstance(exc, Exception):
                self.metrics.triton_errors.labels(type(exc).__name__).inc()
            raise
        else:
            batch.release()
            return detections
        finally:
            self._calls.release(priority)
            self._at_triton -= 1
            if self.metrics is not None:
                self.metrics.triton_latency.observe(time.perf_counter() - start)
                self.metrics.triton_batch_tiles.observe(len(batch.specs))


class _Inflight:
    """At most ``limit`` batches at Triton at once; results kept in arrival order, failures re-raised.

    Every finished task's outcome is retrieved (no "exception was never retrieved"); the first failure
    is raised once all tasks finished so far have been looked at.
    """

    def __init__(self, run: Callable[[TileBatch], Coroutine[Any, Any, list[Candidates]]], limit: int) -> None:
        self.run = run
        self.limit = max(1, limit)
        self.tasks: set[asyncio.Task[list[Candidates]]] = set()
        self.results: list[Candidates] = []
        self.tiles = 0

    async def submit(self, batch: TileBatch, report: Callable[[int], None]) -> None:
        if len(self.tasks) >= self.limit:
            try:
                await self._collect(report)
            except BaseException:
                batch.release()  # never sent
                raise
        self.tasks.add(asyncio.create_task(self.run(batch)))

    async def drain(self, report: Callable[[int], None]) -> list[Candidates]:
        while self.tasks:
            await self._collect(report)
        return self.results

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    async def _collect(self, report: Callable[[int], None]) -> None:
        finished, self.tasks = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        failure: BaseException | None = None
        for task in finished:
            error = task.exception()
            if error is not None:
                failure = failure or error
                continue
            result = task.result()
            self.results.extend(result)
            self.tiles += len(result)
        report(self.tiles)
        if failure is not None:
            raise failure


async def _maybe_thread(offload: bool, fn: Callable[..., T], /, *args: Any) -> T:
    return await asyncio.to_thread(fn, *args) if offload else fn(*args)


def _saturation_warning(tiles: int) -> tuple[str, ...]:
    if not tiles:
        return ()
    return (
        f"{tiles} tile(s) returned the model's maximum number of detections above the score threshold; "
        "objects may be missing there (raise score_threshold or use a finer ground sample distance)",
    )
