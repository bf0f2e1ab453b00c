"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) for tests and benchmarks of the pages we
serve (``loadtest/bench_map.py`` starts it too, hence no pytest here).

The browser resolves no host but 127.0.0.1, so a page that needs anything from the internet (a CDN
script, a web font) fails to render in these tests just as it would on an air-gapped machine.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def offline_chromium(
    width: int = 1280, height: int = 900, *, webgl: bool = False
) -> Iterator[webdriver.Chrome]:
    """A headless Chromium that can reach 127.0.0.1 and nothing else; quit when the block exits.

    With ``webgl`` the page gets WebGL from SwiftShader, the CPU renderer Chromium ships (maps draw
    with it); without it the GPU is off.
    """
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        raise RuntimeError(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)"
        )
    with tempfile.TemporaryDirectory(prefix="palm-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            *(
                ("--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader")
                if webgl
                else ("--disable-gpu",)
            ),
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--no-proxy-server",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()
