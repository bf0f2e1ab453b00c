"""Load test of a running Palm Serve: online users and bulk users together, with an SLO gate.

* ``OnlineUser`` (FastHttpUser) posts GeoTIFFs to ``/v1/predict``, drawn from a weighted mix of sizes
  (``--palm-sizes 256:3,512:5,1024:2``: generated scenes, size:weight) or from ``--palm-files DIR``.
* ``BulkUser`` (``--palm-bulk-users``, 1 by default, fixed whatever ``-u`` is) submits a job of
  ``--palm-job-files`` files in one multipart request, follows it to the end over Server-Sent Events,
  then downloads its COCO document. The whole job is also reported as request ``job end-to-end``.
* The SLO gate runs when the test stops: the error ratio of all requests at most
  ``--palm-slo-error-ratio``, and the p95 of each named request within ``--palm-slo-p95``
  (``name=milliseconds`` pairs; a named request that never completed fails the gate too). A missed
  objective is logged and makes locust exit 1.
* Before and after the run it reads the gateway's ``/metrics`` and ``/metrics/triton`` and logs tiles/s
  and the realised Triton batch size (inference_count / execution_count); ``--palm-report FILE`` writes
  them with the per-request figures as JSON.

Headless against a local stack (``make run`` in another terminal)::

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 2 -t 2m \
        --only-summary --palm-report locust.json

``--palm-api-key`` (or ``PALM_API_KEY``) is sent as ``Authorization: Bearer`` on every request.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.env import Environment

from export.synth import render_scene, write_geotiff

log = logging.getLogger("palm.locust")

PREDICT = "/v1/predict"
JOB = "job end-to-end"
DEFAULT_P95_MS = f"{PREDICT}=5000,{JOB}=120000"
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


@dataclass(frozen=True, slots=True)
class Upload:
    """One multipart body, encoded once and sent many times."""

    files: int
    content_type: str
    body: bytes


def multipart(field: str, files: list[Path]) -> Upload:
    boundary = secrets.token_hex(16)
    parts = []
    for path in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
            "Content-Type: image/tiff\r\n\r\n"
        )
        parts += [head.encode(), path.read_bytes(), b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return Upload(
        files=len(files),
        content_type=f"multipart/form-data; boundary={boundary}",
        body=b"".join(parts),
    )


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("Palm Serve")
    group.add_argument("--palm-files", default="", help="directory of GeoTIFFs to send (default: generated)")
    group.add_argument("--palm-sizes", default="256:3,512:5,1024:2", help="generated sizes, size:weight")
    group.add_argument("--palm-job-files", type=int, default=20, help="files per bulk job")
    group.add_argument("--palm-bulk-users", type=int, default=1, help="bulk users (the rest are online)")
    group.add_argument("--palm-slo-error-ratio", type=float, default=0.01, help="highest failed share")
    group.add_argument("--palm-slo-p95", default=DEFAULT_P95_MS, help="name=ms pairs, comma separated")
    group.add_argument("--palm-report", default="", help="write the run's figures to this JSON file")
    group.add_argument(
        "--palm-api-key", default=os.environ.get("PALM_API_KEY", ""), env_var="PALM_API_KEY", help="API key"
    )


@dataclass(slots=True)
class Workload:
    online: list[tuple[Upload, int]]
    job: Upload
    headers: dict[str, str]

    def pick(self) -> Upload:
        uploads, weights = zip(*self.online, strict=True)
        return random.choices(uploads, weights=weights)[0]


WORKLOAD: Workload | None = None
BEFORE: dict[str, float] = {}
STARTED = 0.0


def _sizes(spec: str) -> list[tuple[int, int]]:
    pairs = []
    for item in spec.split(","):
        size, _, weight = item.partition(":")
        pairs.append((int(size), int(weight or 1)))
    return pairs


def _workload(options: Any) -> Workload:
    headers = {"Authorization": f"Bearer {options.palm_api_key}"} if options.palm_api_key else {}
    if options.palm_files:
        files = sorted(p for p in Path(options.palm_files).iterdir() if p.suffix.lower() in {".tif", ".tiff"})
        if not files:
            raise SystemExit(f"--palm-files {options.palm_files}: no .tif or .tiff files")
        online = [(multipart("file", [p]), 1) for p in files]
        job = [files[i % len(files)] for i in range(options.palm_job_files)]
        return Workload(online, multipart("files", job), headers)
    folder = Path(tempfile.mkdtemp(prefix="palm-locust-"))
    online = []
    for n, (size, weight) in enumerate(_sizes(options.palm_sizes)):
        path = write_geotiff(render_scene(7_100_000 + n, size=size), folder / f"scene-{size}.tif")
        online.append((multipart("file", [path]), weight))
    job = [
        write_geotiff(render_scene(7_200_000 + i, size=512), folder / f"job-{i:04d}.tif")
        for i in range(options.palm_job_files)
    ]
    return Workload(online, multipart("files", job), headers)


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    global WORKLOAD
    options = environment.parsed_options
    if options is None:
        return
    WORKLOAD = _workload(options)
    BulkUser.fixed_count = options.palm_bulk_users


def _workload_or_fail() -> Workload:
    if WORKLOAD is None:
        raise RuntimeError("the workload is built when locust starts (events.init)")
    return WORKLOAD


class OnlineUser(FastHttpUser):
    """One tile at a time to /v1/predict, as an interactive client does."""

    wait_time = between(0.05, 0.2)

    @task
    def predict(self) -> None:
        workload = _workload_or_fail()
        upload = workload.pick()
        with self.client.post(
            PREDICT,
            data=upload.body,
            headers={"Content-Type": upload.content_type, **workload.headers},
            name=PREDICT,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif "detections" not in response.json():
                response.failure("the answer has no detections member")


class BulkUser(FastHttpUser):
    """Submits a job, follows its events to the end, downloads its COCO document."""

    fixed_count = 1
    wait_time = between(0.5, 1.0)
    network_timeout = 300.0

    @task
    def job(self) -> None:
        workload = _workload_or_fail()
        started = time.perf_counter()
        with self.client.post(
            "/v1/jobs",
            data=workload.job.body,
            headers={"Content-Type": workload.job.content_type, **workload.headers},
            name="/v1/jobs",
            catch_response=True,
        ) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            job_id = response.json()["id"]
        status = self._follow(job_id, workload.headers)
        if status is None:
            return
        with self.client.get(
            f"/v1/jobs/{job_id}/results",
            headers=workload.headers,
            name="/v1/jobs/[id]/results",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            coco = response.json()
            if len(coco.get("images", [])) != workload.job.files:
                response.failure(f"COCO lists {len(coco.get('images', []))} images")
                return
        events.request.fire(
            request_type="JOB",
            name=JOB,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=None if status == "succeeded" else RuntimeError(f"the job ended {status}"),
            context={},
        )

    def _follow(self, job_id: str, headers: dict[str, str]) -> str | None:
        """The job's final status from its event stream (None when the stream failed)."""
        kind = ""
        try:
            for line in self.client.iter_lines(
                f"/v1/jobs/{job_id}/events", headers=headers, name="/v1/jobs/[id]/events"
            ):
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind == "status":
                    data = json.loads(line.removeprefix("data: "))
                    if data.get("results"):
                        return str(data["status"])
        except Exception as exc:  # the stream's failure is the job's failure, reported as such
            events.request.fire(
                request_type="JOB", name=JOB, response_time=0, response_length=0, exception=exc, context={}
            )
            return None
        events.request.fire(
            request_type="JOB",
            name=JOB,
            response_time=0,
            response_length=0,
            exception=RuntimeError("the event stream ended before the job's results were ready"),
            context={},
        )
        return None


def scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    """Sums of the samples of each metric (labels folded), from a Prometheus text page."""
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "palm_tiles_total" and labels and 'outcome="inferred"' not in labels:
            continue
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums


def counters(host: str, headers: dict[str, str]) -> dict[str, float]:
    """Tiles inferred (gateway) and Triton's inference and execution counts, 0 where unavailable."""
    found = {"tiles": 0.0, "inferences": 0.0, "executions": 0.0}
    try:
        found["tiles"] = scrape(f"{host}/metrics", headers).get("palm_tiles_total", 0.0)
        triton = scrape(f"{host}/metrics/triton", headers)
        found["inferences"] = triton.get("nv_inference_count", 0.0)
        found["executions"] = triton.get("nv_inference_exec_count", 0.0)
    except OSError as exc:
        log.warning("metrics unavailable (%s); tiles/s and batch size are not reported", exc)
    return found


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    global STARTED
    BEFORE.clear()
    BEFORE.update(counters(str(environment.host), _workload_or_fail().headers))
    STARTED = time.monotonic()


def slo_failures(environment: Environment, error_ratio: float, p95_spec: str) -> list[str]:
    """The objectives the run missed, as sentences; empty when the run met all of them."""
    stats = environment.stats
    failures = []
    if stats.total.num_requests == 0:
        failures.append("no request completed")
    elif stats.total.fail_ratio > error_ratio:
        failures.append(f"error ratio {stats.total.fail_ratio:.4f} > {error_ratio}")
    for item in filter(None, p95_spec.split(",")):
        name, _, limit = item.rpartition("=")
        entries = [e for (n, _m), e in stats.entries.items() if n == name and e.num_requests > 0]
        if not entries:
            failures.append(f"{name}: no request completed")
            continue
        p95 = max(e.get_response_time_percentile(0.95) for e in entries)
        if p95 > float(limit):
            failures.append(f"{name}: p95 {p95:.0f} ms > {float(limit):.0f} ms")
    return failures


