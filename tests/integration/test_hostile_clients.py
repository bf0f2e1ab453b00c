"""What hostile and careless clients can do to a real uvicorn on 127.0.0.1, one test per way.

The gateway runs with short deadlines (1 to 2 s) so that every slow-client case ends in seconds; each
raw-socket client is bounded by a socket timeout. The model is the fake inference backend (these cases
are about HTTP), except for departed clients, whose work is watched on a real Triton.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from export.synth import render_scene, write_geotiff
from gateway import procfs, serving
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import DecodeSettings, HttpSettings, LimitSettings, Settings, TritonSettings
from gateway.triton.client import TritonClient
from gateway.triton.launcher import EmbeddedTriton
from tests.fakes import FakeInference, fixed_box
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

FAST_LIMITS = HttpSettings(
    header_timeout_s=1.0,
    keep_alive_s=1.0,
    body_idle_timeout_s=1.0,
    body_grace_s=1.0,
    body_min_rate_bytes=10_000,
    max_header_bytes=16 * 1024,
    max_headers=50,
    max_url_bytes=4096,
)


class SlowInference(FakeInference):
    """The fake backend, taking ``delay_s`` per call: a request stays busy long enough to leave it."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(fixed_box(10, 10, 30, 30), delay_s=delay_s)


class Gateway:
    """A running gateway: its URL, host/port, metrics and backend."""

    def __init__(
        self, url: str, metrics: Metrics, backend: SlowInference, app: FastAPI, data_dir: Path
    ) -> None:
        self.url = url
        self.data_dir = data_dir
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.metrics = metrics
        self.backend = backend
        self.app = app

    @property
    def decoder_pids(self) -> list[int]:
        return list(self.app.state.services.predictor.decode.pids)

    def counter(self, status: str) -> float:
        total = 0.0
        for family in self.metrics.registry.collect():
            if family.name == "palm_http_requests":
                total += sum(
                    s.value
                    for s in family.samples
                    if s.name == "palm_http_requests_total" and s.labels.get("status") == status
                )
        return total


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = Settings(
        data_dir=tmp_path / "data",
        http=FAST_LIMITS,
        limits=LimitSettings(max_concurrent_predicts=4, max_upload_bytes=32 * 1024**2),
        decode=DecodeSettings(workers=2, file_timeout_s=60),
    )
    metrics = Metrics()
    backend = SlowInference(0.05)
    app = create_app(settings, inference=backend, metrics=metrics)
    with serve_in_thread(app, http=FAST_LIMITS) as url:
        yield Gateway(url, metrics, backend, app, settings.data_dir)


