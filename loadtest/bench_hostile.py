"""Honest clients' latency while hostile ones run, against the same clients on an idle server.

Starts ``palm-serve serve`` (embedded Triton, default limits) on a free 127.0.0.1 port, then:

1. idle: ``--honest`` sequential clients post one 512x512 GeoTIFF to ``/v1/predict`` for
   ``--seconds``; p50/p95 and status codes;
2. hostile: the same honest clients again, while at the same time
   * 32 slow uploads send their headers and 1 KiB of body, then stall (reopened as the server
     closes them),
   * 20 idle connections that never send a byte (reopened likewise),
   * a departed-client loop: a 2048x2048 scene is uploaded whole and the connection dropped at once,
     over and over.

Prints both rows, the gateway's answers to the hostile requests by status, and the ratio of the p50s
(target: under 2x, and no 503 for honest clients). Every client stops by itself when the phase ends.
Run: ``python -m loadtest.bench_hostile [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from export.synth import render_scene, write_geotiff
from gateway import procfs
from gateway.serving import listen


def start_gateway(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with listen("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]
    env = {**os.environ, "PALM_DATA_DIR": str(data_dir), "PALM_PORT": str(port), "PALM_LOG_LEVEL": "WARNING"}
    env.pop("PALM_TRITON_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the gateway did not get ready")


def honest(url: str, tile: bytes, seconds: float, clients: int) -> tuple[list[float], Counter[int]]:
    times: list[float] = []
    codes: Counter[int] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                code = client.post("/v1/predict", files={"file": ("t.tif", tile, "image/tiff")}).status_code
                with lock:
                    times.append(time.perf_counter() - started)
                    codes[code] += 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times, codes


def hostile(address: tuple[str, int], scene_request: bytes, stop: threading.Event) -> dict[str, int]:
    counts: Counter[str] = Counter()
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n" + b"x" * 1024
    )

    def holder(opening: bytes, kind: str) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(address, timeout=1) as conn:
                    if opening:
                        conn.sendall(opening)
                    counts[kind] += 1
                    while not stop.is_set():
                        try:
                            if conn.recv(4096) == b"":
                                break  # the server closed it: open another
                        except TimeoutError:
                            continue
            except OSError:
                time.sleep(0.1)

    def departing() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(address, timeout=5) as conn:
                    conn.sendall(scene_request)
                counts["departed"] += 1
            except OSError:
                time.sleep(0.1)

    threads = [threading.Thread(target=holder, args=(head, "slow")) for _ in range(32)]
    threads += [threading.Thread(target=holder, args=(b"", "idle")) for _ in range(20)]
    threads.append(threading.Thread(target=departing))
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return dict(counts)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its living descendants (Triton, its stubs, the decode workers)."""
    return sum(procfs.cpu_seconds(p) or 0.0 for p in [pid, *procfs.descendants(pid)])


class CpuShare:
    """Cores used by the gateway's process tree and by this script (its clients) over a phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.began = (time.perf_counter(), tree_cpu_s(pid), time.process_time())

    def end(self) -> str:
        wall = time.perf_counter() - self.began[0]
        server = (tree_cpu_s(self.pid) - self.began[1]) / wall
        clients = (time.process_time() - self.began[2]) / wall
        return f"cores used: gateway tree {server:.2f}, this script's clients {clients:.2f}"


def predict_statuses(url: str) -> Counter[str]:
    """``/v1/predict`` answers so far by status, from the gateway's own metrics."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "palm_http_requests_total" and sample.labels.get("route") == "/v1/predict":
                counts[sample.labels["status"]] += int(sample.value)
    return counts


def summary(name: str, times: list[float], codes: Counter[int]) -> str:
    ordered = sorted(times)
    p95 = ordered[int(0.95 * (len(ordered) - 1))] if ordered else float("nan")
    return (
        f"{name:8s} requests {len(times):4d}  p50 {statistics.median(times) * 1000:7.1f} ms  "
        f"p95 {p95 * 1000:7.1f} ms  statuses {dict(codes)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--honest", type=int, default=1, help="concurrent honest clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        tile = write_geotiff(render_scene(1_000_501, size=512), work / "tile.tif").read_bytes()
        scene = write_geotiff(render_scene(1_000_502, size=2048), work / "scene.tif").read_bytes()
        body = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.tif"\r\n\r\n'
            + scene
            + b"\r\n--b--\r\n"
        )
        scene_request = (
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        process, url = start_gateway(work / "state")
        try:
            address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
            share = CpuShare(process.pid)
            idle_times, idle_codes = honest(url, tile, args.seconds, args.honest)
            idle_cpu = share.end()
            stop = threading.Event()
            result: dict[str, dict[str, int]] = {}
            attackers = threading.Thread(
                target=lambda: result.setdefault("c", hostile(address, scene_request, stop))
            )
            attackers.start()
            time.sleep(2)  # let the slow and idle connections pile up first
            share = CpuShare(process.pid)
            before = predict_statuses(url)
            busy_times, busy_codes = honest(url, tile, args.seconds, args.honest)
            busy_cpu = share.end()
            stop.set()
            attackers.join()
            honest_codes = Counter({str(code): count for code, count in busy_codes.items()})
            answered = predict_statuses(url) - before - honest_codes
        finally:
            process.terminate()
            process.wait(60)
    print(f"{summary('idle', idle_times, idle_codes)}; {idle_cpu}")
    print(f"{summary('hostile', busy_times, busy_codes)}; {busy_cpu}")
    print(f"hostile connections opened: {result.get('c')}")
    print(f"the gateway's answers to them on /v1/predict, by status: {dict(sorted(answered.items()))}")
    ratio = statistics.median(busy_times) / statistics.median(idle_times)
    refused = busy_codes.get(503, 0)
    print(f"p50 under attack / idle: {ratio:.2f}x (target < 2x); honest 503s: {refused} (target 0)")


if __name__ == "__main__":
    main()
