"""Against what users would run instead: Palm Serve beside SAHI and a plain rasterio loop, in one run.

On the same held-out synthetic GeoTIFFs (``--scenes`` scenes of ``--size`` px plus one 512 px tile, rendered
by :func:`export.synth.render_scene` with exact ground truth), each method detects palms and buildings
with the shipped ONNX model at the same tiling (512 px tiles overlapping by 128 px, i.e. a ratio of 0.25)
and the same score threshold (``--score-threshold``, by default 0.05 like ``export.evaluate``: COCO AP
integrates over the whole precision/recall curve; the gateway's own default is 0.3):

* ``cli``: ``palm-serve predict FILES`` as a subprocess (embedded Triton started and stopped by it);
* ``service``: ``/v1/predict`` on a warm ``palm-serve serve`` (embedded Triton) on a free 127.0.0.1 port,
  one sequential client posting each file once after a warm-up pass; the baseline of every ratio;
* ``sahi``: SAHI's ``get_sliced_prediction`` (its slicing and its merge, with its defaults) over a SAHI
  ``DetectionModel`` that runs the ONNX with onnxruntime, on the RGB read whole with rasterio;
* ``sahi-greedynmm``: the same with SAHI's default merge forced (GREEDYNMM, IOS 0.5). SAHI itself
  switches to NMS/IOU when the confidence threshold is below 0.1, as it is here;
* ``plain``: what a user writes in an afternoon: rasterio window reads, onnxruntime at batch 1,
  class-aware greedy NMS (IoU 0.5) across tiles.

SAHI's full-image pass (``perform_standard_pred``) is off: the model takes 512 px inputs only, so that
pass would see a 4096 px scene shrunk eightfold. onnxruntime runs with its default session options
(one intra-op thread per physical core) in ``sahi`` and ``plain``.

Figures per method: wall time including the start (process start, imports, model load; for the
service, spawn to ready plus the timed requests); the time of the work alone, every method but the
CLI warmed up first (service: the timed requests, after the first scene and the tile were posted once
to warm it; CLI: from Triton ready, as the CLI logs it, to its last file written, first inference
cold; SAHI and plain: read, infer and merge, after the model load and one warm-up inference); tiles
counted as each method cut them; tiles/s over the work time; CPU milliseconds per tile that the
method's processes spent during the work (read from ``/proc``); peak memory of the process tree (the
sum of each process's ``VmHWM``, which counts shared libraries and shared memory once per process, and
the peak of the summed PSS, sampled every 0.1 s, which does not); COCO AP and AP50 per category
(pycocotools COCOeval on pixel boxes, scored identically for every method by
:func:`export.evaluate.coco_metrics`). SAHI and plain each run in a fresh subprocess of this module, so
their memory is their own. The share of the CPU that other processes took while each method ran is
printed too, with a warning over 10%: on a shared machine that load, not the method, sets the times.
Every process started here runs in its own session and is stopped on the way out, Ctrl-C included.

Run: ``python -m loadtest.bench_peers [--scenes 3] [--size 4096] [--methods ...] [--json out.json]``;
needs the ``bench`` extra (``pip install -c constraints.txt -e '.[bench]'``) for the SAHI rows.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from export.synth import Scene

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = REPO_ROOT / "model_repository" / "palm" / "1" / "model.onnx"
TILE = 512
OVERLAP = 128
NMS_IOU = 0.5
CATEGORIES = {1: "palm_tree", 2: "building"}
METHODS = ("service", "cli", "sahi", "sahi-greedynmm", "plain")
BASELINE = "service"
#: Rows of ``x1, y1, x2, y2, score, class_id`` in pixels of one image.
Rows = npt.NDArray[np.float32]


# ----------------------------------------------------------------------------------- pure helpers


def axis_offsets(length: int, tile: int = TILE, overlap: int = OVERLAP) -> list[int]:
    """Window starts along one axis: stride ``tile - overlap``, the last window moved back to end the axis."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def nms(rows: Rows, iou: float = NMS_IOU) -> Rows:
    """Class-aware greedy NMS: the textbook loop, classes kept apart by shifting each class's boxes
    away from the others'. Returns the kept rows, highest score first."""
    if rows.shape[0] == 0:
        return rows
    shift = (rows[:, 5:6].astype(np.float64)) * (float(np.max(rows[:, :4])) + 1.0)
    boxes = rows[:, :4].astype(np.float64) + shift
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-rows[:, 4], kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.clip(
            np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]), 0, None
        )
        h = np.clip(
            np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]), 0, None
        )
        inter = w * h
        overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return rows[keep]


