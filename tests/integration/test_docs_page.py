"""``/docs`` renders in a real browser with no network beyond the gateway itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from gateway.app import create_app
from gateway.decode import DecodePool
from gateway.pipeline.result import ModelInfo
from gateway.predictor import Predictor
from gateway.settings import DecodeSettings, Settings
from tests.fakes import FAKE_CONTRACT, FakeInference, fixed_box
from tests.integration.browser import offline_chromium
from tests.integration.server import serve_in_thread

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway_url(tmp_path: Path) -> Iterator[str]:
    """The gateway around the fake inference backend: the page needs no model."""
    settings = Settings(data_dir=tmp_path, decode=DecodeSettings(workers=1))
    pool = DecodePool(settings.decode, settings.limits, tile_size=512)
    predictor = Predictor(
        pool,
        FakeInference(fixed_box(1, 1, 2, 2)),
        ModelInfo("palm", "1.1.0", None, contract=FAKE_CONTRACT),
        tiling=settings.tiling,
        triton=settings.triton,
    )
    with serve_in_thread(create_app(settings, predictor=predictor)) as url:
        yield url


def test_swagger_ui_renders_offline_from_the_package(gateway_url: str) -> None:
    with offline_chromium() as browser:
        browser.get(f"{gateway_url}/docs")
        wait = WebDriverWait(browser, 30)
        title = wait.until(
            expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, ".info .title"))
        )
        assert "Palm Serve" in title.text
        operation = wait.until(
            expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path"))
        )
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert "/v1/predict" in paths, operation.text
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources, "the page loaded no script or stylesheet"
        assert all(name.startswith(gateway_url) for name in resources), resources
