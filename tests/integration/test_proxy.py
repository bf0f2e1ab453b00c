"""The shipped reverse-proxy configuration (``deploy/nginx.conf``) in front of a real gateway.

Debian's nginx runs the file as shipped, with only its upstream pointed at the test's gateway on
127.0.0.1 and its listen port and runtime paths moved into a temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from export.synth import render_scene, write_geotiff
from gateway.app import create_app
from gateway.serving import listen
from gateway.settings import REPO_ROOT, DecodeSettings, Settings
from tests.fakes import FakeInference, fixed_box
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

NGINX = "/usr/sbin/nginx"


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[str]:
    """The proxy's URL, with a gateway (fake inference backend) behind it."""
    if shutil.which(NGINX) is None:
        pytest.fail(f"{NGINX} is needed (apt-get install nginx-light)")
    settings = Settings(data_dir=tmp_path / "data", decode=DecodeSettings(workers=1))
    app = create_app(settings, inference=FakeInference(fixed_box(10, 10, 30, 30)))
    with serve_in_thread(app) as gateway, listen("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]
        probe.close()
        conf = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
        conf = conf.replace("server gateway:8000;", f"server {gateway.removeprefix('http://')};")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("access_log /dev/stdout;", f"access_log {tmp_path}/access.log;")
        conf = conf.replace("error_log /dev/stderr warn;", f"error_log {tmp_path}/error.log warn;")
        (tmp_path / "nginx.conf").write_text(conf)
        prefix = ["-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", f"pid {tmp_path}/nginx.pid;"]
        check = subprocess.run([NGINX, "-t", *prefix], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        for name in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
            (tmp_path / name).mkdir(exist_ok=True)
        with open(tmp_path / "nginx.stderr", "wb") as stderr:
            server = subprocess.Popen([NGINX, *prefix, "-g", "daemon off;"], stderr=stderr)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            yield url
        finally:
            server.terminate()
            server.wait(20)


def test_the_proxy_passes_predictions_and_refuses_oversized_headers(proxied: str, tmp_path: Path) -> None:
    tile = write_geotiff(render_scene(1_000_601, size=512), tmp_path / "t.tif").read_bytes()
    with httpx.Client(base_url=proxied, timeout=60) as client:
        response = client.post("/v1/predict", files={"file": ("t.tif", tile, "image/tiff")})
        assert response.status_code == 200, response.text
        assert response.json()["detections"][0]["bbox"] == [10.0, 10.0, 20.0, 20.0]
        assert len(response.headers["x-request-id"]) == 32  # nginx's $request_id reached the gateway
    host, port = proxied.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