def coco_rows(per_image: Sequence[Rows]) -> list[dict[str, Any]]:
    """COCO result rows for images in ground-truth order (image ids from 1, as
    :func:`export.synth.coco_dataset` numbers them), through :func:`export.evaluate.coco_results`."""
    from export.evaluate import coco_results
    from gateway.pipeline.merge import Detections

    return coco_results(
        [
            Detections(
                np.ascontiguousarray(r[:, :4], np.float32),
                np.ascontiguousarray(r[:, 4], np.float32),
                r[:, 5].astype(np.int32),
            )
            for r in per_image
        ]
    )


def as_rows(values: Sequence[Sequence[float]]) -> Rows:
    return np.asarray(values, np.float32).reshape(-1, 6)


def from_gateway_json(body: dict[str, Any]) -> Rows:
    """Rows from a ``/v1/predict`` / ``palm-serve predict`` JSON body (``bbox`` is ``x, y, w, h``)."""
    return as_rows(
        [
            [x, y, x + w, y + h, d["score"], d["category_id"]]
            for d in body["detections"]
            for x, y, w, h in [d["bbox"]]
        ]
    )


# ------------------------------------------------------------------------------ processes, memory


def smaps_pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    found = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


@dataclass
class TreeWatch:
    """Samples a process tree every ``interval`` s: each process's peak RSS (``VmHWM``) and CPU seconds,
    the peak of the tree's summed PSS, and every pid seen with its command line (to stop leftovers).
    CPU is read from ``/proc`` because a process's rusage misses grandchildren nobody waited for
    (Triton's python backend stubs, where the model runs)."""

    root: int
    interval: float = 0.1
    peak_kib: dict[int, int] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    peak_pss_kib: int = 0
    seen: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self) -> float:
        """Read the tree now; returns the CPU seconds it has used so far (exited processes as last seen)."""
        from gateway import procfs

        with self._lock:
            pss = 0
            for pid in [self.root, *procfs.descendants(self.root)]:
                status, cpu = procfs.status(pid), procfs.cpu_seconds(pid)
                if status is None or cpu is None or "VmHWM" not in status:
                    continue
                self.seen.setdefault(pid, procfs.command_line(pid) or "")
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), int(status["VmHWM"].split()[0]))
                self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), cpu)
                pss += smaps_pss_kib(pid)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            return sum(self.cpu_s.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    @property
    def peak_rss_kib(self) -> int:
        return sum(self.peak_kib.values())

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_s.values())

    def peaks_by_role(self) -> str:
        """Peak RSS per process of a Palm Serve tree, largest first, e.g. ``model stub 201 MiB``."""
        roles = (
            ("triton_python_backend_stub", "model stub"),
            ("tritonserver", "tritonserver"),
            ("gateway.decode.worker", "decode worker"),
            ("palm-serve", "palm-serve"),
        )
        found = []
        for pid, kib in self.peak_kib.items():
            command = self.seen.get(pid, "")
            role = next((name for marker, name in roles if marker in command), "other")
            found.append((kib, role))
        return ", ".join(f"{role} {kib / 1024:.0f}" for kib, role in sorted(found, reverse=True)) + " MiB"


