"""The results map of the page at ``/`` with 100,000 detections, in headless Chromium (WebGL from
SwiftShader, as the browser tests draw): the page as released at ``--before`` (a git revision) against
the page in this working tree, in the same run, alternating, each run in a fresh browser.

Both pages run unchanged, from a click on a job's "Map" button: the benchmark serves each version's
``gateway/static`` (``/before/``, ``/after/``) with a stand-in for the five job endpoints the page reads
(the job list, the job, its files, ``results.geojson`` and the quicklook), answering one synthetic job:
one 2048 px image (a PNG quicklook) over a 3 km square footprint, with ``--detections`` seeded boxes of
4-6 px spread over it (scores uniform in [0.3, 1), 10 % of them category 2), serialised as the
gateway's GeoJSON is (same properties, one Feature per detection).

Figures per run, all from the page's clock (``performance.now()``):

- ``draw_s``: from the click to the map's first ``idle`` with every detection counted (the GeoJSON's
  download and parse, tiling and the first complete frame); ``counted_s``: from the click to the
  counter showing every detection (the page's own work on the main thread, before the map's);
- ``filter_s``: the score slider moved from 0 to 0.60, until the next ``idle``; ``step_s``: one slider
  step further (0.60 to 0.61), until ``idle``;
- ``frames``: map frames drawn (``render`` events) while the map pans 300 px over 1 s (``panBy``,
  linear, slider back at 0, every detection in view), ``ticks`` the page's ``requestAnimationFrame``
  callbacks in that second, ``worst_frame_s`` the longest gap between two frames of the pan, and
  ``pan_s`` how long the pan took to end (1 s when frames keep up).

Run: ``python -m loadtest.bench_map [--detections 100000] [--rounds 3] [--before c1341b1]``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import mimetypes
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.browser import offline_chromium

REPO = Path(__file__).resolve().parent.parent
STATIC = "gateway/static"
BEFORE = "c1341b1"
"""The page as first released: ``setFilter`` on a fill and a line layer over the whole collection."""
JOB = "bench"
SIDE_PX = 2048
GSD_M = 1.5
CENTRE = (103.5, 1.5)
CATEGORIES = {1: "palm_tree", 2: "building"}
FIGURES = ("counted_s", "draw_s", "filter_s", "step_s", "frames", "ticks", "worst_frame_s", "pan_s")

MEASURE = """
const [expected, done] = [arguments[0], arguments[arguments.length - 1]];
const now = () => performance.now();
const counter = document.getElementById("det-count");
const slider = document.getElementById("score");
const untilMap = () => new Promise((ok) => {
  const poll = () => (window.palmMap ? ok(window.palmMap) : setTimeout(poll, 0));
  poll();
});
(async () => {
  const out = {};
  const counted = new Promise((ok) => {
    const seen = new MutationObserver(() => {
      if (Number(counter.dataset.total) === expected.total) { seen.disconnect(); ok(now()); }
    });
    seen.observe(counter, { attributes: true });
  });
  const start = now();
  document.querySelector('#jobs-body tr[data-job="bench"] td.actions button').click();
  const map = await untilMap();
  const idle = () => new Promise((ok) => map.once("idle", ok));
  await new Promise((ok) => {
    const check = () => (Number(counter.dataset.total) === expected.total ? ok() : map.once("idle", check));
    map.once("idle", check);
  });
  out.draw_s = (now() - start) / 1000;
  out.counted_s = (await counted - start) / 1000;
  out.shown_all = Number(counter.dataset.shown);
  const slide = async (value) => {
    const t = now();
    slider.value = value;
    slider.dispatchEvent(new Event("input"));
    map.triggerRepaint();
    await idle();
    return (now() - t) / 1000;
  };
  out.filter_s = await slide("0.6");
  out.shown_filtered = Number(counter.dataset.shown);
  out.step_s = await slide("0.61");
  await slide("0");
  const frames = [];
  const onRender = () => frames.push(now());
  let ticks = 0;
  let ticking = true;
  const tick = () => { ticks += 1; if (ticking) requestAnimationFrame(tick); };
  map.on("render", onRender);
  const panned = new Promise((ok) => map.once("moveend", ok));
  const t0 = now();
  requestAnimationFrame(tick);
  setTimeout(() => { ticking = false; }, 1000);
  map.panBy([300, 0], { duration: 1000, easing: (x) => x });
  await panned;
  out.pan_s = (now() - t0) / 1000;
  map.off("render", onRender);
  out.frames = frames.filter((t) => t - t0 <= 1000).length;
  out.ticks = ticks;
  const gaps = frames.map((t, i) => t - (i ? frames[i - 1] : t0));
  out.worst_frame_s = Math.max(0, ...gaps) / 1000;
  await idle();
  done(out);
})().catch((error) => done({ error: String(error && error.stack || error) }));
"""


def detections(n: int, seed: int = 20240501) -> tuple[bytes, list[list[float]], float]:
    """The job's GeoJSON (as the gateway writes it), the image's footprint, and the scores' share >= 0.6.

    Boxes sit on a jittered grid of ``ceil(sqrt(n))`` columns over the 2048 px image, 4-6 px a side.
    """
    rng = np.random.default_rng(seed)
    columns = math.ceil(math.sqrt(n))
    pitch = SIDE_PX / columns
    cell = np.arange(n)
    size = rng.uniform(4.0, 6.0, n)
    x0 = (cell % columns) * pitch + rng.uniform(0.0, pitch - size)
    y0 = (cell // columns) * pitch + rng.uniform(0.0, pitch - size)
    scores = np.round(rng.uniform(0.3, 1.0, n), 4)
    classes = np.where(rng.random(n) < 0.1, 2, 1)
    lon0, lat0 = footprint_origin()
    deg_lat = GSD_M / 111_320.0
    deg_lon = deg_lat / math.cos(math.radians(CENTRE[1]))

    def lon(px: np.ndarray[Any, Any]) -> list[float]:
        return (lon0 + px * deg_lon).tolist()  # type: ignore[no-any-return]

    def lat(px: np.ndarray[Any, Any]) -> list[float]:
        return (lat0 - px * deg_lat).tolist()  # type: ignore[no-any-return]

    west, east, north, south = lon(x0), lon(x0 + size), lat(y0), lat(y0 + size)
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[w, s], [e, s], [e, n_], [w, n_], [w, s]]],
            },
            "properties": {
                "category_id": c,
                "category": CATEGORIES[c],
                "score": sc,
                "bbox_px": [round(x, 2), round(y, 2), round(z, 2), round(z, 2)],
                "file_name": "scene-00001.tif",
                "model": "palm/1.1.0",
            },
        }
        for w, e, n_, s, c, sc, x, y, z in zip(
            west,
            east,
            north,
            south,
            classes.tolist(),
            scores.tolist(),
            x0.tolist(),
            y0.tolist(),
            size.tolist(),
            strict=True,
        )
    ]
    collection = {
        "type": "FeatureCollection",
        "model": {"name": "palm", "version": "1.1.0"},
        "warnings": [],
        "features": features,
    }
    side = SIDE_PX
    corners = [[lon0, lat0], [lon0 + side * deg_lon, lat0]]
    corners += [[lon0 + side * deg_lon, lat0 - side * deg_lat], [lon0, lat0 - side * deg_lat]]
    return orjson.dumps(collection), corners, float(np.mean(scores >= 0.6))


def footprint_origin() -> tuple[float, float]:
    """The image's top-left corner (lon, lat), the footprint centred on :data:`CENTRE`."""
    half = SIDE_PX * GSD_M / 2 / 111_320.0
    return CENTRE[0] - half / math.cos(math.radians(CENTRE[1])), CENTRE[1] + half


