"""Opens a local HTML file in headless Debian Chromium (Selenium + chromedriver) and reads facts.

Tests that need it carry ``pytest.mark.skipif(not CHROMIUM_AVAILABLE, reason=CHROMIUM_MISSING)``.
Chromium and its driver are the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run``
installs them); the driver path is given explicitly, so Selenium Manager never looks for (or
downloads) a driver, and the flags below keep Chromium off the network.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import pathlib
import tempfile
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_AVAILABLE = (
    all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER))
    and importlib.util.find_spec("selenium") is not None
)
CHROMIUM_MISSING = (
    f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver) and selenium"
)

_WIDTH = 1280
_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    f"--window-size={_WIDTH},900",
)
_FACTS = """
const images = Array.from(document.images);
return {
  title: document.title,
  images: images.length,
  loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
  text: document.body.innerText,
  scroll_height: document.documentElement.scrollHeight,
};
"""


def open_in_chromium(path: str) -> dict:
    """Loads ``path`` in a fresh headless Chromium and returns what the rendered page shows.

    Also saves a full-page screenshot beside the file (``report.html`` -> ``report.png``): the
    window is resized to the page's scroll height first. The driver always quits.

    Args:
        path: a local HTML file.

    Returns:
        ``title``, ``images`` (number of ``<img>``), ``loaded`` (those complete with a natural
        width, i.e. truly decoded), ``text`` (the body's innerText), ``scroll_height`` and
        ``screenshot`` (the PNG's path).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(pathlib.Path(path).resolve().as_uri())  # returns after the load event
            facts = driver.execute_script(_FACTS)
            screenshot = os.path.splitext(path)[0] + ".png"
            _full_page_screenshot(driver, facts["scroll_height"], screenshot)
        finally:
            driver.quit()
    return {**facts, "screenshot": screenshot}


def _full_page_screenshot(driver: Any, height: int, out: str) -> None:
    """Sizes the window to the page's height and captures the whole page as a PNG.

    Headless Chromium does not always give the viewport the height asked for (the window frame
    takes some, and tall windows are clamped), so the capture goes through the DevTools protocol
    with ``captureBeyondViewport``, clipped to the full page, instead of ``save_screenshot``.
    """
    driver.set_window_size(_WIDTH, height)
    clip = {"x": 0, "y": 0, "width": _WIDTH, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    with open(out, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
