"""The page at ``/`` in a real headless Chromium (WebGL from SwiftShader), offline: upload three scenes,
watch the job finish, open its map, count the drawn detections, move the score slider; try
``/v1/predict``; readable at a phone's width.

With ``PALM_SCREENSHOT_DIR`` set, the screenshots of the README are written there
(``PALM_SCREENSHOT_DIR=docs pytest tests/integration/test_web_page.py``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from export.synth import PalmAt, render_scene
from gateway.app import create_app
from gateway.settings import DecodeSettings, JobSettings, Settings
from tests.factories import make_geotiff, north_up
from tests.fakes import FakeInference, K
from tests.integration.browser import offline_chromium
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration

SCORES = (0.35, 0.55, 0.75, 0.95)


def four_boxes(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Four boxes per tile (one per score of :data:`SCORES`, in two categories), placed by the tile's
    content so that neighbouring tiles' boxes do not merge."""
    out = np.zeros((K, 6), np.float32)
    shift = float(tile[:, 100:110, 100:110].mean() % 50)
    for i, score in enumerate(SCORES):
        x = 60 + 90 * i + shift
        out[i] = [x, 150 + shift, x + 40, 190 + shift, score, 1 + i % 2]
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three neighbouring georeferenced scenes, west to east (synthetic palms over terrain)."""
    root = tmp_path_factory.mktemp("web-scenes")
    paths = []
    for i in range(3):
        scene = render_scene(9100 + i, size=768, gsd=0.4, palms=[PalmAt(200.5 + 100 * i, 300.5, 7.0)])
        origin = (500_000.0 + i * 768 * 0.4, 4_000_000.0)
        paths.append(
            make_geotiff(
                root / f"scene-{i + 1}.tif",
                width=768,
                height=768,
                data=scene.pixels,
                transform=north_up(origin, 0.4),
                photometric="RGB",
            )
        )
    return paths


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("web"),
        decode=DecodeSettings(workers=2, file_timeout_s=60),
        jobs=JobSettings(lease_s=5, poll_s=0.2, files_in_flight=2),
    )
    with serve_in_thread(create_app(settings, inference=FakeInference(four_boxes))) as base:
        yield base


def screenshot(browser: WebDriver, name: str, element: str | None = None) -> None:
    """The window (or one element of it) as ``PALM_SCREENSHOT_DIR/name``, when that is set."""
    folder = os.environ.get("PALM_SCREENSHOT_DIR")
    if not folder:
        return
    if element is None:
        browser.save_screenshot(str(Path(folder) / name))
    else:
        browser.find_element(By.ID, element).screenshot(str(Path(folder) / name))


def rendered_detections(browser: WebDriver) -> int:
    """Detections the map's detections layer draws in view, once it has finished rendering."""
    count: int = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const layer = palmMap.getLayer("detections").implementation;
        palmMap.triggerRepaint();
        palmMap.once("idle", () => done(layer.drawnIn(palmMap.getBounds())));
        """
    )
    return count


def outline_pixels(browser: WebDriver) -> dict[str, int]:
    """Pixels of the map's canvas in each category's colour (the boxes' opaque outlines: yellow for
    category 1, blue for category 2), from a screenshot."""
    with warnings.catch_warnings(), MemoryFile(browser.find_element(By.ID, "map").screenshot_as_png) as png:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with png.open() as image:
            rgb = image.read()[:3].astype(np.int16)
    colours = {"yellow": (0xFF, 0xD2, 0x3F), "blue": (0x3F, 0xB8, 0xFF)}
    return {
        name: int((np.abs(rgb - np.array(c, np.int16)[:, None, None]).max(axis=0) <= 2).sum())
        for name, c in colours.items()
    }


def hover(browser: WebDriver, feature: dict[str, Any]) -> str:
    """The popup's text with the mouse over the middle of ``feature`` (a GeoJSON box) on the map."""
    ring = feature["geometry"]["coordinates"][0]
    lng = sum(p[0] for p in ring[:4]) / 4
    lat = sum(p[1] for p in ring[:4]) / 4
    canvas = browser.find_element(By.CSS_SELECTOR, "#map canvas")
    x, y = browser.execute_script(
        "const p = palmMap.project([arguments[0], arguments[1]]); return [p.x, p.y]", lng, lat
    )
    size = canvas.size
    ActionChains(browser).move_to_element_with_offset(
        canvas, round(x - size["width"] / 2), round(y - size["height"] / 2)
    ).perform()
    popup = WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".maplibregl-popup"))
    return str(popup[0].text)


def counter(browser: WebDriver) -> dict[str, Any]:
    element = browser.find_element(By.ID, "det-count")
    return {"shown": int(element.get_attribute("data-shown") or -1), "text": element.text}