def opened_under(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` holds a file under ``folder`` open."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        targets = [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:
        return False
    return any(target.startswith(f"{folder.resolve()}/") for target in targets)


def rss_bytes() -> int:
    fields = procfs.status(os.getpid())
    assert fields is not None
    return int(fields["VmRSS"].split()[0]) * 1024


def raw(address: tuple[str, int], data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or the timeout)."""
    with socket.create_connection(address, timeout=timeout_s) as conn:
        conn.sendall(data)
        return read_all(conn)


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pass
    return b"".join(chunks)


def problem_of(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/problem+json" in head.lower(), head
    return status, json.loads(body)


def multipart(
    payload: bytes, boundary: str = "b0undary", name: str = "file", filename: str = "scene.tif"
) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/tiff\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


def predict_request(payload: bytes) -> bytes:
    """A whole ``POST /v1/predict`` with ``payload`` as its one file part, as raw bytes."""
    body = multipart(payload)
    return (
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.fixture(scope="module")
def tile_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_geotiff(
        render_scene(1_000_401, size=512), tmp_path_factory.mktemp("tile") / "t.tif"
    ).read_bytes()


def post_predict(gateway: Gateway, content: bytes, name: str = "scene.tif") -> httpx.Response:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        return client.post("/v1/predict", files={"file": (name, content, "image/tiff")})


# 1 -------------------------------------------------------------------------------------------------


def test_stalled_uploads_neither_block_predictions_nor_stay(gateway: Gateway, tile_bytes: bytes) -> None:
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    stalled = []
    for _ in range(32):  # eight times the 4 prediction slots
        conn = socket.create_connection(gateway.address, timeout=6)
        conn.sendall(head + multipart(b"x" * 1024)[:1024])
        stalled.append(conn)
    try:
        honest = post_predict(gateway, tile_bytes)
        assert honest.status_code == 200, honest.text
        started = time.monotonic()
        answers = [read_all(conn) for conn in stalled]
        assert time.monotonic() - started < 6
    finally:
        for conn in stalled:
            conn.close()
    for answer in answers:
        status, problem = problem_of(answer)
        assert status == 408
        assert "request body stalled" in problem["detail"]


def test_a_flood_of_large_uploads_is_refused_at_the_door_and_small_ones_still_pass(
    gateway: Gateway, tile_bytes: bytes
) -> None:
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Content-Length: 9000000\r\n\r\n"
    )
    large = []
    try:
        for _ in range(LimitSettings().max_concurrent_large_uploads):  # every large-upload slot
            conn = socket.create_connection(gateway.address, timeout=6)
            conn.sendall(head + multipart(b"x" * 1024)[:1024])
            large.append(conn)
        time.sleep(0.3)  # the eight are streaming
        status, problem = problem_of(raw(gateway.address, head + multipart(b"x" * 1024)[:1024]))
        assert status == 503
        assert "uploads over 2 MiB" in problem["detail"]

        honest = post_predict(gateway, tile_bytes)
        assert honest.status_code == 200, honest.text
    finally:
        for conn in large:
            conn.close()


def test_without_the_kernels_close_signal_predictions_still_work(
    gateway: Gateway, tile_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "_POLLRDHUP", None)  # as on macOS and Windows
    honest = post_predict(gateway, tile_bytes)
    assert honest.status_code == 200, honest.text


# 1b ------------------------------------------------------------------------------------------------


def test_idle_and_trickling_connections_are_closed(gateway: Gateway) -> None:
    idle = [socket.create_connection(gateway.address, timeout=5) for _ in range(20)]
    trickling = socket.create_connection(gateway.address, timeout=5)
    started = time.monotonic()
    closed_trickle: bytes = b""
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                trickling.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            if time.monotonic() - started > 4:
                break
        closed_trickle = read_all(trickling)
        assert all(conn.recv(1) == b"" for conn in idle)  # closed by the server, nothing said
        assert time.monotonic() - started < 6
    finally:
        for conn in [*idle, trickling]:
            conn.close()
    status, problem = problem_of(closed_trickle)
    assert status == 408
    assert "headers took longer" in problem["detail"]


# 2 -------------------------------------------------------------------------------------------------


def test_oversized_headers_urls_and_header_counts_are_refused(gateway: Gateway) -> None:
    rss_before = rss_bytes()
    with socket.create_connection(gateway.address, timeout=5) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 64 * 1024**2:
                conn.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass  # the server closed the connection: it stopped reading long before 64 MiB
        answer = read_all(conn)
    assert sent < 8 * 1024**2
    status, problem = problem_of(answer)
    assert status == 431
    assert rss_bytes() - rss_before < 32 * 1024**2

    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n"
    status, problem = problem_of(raw(gateway.address, many))
    assert (status, problem["title"]) == (431, "Request Header Fields Too Large")
    assert "more than 50 header fields" in problem["detail"]

    long_url = b"GET /healthz?q=" + b"a" * 80_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    status, problem = problem_of(raw(gateway.address, long_url))
    assert status == 414


# 4 -------------------------------------------------------------------------------------------------


def test_a_client_leaving_mid_upload_is_a_499_not_a_500(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Content-Length: 200000\r\n\r\n"
    )
    with caplog.at_level(logging.INFO):
        with socket.create_connection(gateway.address, timeout=5) as conn:
            conn.sendall(head + multipart(b"x" * 50_000)[:50_000])
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while gateway.counter("499") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert gateway.counter("499") == 1
    assert gateway.counter("500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# 5, 6, 8, 9 ---------------------------------------------------------------------------------------


def test_malformed_bodies_get_problem_json(gateway: Gateway, tile_bytes: bytes) -> None:
    long_boundary = "b" * 300
    body = multipart(b"x" * 100, boundary=long_boundary)
    request = (
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary={long_boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    status, problem = problem_of(raw(gateway.address, request))
    assert status == 400
    assert "RFC 2046" in problem["detail"]

    parts = b"".join(
        b'--b0undary\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n' for _ in range(600_000)
    )
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        started = time.monotonic()
        refused = client.post(  # chunked: no Content-Length to refuse it by
            "/v1/predict",
            content=iter(
                [parts[i : i + 65536] for i in range(0, len(parts), 65536)] + [multipart(tile_bytes)]
            ),
            headers={"content-type": "multipart/form-data; boundary=b0undary"},
        )
        assert refused.status_code == 400
        assert "more than 17 parts" in refused.json()["detail"]
        assert time.monotonic() - started < 10
        assert client.get("/healthz").status_code == 200

    for framing in (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        status, problem = problem_of(raw(gateway.address, framing))
        assert status == 400, framing
        assert problem["detail"].startswith("malformed HTTP request")


def test_the_body_is_capped_as_a_whole_and_refused_bodies_close_the_connection(
    gateway: Gateway, tile_bytes: bytes
) -> None:
    def chunked(payload: bytes) -> bytes:
        out = b"".join(
            b"%x\r\n%s\r\n" % (len(payload[i : i + 65536]), payload[i : i + 65536])
            for i in range(0, len(payload), 65536)
        )
        return out + b"0\r\n\r\n"

    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    epilogue = multipart(tile_bytes) + b"e" * (50 * 1024**2)
    with socket.create_connection(gateway.address, timeout=10) as conn:
        conn.sendall(head)
        with contextlib.suppress(OSError):
            conn.sendall(chunked(epilogue))
        status, problem = problem_of(read_all(conn))
    assert status == 400
    assert "after its closing boundary" in problem["detail"]

    truncated = multipart(tile_bytes)[:-14]
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        response = client.post(
            "/v1/predict",
            content=truncated,
            headers={"content-type": "multipart/form-data; boundary=b0undary"},
        )
    assert response.status_code == 400
    assert "ends before its closing boundary" in response.json()["detail"]

    big = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Content-Length: 3000000000\r\n\r\n"
    )
    with socket.create_connection(gateway.address, timeout=5) as conn:
        conn.sendall(big)
        started = time.monotonic()
        answer = read_all(conn)  # returns when the server closes the connection
        assert time.monotonic() - started < 4
    status, problem = problem_of(answer)
    assert status == 413
    assert b"connection: close" in answer.lower()


# 3 -------------------------------------------------------------------------------------------------


def test_work_for_a_departed_client_is_cancelled(gateway: Gateway, tmp_path: Path) -> None:
    scene = write_geotiff(render_scene(1_000_402, size=2048), tmp_path / "big.tif").read_bytes()
    request = predict_request(scene)
    gateway.backend.delay_s = 0.5
    calls = gateway.backend.calls
    with socket.create_connection(gateway.address, timeout=5) as conn:
        conn.sendall(request)
        time.sleep(0.8)  # the upload is in, the first batches are at the model
    deadline = time.monotonic() + 5
    while gateway.counter("499") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.counter("499") == 1
    sent = gateway.backend.calls - calls
    time.sleep(1.5)
    assert gateway.backend.calls - calls == sent, "inference went on after the client left"
    assert sent < 25 / 4  # 25 tiles in batches of 4: most were never sent


def test_a_client_that_sends_its_upload_and_closes_starts_no_decoding(
    gateway: Gateway, tmp_path: Path
) -> None:
    scene = write_geotiff(render_scene(1_000_405, size=2048), tmp_path / "big.tif").read_bytes()
    request = predict_request(scene)
    decoders = gateway.decoder_pids
    cpu_before = sum(procfs.cpu_seconds(pid) or 0.0 for pid in decoders)
    closed_before = gateway.counter("499")
    for _ in range(20):
        with socket.create_connection(gateway.address, timeout=5) as conn:
            conn.sendall(request)
    deadline = time.monotonic() + 10
    while gateway.counter("499") < closed_before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.counter("499") == closed_before + 20
    decoding_s = sum(procfs.cpu_seconds(pid) or 0.0 for pid in decoders) - cpu_before
    # Opening this scene and cutting its first batch takes its decoder about 10 ms.
    assert decoding_s < 0.05, f"{decoding_s:.2f} s of decoding for 20 clients that had left"


def test_a_decoder_killed_mid_file_is_retried_not_blamed(gateway: Gateway, tmp_path: Path) -> None:
    scene = write_geotiff(render_scene(1_000_403, size=2048), tmp_path / "big.tif").read_bytes()
    gateway.backend.delay_s = 0.3  # the worker waits on free slots while the model is slow
    outcome: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("r", post_predict(gateway, scene)))
    thread.start()
    calls = gateway.backend.calls
    deadline = time.monotonic() + 10
    while gateway.backend.calls == calls and time.monotonic() < deadline:
        time.sleep(0.02)  # the first batch is at the model: the file's decoder is mid-stream
    # Only the file's decoder: killing an idle one too could hit the worker the retry was handed.
    (reading,) = [pid for pid in gateway.decoder_pids if opened_under(pid, gateway.data_dir)]
    os.kill(reading, signal.SIGKILL)
    thread.join(60)
    response = outcome["r"]
    assert response.status_code in (200, 503), response.text
    if response.status_code == 503:
        assert "Retry-After" in response.headers
    assert response.status_code != 422


# 10 ------------------------------------------------------------------------------------------------


def test_echoed_names_lose_hidden_characters(gateway: Gateway, tile_bytes: bytes) -> None:
    response = post_predict(gateway, tile_bytes, name="invoice\u202egpj.tif")
    assert response.status_code == 200, response.text
    assert response.json()["image"]["file_name"] == "invoicegpj.tif"


# 3, on a real Triton -----------------------------------------------------------------------------


@pytest.fixture
def real_gateway(triton_server: EmbeddedTriton, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path / "real",
        triton=TritonSettings(url=triton_server.grpc_url, request_timeout_s=60),
        decode=DecodeSettings(workers=2, file_timeout_s=120),
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


async def test_departed_clients_leave_triton_idle_for_the_next_one(
    real_gateway: str, triton_server: EmbeddedTriton, tmp_path: Path, tile_bytes: bytes
) -> None:
    scene = write_geotiff(render_scene(1_000_404, size=2048), tmp_path / "big.tif").read_bytes()
    host, port = real_gateway.removeprefix("http://").split(":")
    request = predict_request(scene)

    def honest_p50() -> float:
        with httpx.Client(base_url=real_gateway, timeout=60) as client:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                assert (
                    client.post(
                        "/v1/predict", files={"file": ("t.tif", tile_bytes, "image/tiff")}
                    ).status_code
                    == 200
                )
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    idle = honest_p50()
    async with TritonClient(triton_server.grpc_url, TritonSettings()) as triton:
        before = (await triton.statistics()).inference_count
        for _ in range(30):
            with socket.create_connection((host, int(port)), timeout=5) as conn:
                conn.sendall(request)
                time.sleep(0.05)
        time.sleep(1.0)
        after_departures = (await triton.statistics()).inference_count
    loaded = honest_p50()
    tiles_sent = after_departures - before
    assert tiles_sent < 30 * 25 / 3, f"{tiles_sent} tiles inferred for 30 clients that left"
    assert loaded < max(3 * idle, idle + 0.5), (idle, loaded)


def test_bodies_sent_with_their_headers_on_a_kept_alive_connection_pass(
    gateway: Gateway, tile_bytes: bytes
) -> None:
    request = predict_request(tile_bytes)
    assert len(request) > 4 * FAST_LIMITS.max_header_bytes
    with socket.create_connection(gateway.address, timeout=30) as conn:
        reader = conn.makefile("rb")
        for _ in range(3):
            conn.sendall(request)  # headers and the whole body in one write
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(reader.read(length))["detections"]