def stop_tree(proc: subprocess.Popen[Any], watch: TreeWatch | None, grace_s: float = 60.0) -> None:
    """Stop ``proc`` as Ctrl-C would (it cleans up its Triton), then SIGTERM, then SIGKILL whatever
    of its tree is still running."""
    from gateway import procfs

    family = {pid: procfs.command_line(pid) or "" for pid in procfs.descendants(proc.pid)}
    if watch is not None:
        family.update(watch.seen)
    family.pop(proc.pid, None)
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    for pid, cmdline in family.items():
        if procfs.alive(pid) and procfs.command_line(pid) == cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def launched(
    command: list[str], env: dict[str, str], **kwargs: Any
) -> Iterator[tuple[subprocess.Popen[Any], TreeWatch]]:
    """A subprocess in its own session (a terminal's Ctrl-C reaches only this benchmark, which then
    stops it in order), its tree watched from the start, always stopped on the way out."""
    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True, **kwargs)
    watch = TreeWatch(proc.pid)
    try:
        with watch:
            yield proc, watch
    finally:
        stop_tree(proc, watch)


def palm_env(data_dir: Path, log_level: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PALM_TRITON_URL", "PALM_TRITON__URL")}
    env.update(PALM_DATA_DIR=str(data_dir), PALM_LOG_LEVEL=log_level, PYTHONUNBUFFERED="1")
    return env


def palm_serve() -> list[str]:
    script = Path(sys.executable).with_name("palm-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------- methods


@dataclass
class Outcome:
    """What one method did with the files."""

    method: str
    wall_s: float
    work_s: float
    tiles: int
    detections: list[Rows]
    peak_rss_kib: int
    peak_pss_kib: int
    #: CPU seconds of the method's processes during the work alone, and during the whole phase.
    work_cpu_s: float
    phase_cpu_s: float
    notes: list[str] = field(default_factory=list)
    #: Share of all cores' time, while this method ran, taken by processes outside this benchmark.
    others_cpu_share: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.work_s


READY_LINE = "embedded tritonserver serving"
DONE_LINE = re.compile(r": \d+ detections, \d+ tiles -> ")


def run_cli(files: list[Path], work: Path, score_threshold: float) -> Outcome:
    """``palm-serve predict`` over all files in one command. Its output lines are time-stamped as they
    arrive, with the tree's CPU at the line saying Triton is ready and at each file written."""
    out = work / "cli-out"
    command = [*palm_serve(), "predict", *map(str, files), "--out", str(out), "--format", "json"]
    command += ["--score-threshold", str(score_threshold), "--no-progress"]
    lines: list[str] = []
    marks: dict[str, tuple[float, float]] = {}  # "ready" / "done": (time, tree CPU seconds)

    def pump(stream: Any, watch: TreeWatch) -> None:
        for line in stream:
            lines.append(line.rstrip())
            if READY_LINE in line:
                marks["ready"] = (time.perf_counter(), watch.sample())
            elif DONE_LINE.search(line):
                marks["done"] = (time.perf_counter(), watch.sample())

    started = time.perf_counter()
    env = palm_env(work / "cli-var", "INFO")
    with launched(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as (proc, watch):
        readers = [
            threading.Thread(target=pump, args=(s, watch), daemon=True) for s in (proc.stdout, proc.stderr)
        ]
        for reader in readers:
            reader.start()
        code = proc.wait()
        wall = time.perf_counter() - started
        for reader in readers:
            reader.join()
    if code != 0 or "ready" not in marks or "done" not in marks:
        raise RuntimeError(f"palm-serve predict exited {code}:\n" + "\n".join(lines[-20:]))
    (ready, ready_cpu), (done, done_cpu) = marks["ready"], marks["done"]
    bodies = [json.loads((out / f"{f.stem}.json").read_text()) for f in files]
    return Outcome(
        "cli",
        wall,
        done - ready,
        sum(b["tiles"]["total"] for b in bodies),
        [from_gateway_json(b) for b in bodies],
        watch.peak_rss_kib,
        watch.peak_pss_kib,
        done_cpu - ready_cpu,
        watch.cpu_seconds,
        [
            f"Triton ready {ready - started:.1f} s after spawn; "
            f"exit {started + wall - done:.1f} s after the last file",
            f"peak RSS by process: {watch.peaks_by_role()}",
        ],
    )


def multipart(path: Path) -> tuple[bytes, dict[str, str]]:
    boundary = f"palm-bench-{secrets.token_hex(8)}"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: image/tiff\r\n\r\n"
    ).encode()
    body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post(port: int, path: Path, score_threshold: float) -> tuple[float, dict[str, Any]]:
    """One ``/v1/predict`` call on a fresh connection; returns the seconds from sending to the last
    byte of the answer (the body is encoded before) and the decoded answer."""
    body, headers = multipart(path)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        started = time.perf_counter()
        connection.request(
            "POST", f"/v1/predict?score_threshold={score_threshold}", body=body, headers=headers
        )
        response = connection.getresponse()
        content = response.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"/v1/predict answered {response.status} for {path.name}: {content[:300]!r}")
    return elapsed, json.loads(content)


def wait_ready(port: int, proc: subprocess.Popen[Any], timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"palm-serve serve exited {proc.returncode} during startup")
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return
            finally:
                connection.close()
        time.sleep(0.2)
    raise RuntimeError("palm-serve serve did not become ready")


def run_service(files: list[Path], warmup: list[Path], work: Path, score_threshold: float) -> Outcome:
    """A warm ``palm-serve serve``: the ``warmup`` files posted first, then each file once, one client."""
    port = free_port()
    command = [*palm_serve(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with launched(command, palm_env(work / "serve-var", "WARNING")) as (proc, watch):
        wait_ready(port, proc)
        ready = time.perf_counter() - started
        for path in warmup:
            post(port, path, score_threshold)
        cpu_before = watch.sample()
        timed = [post(port, f, score_threshold) for f in files]
        work_cpu = watch.sample() - cpu_before
    seconds = sum(t for t, _ in timed)
    return Outcome(
        "service",
        ready + seconds,
        seconds,
        sum(b["tiles"]["total"] for _, b in timed),
        [from_gateway_json(b) for _, b in timed],
        watch.peak_rss_kib,
        watch.peak_pss_kib,
        work_cpu,
        watch.cpu_seconds,
        [
            f"spawn to /readyz {ready:.1f} s; per file " + ", ".join(f"{t:.2f}" for t, _ in timed) + " s",
            f"peak RSS by process: {watch.peaks_by_role()}",
        ],
    )


def run_worker(method: str, files: list[Path], work: Path, score_threshold: float) -> Outcome:
    """``method`` in a fresh ``python -m loadtest.bench_peers --worker`` subprocess."""
    result = work / f"{method}.json"
    command = [sys.executable, "-m", "loadtest.bench_peers", "--worker", method, "--result", str(result)]
    command += ["--score-threshold", str(score_threshold), *map(str, files)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with launched(command, env) as (proc, watch):
        code = proc.wait()
        wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the {method} worker exited {code}")
    figures = json.loads(result.read_text())
    return Outcome(
        method,
        wall,
        figures["work_s"],
        figures["tiles"],
        [as_rows(d) for d in figures["detections"]],
        max(watch.peak_rss_kib, figures["maxrss_kib"]),
        watch.peak_pss_kib,
        figures["work_cpu_s"],
        max(watch.cpu_seconds, figures["cpu_s"]),
        figures["notes"],
    )


# -------------------------------------------------------------------- in the worker subprocesses


Detector = Callable[[list[Path]], tuple[list[Rows], int]]


def plain_detector(score_threshold: float) -> Detector:
    """rasterio window by window, onnxruntime at batch 1, one NMS per image."""
    import onnxruntime as ort
    import rasterio
    from rasterio.windows import Window

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    session.run(None, {"images": np.zeros((1, 3, TILE, TILE), np.uint8)})

    def detect(files: list[Path]) -> tuple[list[Rows], int]:
        results: list[Rows] = []
        tiles = 0
        for path in files:
            found: list[Rows] = []
            with rasterio.open(path) as src:
                small = src.width < TILE or src.height < TILE
                for y in axis_offsets(src.height):
                    for x in axis_offsets(src.width):
                        window = Window(x, y, TILE, TILE)
                        pixels = src.read([1, 2, 3], window=window, boundless=small, fill_value=0)
                        out = session.run(None, {"images": pixels[None]})[0][0]
                        rows = out[out[:, 4] >= score_threshold]
                        rows[:, [0, 2]] += x
                        rows[:, [1, 3]] += y
                        found.append(rows)
                        tiles += 1
            results.append(nms(np.concatenate(found)))
        return results, tiles

    return detect


def sahi_detector(score_threshold: float, greedynmm: bool) -> Detector:
    """SAHI's sliced prediction (its slicing, its merge) over the RGB read whole with rasterio."""
    import rasterio
    from rasterio.plot import reshape_as_image
    from sahi.predict import get_sliced_prediction

    from loadtest.sahi_onnx import OnnxPalmDetectionModel

    model = OnnxPalmDetectionModel(
        model_path=str(MODEL),
        confidence_threshold=score_threshold,
        category_mapping={str(k): v for k, v in CATEGORIES.items()},
    )
    model.perform_inference(np.zeros((TILE, TILE, 3), np.uint8))
    merge: dict[str, Any] = {}
    if greedynmm:
        merge = {"postprocess_type": "GREEDYNMM", "postprocess_match_metric": "IOS"}
        merge["force_postprocess_type"] = True

    def detect(files: list[Path]) -> tuple[list[Rows], int]:
        results: list[Rows] = []
        tiles = 0
        for path in files:
            with rasterio.open(path) as src:
                image = reshape_as_image(src.read())
            totals: list[int] = []
            prediction = get_sliced_prediction(
                image,
                model,
                slice_height=TILE,
                slice_width=TILE,
                overlap_height_ratio=OVERLAP / TILE,
                overlap_width_ratio=OVERLAP / TILE,
                perform_standard_pred=False,
                verbose=0,
                progress_callback=lambda done, total, seen=totals: seen.append(total),
                **merge,
            )
            tiles += totals[-1]
            found = [
                [p.bbox.minx, p.bbox.miny, p.bbox.maxx, p.bbox.maxy, p.score.value, p.category.id]
                for p in prediction.object_prediction_list
            ]
            results.append(as_rows(found))
        return results, tiles

    return detect


def worker(method: str, files: list[Path], score_threshold: float, result: Path) -> int:
    """Set up ``method`` (imports, model load), time it over ``files``, write the figures to ``result``."""
    if method == "plain":
        detect = plain_detector(score_threshold)
        notes = [f"onnxruntime {version('onnxruntime')}"]
    else:
        detect = sahi_detector(score_threshold, greedynmm=method == "sahi-greedynmm")
        notes = [f"sahi {version('sahi')}, torch imported: {'torch' in sys.modules}"]
    started, cpu_before = time.perf_counter(), own_cpu_seconds()
    detections, tiles = detect(files)
    elapsed, cpu_after = time.perf_counter() - started, own_cpu_seconds()
    figures = {
        "work_s": elapsed,
        "work_cpu_s": cpu_after - cpu_before,
        "cpu_s": cpu_after,
        "tiles": tiles,
        "detections": [d.tolist() for d in detections],
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "notes": notes,
    }
    result.write_text(json.dumps(figures))
    return 0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def version(distribution: str) -> str:
    from importlib.metadata import version as installed

    return installed(distribution)


# ------------------------------------------------------------------------------------------ main


def render(seed: int, size: int, folder: Path) -> tuple[Scene, Path]:
    from export.synth import render_scene, write_geotiff

    scene = render_scene(seed, size)
    return scene, write_geotiff(scene, folder / f"scene_{seed}_{size}.tif")


def score(truth: dict[str, Any], detections: list[Rows]) -> dict[str, Any]:
    """COCO figures of one method's detections (one array per image, in ground-truth order)."""
    from export.evaluate import coco_metrics

    return coco_metrics(truth, coco_rows(detections))


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def cells(o: Outcome, m: dict[str, Any]) -> dict[str, str]:
    """One method's column of the table."""
    column = {
        "wall incl. start (s)": f"{o.wall_s:.1f}",
        "work (s)": f"{o.work_s:.2f}",
        "tiles": str(o.tiles),
        "tiles/s (work)": f"{o.tiles_per_s:.1f}",
        "CPU ms per tile (work)": f"{1000 * o.work_cpu_s / o.tiles:.1f}",
        "peak RSS, sum of tree (MiB)": f"{o.peak_rss_kib / 1024:.0f}",
        "peak PSS, tree (MiB)": f"{o.peak_pss_kib / 1024:.0f}",
        "CPU taken by others (%)": f"{100 * o.others_cpu_share:.0f}",
        "detections": str(sum(len(d) for d in o.detections)),
        "AP": f"{m['AP']:.3f}",
        "AP50": f"{m['AP50']:.3f}",
    }
    for name in CATEGORIES.values():
        column[f"{name} AP"] = f"{m['per_class'][name]['AP']:.3f}"
        column[f"{name} AP50"] = f"{m['per_class'][name]['AP50']:.3f}"
    return column


def report(outcomes: list[Outcome], metrics: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table (methods as columns) and one line of ratios per method."""
    base = next((o for o in outcomes if o.method == BASELINE), outcomes[0])
    columns = [cells(o, metrics[o.method]) for o in outcomes]
    width = max(14, *(len(o.method) + 2 for o in outcomes))
    lines = [f"{'':28s}" + "".join(f"{o.method:>{width}s}" for o in outcomes)]
    for label in columns[0]:
        lines.append(f"{label:28s}" + "".join(f"{c[label]:>{width}s}" for c in columns))
    lines.append("")
    ours = metrics[base.method]
    for o in outcomes:
        if o is base:
            continue
        theirs = metrics[o.method]
        lines.append(
            f"{o.method}: work time {ratio(o.work_s, base.work_s)} ours ({base.method}), "
            f"wall incl. start {ratio(o.wall_s, base.wall_s)}, "
            f"tiles/s {ratio(o.tiles_per_s, base.tiles_per_s)}, "
            f"CPU per tile {ratio(o.work_cpu_s / o.tiles, base.work_cpu_s / base.tiles)}, "
            f"peak RSS {ratio(o.peak_rss_kib, base.peak_rss_kib)}, "
            f"peak PSS {ratio(o.peak_pss_kib, base.peak_pss_kib)}, "
            f"AP {theirs['AP'] - ours['AP']:+.3f}, AP50 {theirs['AP50'] - ours['AP50']:+.3f}"
        )
    for o in outcomes:
        for note in o.notes:
            lines.append(f"{o.method}: {note}")
    busy = [o.method for o in outcomes if o.others_cpu_share > 0.1]
    if busy:
        lines.append(f"warning: other processes took over 10% of the CPU during {', '.join(busy)}: rerun")
    return "\n".join(lines)


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy so far (all cores, including time stolen by the host)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def run(method: str, files: list[Path], work: Path, score_threshold: float) -> Outcome:
    """One method, with the share of the machine that other processes took meanwhile."""
    started, system_before, mine_before = time.perf_counter(), system_busy_seconds(), own_cpu_seconds()
    if method == "cli":
        outcome = run_cli(files, work, score_threshold)
    elif method == "service":
        # A whole scene warms both model instances, the lone tile the both-cores path.
        outcome = run_service(files, [files[0], files[-1]], work, score_threshold)
    else:
        outcome = run_worker(method, files, work, score_threshold)
    mine = own_cpu_seconds() - mine_before + outcome.phase_cpu_s
    others = system_busy_seconds() - system_before - mine
    capacity = (time.perf_counter() - started) * (os.cpu_count() or 1)
    outcome.others_cpu_share = max(0.0, others) / capacity
    return outcome


def main(argv: list[str] | None = None) -> int:
    from export.evaluate import DEFAULT_SCORE_THRESHOLD, check_heldout
    from export.synth import HELDOUT_MIN_SEED, coco_dataset

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--scenes", type=int, default=3, help="how many scenes of --size px (plus one 512 px tile)"
    )
    parser.add_argument("--size", type=int, default=4096, help="scene width and height in pixels")
    parser.add_argument("--seed", type=int, default=HELDOUT_MIN_SEED + 5000, help="first held-out scene seed")
    parser.add_argument(
        "--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD, help="for every method"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--worker", choices=[m for m in METHODS if m not in ("cli", "service")], help=argparse.SUPPRESS
    )
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.files, args.score_threshold, args.result)

    seeds = list(range(args.seed, args.seed + args.scenes + 1))
    check_heldout(seeds)
    sizes = [args.size] * args.scenes + [TILE]
    # Both end the run through the cleanup below; an installed handler (unlike an inherited "ignore")
    # also leaves the children's SIGINT at its default, so stop_tree's Ctrl-C reaches them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="palm-bench-peers-"))
    try:
        started = time.perf_counter()
        with ProcessPoolExecutor(max(1, min(2, len(os.sched_getaffinity(0))))) as pool:
            rendered = list(pool.map(render, seeds, sizes, [work] * len(seeds)))
        scenes = [s for s, _ in rendered]
        files = [f for _, f in rendered]
        print(
            f"{args.scenes} scenes of {args.size} px + one {TILE} px tile (seeds {seeds[0]}..{seeds[-1]}), "
            f"{sum(len(s.boxes) for s in scenes)} objects, "
            f"rendered in {time.perf_counter() - started:.0f} s; cores {len(os.sched_getaffinity(0))}; "
            f"score threshold {args.score_threshold}; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        outcomes: list[Outcome] = []
        for method in args.methods:
            phase = time.perf_counter()
            outcome = run(method, files, work, args.score_threshold)
            print(
                f"{method}: {outcome.tiles} tiles in {outcome.work_s:.2f} s "
                f"({time.perf_counter() - phase:.0f} s with start and stop; "
                f"other processes took {100 * outcome.others_cpu_share:.0f}% of the CPU meanwhile)",
                flush=True,
            )
            outcomes.append(outcome)
        phase = time.perf_counter()
        truth = coco_dataset((s, f.name) for s, f in zip(scenes, files, strict=True))
        with ProcessPoolExecutor(max(1, min(2, len(os.sched_getaffinity(0))))) as pool:
            scored = pool.map(score, [truth] * len(outcomes), [o.detections for o in outcomes])
            metrics = {o.method: m for o, m in zip(outcomes, scored, strict=True)}
        print(f"scored in {time.perf_counter() - phase:.0f} s; {time.perf_counter() - started:.0f} s in all")
        print()
        print(report(outcomes, metrics))
        if args.json:
            figures = {
                "scenes": args.scenes,
                "size": args.size,
                "seeds": seeds,
                "score_threshold": args.score_threshold,
                "methods": {
                    o.method: {
                        "wall_s": o.wall_s,
                        "work_s": o.work_s,
                        "tiles": o.tiles,
                        "tiles_per_s": o.tiles_per_s,
                        "work_cpu_s": o.work_cpu_s,
                        "phase_cpu_s": o.phase_cpu_s,
                        "peak_rss_mib": o.peak_rss_kib / 1024,
                        "peak_pss_mib": o.peak_pss_kib / 1024,
                        "detections": sum(len(d) for d in o.detections),
                        "others_cpu_share": o.others_cpu_share,
                        "coco": metrics[o.method],
                        "notes": o.notes,
                    }
                    for o in outcomes
                },
            }
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