def test_upload_three_scenes_watch_the_job_and_filter_its_map(url: str, scenes: list[Path]) -> None:
    with offline_chromium(1280, 1000, webgl=True) as browser:
        browser.set_script_timeout(60)
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 120)
        picker = browser.find_element(By.ID, "pick-files")
        browser.execute_script("arguments[0].hidden = false", picker)
        picker.send_keys("\n".join(str(p) for p in scenes))
        browser.execute_script("arguments[0].hidden = true", picker)
        browser.find_element(By.ID, "job-name").send_keys("three scenes")
        assert "3 file(s)" in browser.find_element(By.ID, "selection").text
        browser.find_element(By.ID, "submit").click()

        wait.until(lambda b: b.find_element(By.ID, "active-line").get_attribute("data-status") == "succeeded")
        wait.until(lambda b: b.find_element(By.ID, "active-map").is_enabled())
        line = browser.find_element(By.ID, "active-line").text
        assert "3/3 files" in line
        browser.find_element(By.CSS_SELECTOR, "#active details summary").click()
        rows = browser.find_elements(By.CSS_SELECTOR, "#active-files tr")
        assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == ["succeeded"] * 3
        job_id = browser.find_element(By.ID, "active-id").text.split("(")[-1].rstrip(")")
        wait.until(
            lambda b: b.find_elements(
                By.CSS_SELECTOR, f'#jobs-body tr[data-job="{job_id}"] .status-succeeded'
            )
        )
        screenshot(browser, "web-page.png")

        browser.find_element(By.ID, "active-map").click()
        wait.until(lambda b: counter(b)["shown"] > 0)
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        features = httpx.get(f"{url}/v1/jobs/{job_id}/results.geojson").json()["features"]
        total = job["progress"]["detections"]
        assert total == len(features) > 0
        assert counter(browser)["shown"] == total
        assert rendered_detections(browser) == total
        images = browser.execute_script(
            "return palmMap.getStyle().layers.filter((l) => l.id.startsWith('image-')).length"
        )
        assert images == 3
        screenshot(browser, "web-map.png", "results")
        every = outline_pixels(browser)
        assert every["yellow"] > 0, every
        assert every["blue"] > 0, every
        best = max(features, key=lambda f: f["properties"]["score"])
        props = best["properties"]
        assert hover(browser, best) == f"{props['category']} {props['score']:.2f} ({props['file_name']})"

        slider = browser.find_element(By.ID, "score")
        browser.execute_script(
            "arguments[0].value = '0.6'; arguments[0].dispatchEvent(new Event('input'))", slider
        )
        above = sum(1 for f in features if f["properties"]["score"] >= 0.6)
        assert 0 < above < total
        assert counter(browser)["shown"] == above
        assert f"{above} of {total}" in counter(browser)["text"].replace(",", "")
        assert rendered_detections(browser) == above
        assert browser.find_element(By.ID, "score-value").text == "0.60"
        some = outline_pixels(browser)
        assert 0 < some["yellow"] < every["yellow"], (every, some)
        assert 0 < some["blue"] < every["blue"], (every, some)

        browser.execute_script("window.firstBoxes = palmMap.getLayer('detections').implementation")
        browser.find_element(By.ID, "active-map").click()
        wait.until(
            lambda b: b.execute_script(
                "const layer = palmMap.getLayer('detections');"
                "return Boolean(layer) && layer.implementation !== window.firstBoxes"
            )
        )
        assert rendered_detections(browser) == above
        assert counter(browser)["shown"] == above

        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith(url) or name.startswith("blob:") for name in resources), resources


def test_try_predict_draws_the_boxes_of_one_image(url: str, scenes: list[Path]) -> None:
    expected = len(
        httpx.post(
            f"{url}/v1/predict", files={"file": (scenes[0].name, scenes[0].read_bytes())}, timeout=60
        ).json()["detections"]
    )
    with offline_chromium(webgl=True) as browser:
        browser.get(f"{url}/")
        picker = browser.find_element(By.ID, "try-file")
        browser.execute_script("arguments[0].hidden = false", picker)
        picker.send_keys(str(scenes[0]))
        canvas = WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.CSS_SELECTOR, "#try-canvas[data-boxes]")
        )
        assert int(canvas.get_attribute("data-boxes") or -1) == expected > 0
        assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("768", "768")
        assert f"{expected} detection(s)" in browser.find_element(By.ID, "try-line").text


def test_the_page_fits_a_phone_and_keeps_an_api_key_for_the_session(url: str) -> None:
    with offline_chromium(390, 844) as browser:
        browser.get(f"{url}/")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#jobs-body tr"))
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        browser.find_element(By.ID, "api-key").send_keys("k-secret")
        browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        assert browser.execute_script("return sessionStorage.getItem('palm-serve-api-key')") == "k-secret"
        assert browser.find_element(By.ID, "key-state").text == "key set for this tab"
        focusable = browser.execute_script(
            "return ['drop', 'try-drop', 'score'].map((id) => document.getElementById(id).tabIndex)"
        )
        assert all(index >= 0 for index in focusable)
        screenshot(browser, "web-phone.png")