def quicklook_png(seed: int = 7) -> bytes:
    """A 2048 px RGB PNG with some texture (smooth fields and noise), as the image under the boxes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE_PX, 0:SIDE_PX].astype(np.float32) / SIDE_PX
    field = np.sin(9 * x + 3 * np.cos(7 * y)) + np.cos(11 * y + 2 * np.sin(5 * x))
    base = (60 + 25 * field)[None] + rng.normal(0, 12, (3, SIDE_PX, SIDE_PX))
    base[1] += 30
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    with warnings.catch_warnings(), MemoryFile() as memory:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a PNG, as the gateway's quicklooks
        with memory.open(driver="PNG", width=SIDE_PX, height=SIDE_PX, count=3, dtype="uint8") as png:
            png.write(pixels)
        return bytes(memory.read())


def job_responses(n: int, footprint: list[list[float]]) -> dict[str, bytes]:
    """The JSON the page reads about the synthetic job, by path below ``v1/``."""
    progress = {
        "files_total": 1,
        "files_done": 1,
        "files_failed": 0,
        "tiles_total": 36,
        "tiles_done": 36,
        "tiles_per_second": 0.0,
        "eta_seconds": None,
        "detections": n,
        "percent": 100,
    }
    job = {
        "id": JOB,
        "name": f"{n} detections",
        "status": "succeeded",
        "created_at": "2024-05-01T12:00:00Z",
        "progress": progress,
        "results": {"ready": True},
    }
    file = {
        "position": 1,
        "name": "scene-00001.tif",
        "status": "succeeded",
        "width": SIDE_PX,
        "height": SIDE_PX,
        "tiles": 36,
        "detections": n,
        "warnings": [],
        "error": None,
        "footprint": footprint,
        "links": {"quicklook": f"/v1/jobs/{JOB}/files/1/quicklook"},
    }
    return {
        "jobs": orjson.dumps({"jobs": [job], "next_cursor": None}),
        f"jobs/{JOB}": orjson.dumps(job),
        f"jobs/{JOB}/files": orjson.dumps({"files": [file], "next_cursor": None}),
    }


def handler(roots: dict[str, Path], api: dict[str, bytes]) -> type[BaseHTTPRequestHandler]:
    """Serves ``/<version>/`` from ``roots[version]`` (index.html, static/) and ``/<version>/v1/...``
    from ``api`` (a path below ``v1/`` to a body)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            version, _, rest = self.path.lstrip("/").partition("/")
            rest = rest.split("?")[0]
            if version not in roots:
                return self.answer(HTTPStatus.NOT_FOUND, b"{}", "application/json")
            if rest.startswith("v1/"):
                body = api.get(rest.removeprefix("v1/"))
                if body is None:
                    return self.answer(HTTPStatus.NOT_FOUND, b"{}", "application/problem+json")
                kind = "image/png" if rest.endswith("quicklook") else "application/json"
                return self.answer(HTTPStatus.OK, body, kind)
            path = (roots[version] / (rest or "index.html")).resolve()
            if not path.is_file() or roots[version] not in path.parents:
                return self.answer(HTTPStatus.NOT_FOUND, b"", "text/plain")
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return self.answer(HTTPStatus.OK, path.read_bytes(), kind)

        def answer(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def page_root(folder: Path, revision: str | None) -> Path:
    """``gateway/static`` at ``revision`` (the working tree when None), laid out as the gateway serves
    it: ``index.html`` at the top, the assets under ``static/``."""
    if revision is None:
        static = REPO / STATIC
    else:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", revision, STATIC], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder / "git", filter="data")
        static = folder / "git" / STATIC
    root = folder / "page"
    shutil.copytree(static, root / "static")
    (root / "index.html").write_bytes((static / "app" / "index.html").read_bytes())
    return root.resolve()


@contextmanager
def serving(roots: dict[str, Path], api: dict[str, bytes]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(roots, api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def measure(url: str, expected: dict[str, int]) -> dict[str, Any]:
    with offline_chromium(1280, 1000, webgl=True) as browser:
        browser.set_script_timeout(900)
        browser.get(url)
        WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, f'#jobs-body tr[data-job="{JOB}"] td.actions button')
        )
        result: dict[str, Any] = browser.execute_async_script(MEASURE, expected)
    if "error" in result:
        raise RuntimeError(f"the page failed: {result['error']}")
    for key, count in (("shown_all", expected["total"]), ("shown_filtered", expected["above"])):
        if result[key] != count:
            raise RuntimeError(f"the page counted {result[key]} detections, not {count} ({key})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detections", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="before/after pairs, alternating")
    parser.add_argument("--before", default=BEFORE, help="git revision of the page to compare against")
    parser.add_argument("--only", choices=("before", "after"), help="measure one version only")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()

    geojson, footprint, share = detections(args.detections)
    above = round(share * args.detections)
    api = job_responses(args.detections, footprint)
    api[f"jobs/{JOB}/results.geojson"] = geojson
    api[f"jobs/{JOB}/files/1/quicklook"] = quicklook_png()
    versions = [args.only] if args.only else ["before", "after"]
    runs: list[dict[str, Any]] = []
    print(
        f"{args.detections} detections ({len(geojson) / 2**20:.1f} MiB of GeoJSON), {above} scoring >= 0.6;"
        f" before = {args.before}, after = working tree; {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="bench-map-") as tmp:
        roots = {
            "before": page_root(Path(tmp) / "before", args.before),
            "after": page_root(Path(tmp) / "after", None),
        }
        with serving(roots, api) as base:
            print(f"{'run':>3} {'page':6} {'load1':>5} " + " ".join(f"{f:>13}" for f in FIGURES))
            for round_ in range(args.rounds):
                for version in versions:
                    load = os.getloadavg()[0]
                    figures = measure(f"{base}/{version}/", {"total": args.detections, "above": above})
                    runs.append({"round": round_, "page": version, "load1": load, **figures})
                    cells = " ".join(
                        f"{figures[f]:>13.3f}" if isinstance(figures[f], float) else f"{figures[f]:>13}"
                        for f in FIGURES
                    )
                    print(f"{round_:>3} {version:6} {load:>5.1f} {cells}", flush=True)
    summarise(runs, versions)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


def summarise(runs: list[dict[str, Any]], versions: list[str]) -> None:
    """Medians per page and, with both pages, the median of the per-round ratios after/before."""
    print("medians:")
    for version in versions:
        mine = [r for r in runs if r["page"] == version]
        cells = " ".join(f"{statistics.median(r[f] for r in mine):>13.3f}" for f in FIGURES)
        print(f"    {version:6} {statistics.median(r['load1'] for r in mine):>5.1f} {cells}")
    if versions == ["before", "after"]:
        pairs = [
            (b, a)
            for b in runs
            if b["page"] == "before"
            for a in runs
            if a["page"] == "after" and a["round"] == b["round"]
        ]
        ratios = " ".join(
            f"{statistics.median(a[f] / b[f] if b[f] else math.inf for b, a in pairs):>13.3f}"
            for f in FIGURES
        )
        print(f"    {'after/before':12} {ratios}")


if __name__ == "__main__":
    sys.exit(main())