def report(environment: Environment, seconds: float, after: dict[str, float]) -> dict[str, Any]:
    stats = environment.stats
    tiles = after["tiles"] - BEFORE.get("tiles", 0.0)
    executions = after["executions"] - BEFORE.get("executions", 0.0)
    inferences = after["inferences"] - BEFORE.get("inferences", 0.0)
    routes = {
        name: {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "requests_per_s": entry.num_requests / seconds if seconds else 0.0,
            "p50_ms": entry.get_response_time_percentile(0.50),
            "p95_ms": entry.get_response_time_percentile(0.95),
            "p99_ms": entry.get_response_time_percentile(0.99),
        }
        for (name, _method), entry in sorted(stats.entries.items())
    }
    return {
        "users": environment.parsed_options.num_users if environment.parsed_options else None,
        "seconds": seconds,
        "requests": stats.total.num_requests,
        "failures": stats.total.num_failures,
        "error_ratio": stats.total.fail_ratio,
        "requests_per_s": stats.total.num_requests / seconds if seconds else 0.0,
        "tiles_per_s": tiles / seconds if seconds else 0.0,
        "triton_batch_size": inferences / executions if executions else None,
        "routes": routes,
    }


@events.quitting.add_listener
def _gate(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or WORKLOAD is None:
        return
    seconds = time.monotonic() - STARTED if STARTED else 0.0
    figures = report(environment, seconds, counters(str(environment.host), WORKLOAD.headers))
    batch = figures["triton_batch_size"]
    log.info(
        "%.1f s, %d requests (%.1f/s), error ratio %.4f, %.1f tiles/s, realised Triton batch %s",
        seconds,
        figures["requests"],
        figures["requests_per_s"],
        figures["error_ratio"],
        figures["tiles_per_s"],
        f"{batch:.2f}" if batch else "n/a",
    )
    failures = slo_failures(environment, options.palm_slo_error_ratio, options.palm_slo_p95)
    figures["slo_failures"] = failures
    if options.palm_report:
        Path(options.palm_report).write_text(json.dumps(figures, indent=2))
    for failure in failures:
        log.error("SLO missed: %s", failure)
    if failures:
        environment.process_exit_code = 1
    else:
        log.info("SLO met")
