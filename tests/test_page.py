"""The page at GET / in a real headless browser (Debian's chromium driven by selenium through chromium-driver):
upload a CamVid photo, see the cut-out at the photo's size, download the PNG; a bad file shows its error.

Set BGREMOVER_PAGE_SCREENSHOT=docs/serve_page.png to also save the page with a cut-out shown (the README's).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgremover.images import encode_png
from bgremover.predict import BackgroundRemover
from bgremover.serve import Service

# The live uvicorn helper lives in test_serve.py; load it by path (the pattern test_predict_cli.py uses).
_spec = importlib.util.spec_from_file_location("_bgr_test_serve", Path(__file__).with_name("test_serve.py"))
_ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ts)
live_server, EXAMPLE = _ts.live_server, _ts.EXAMPLE

WAIT = 20.0  # seconds for any one thing to appear on the page (a cut-out takes ~0.2 s here)


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the page test: .ci/run installs chromium and chromium-driver)")
    pytest.skip(reason)


def _binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        _unavailable("Debian's chromium/chromedriver not installed: apt-get install -y chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def remover() -> BackgroundRemover:
    return BackgroundRemover()


@pytest.fixture(scope="module")
def base(remover):
    with live_server(Service(remover, workers=2)) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    browser_bin, driver_bin = _binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        _unavailable("selenium is not installed: pip install -e '.[dev]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_bin  # Debian's build: selenium must never download a browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(driver_bin), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, what: str):
    """Poll a JS expression until it is truthy; its value, or a failure naming `what` and the page's error."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.05)
    error = driver.execute_script("return document.getElementById('error').textContent")
    raise AssertionError(f"timed out waiting for {what} (page error: {error!r})")


def severe_logs(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    # the class checkboxes are filled from GET /model, with the model's default foreground ticked
    wait_for(driver, "document.querySelectorAll('#classes input').length === 11", "class checkboxes")
    ticked = driver.execute_script("return [...document.querySelectorAll('#classes input:checked')].map(b => b.value)")
    assert ticked == ["Car", "Pedestrian", "Bicyclist"]
    assert "deeplabv3plus_mobilenet_v2" in driver.find_element("id", "model-info").text


def test_upload_shows_cutout_and_downloads_png(browser, base, remover):
    open_page(browser, base)
    browser.find_element("id", "file").send_keys(str(EXAMPLE))
    size = wait_for(browser, "(() => { const i = document.getElementById('result');"
                    " return !i.hidden && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null })()",
                    "the cut-out image")
    with Image.open(EXAMPLE) as src:
        assert tuple(size) == src.size == (480, 360)
    assert browser.find_element("id", "error").is_displayed() is False
    # the original sits beside it, both on the checkerboard
    assert browser.execute_script("return document.getElementById('original').naturalWidth") == 480
    assert len(browser.find_elements("css selector", ".checker img:not([hidden])")) == 2
    link = browser.find_element("id", "download")
    assert link.get_attribute("download") == "0001TP_008910.nobg.png"
    assert link.get_attribute("href").startswith("blob:")

    link.click()
    deadline = time.monotonic() + WAIT
    target = browser.downloads / "0001TP_008910.nobg.png"
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.exists(), f"nothing downloaded: {list(browser.downloads.iterdir())}"
    data = target.read_bytes()
    assert data == encode_png(remover.remove(EXAMPLE))  # the very PNG the library makes
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGBA" and img.size == (480, 360)

    # an option change re-runs the same photo: mask only gives an L-mode mask and a .mask.png name
    browser.find_element("css selector", "input[name=mode][value=mask]").click()
    wait_for(browser, "document.getElementById('download').download === '0001TP_008910.mask.png'", "the mask")
    href = browser.find_element("id", "download").get_attribute("href")
    b64 = browser.execute_async_script(
        "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        " let s = ''; new Uint8Array(b).forEach(c => { s += String.fromCharCode(c); }); done(btoa(s)); })"
        ".catch(e => done('error: ' + e));", href)
    assert not b64.startswith("error:"), b64
    mask = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(remover.mask(EXAMPLE)))
    assert severe_logs(browser) == []  # no failed loads, no CSP violations, no script errors

    if os.environ.get("BGREMOVER_PAGE_SCREENSHOT"):  # the README's picture: the frame with the clearest car
        browser.set_window_size(1280, 900)
        browser.find_element("css selector", "input[name=mode][value=cutout]").click()
        browser.find_element("id", "file").send_keys(str(EXAMPLE.with_name("0001TP_009180.jpg")))
        wait_for(browser, "document.getElementById('download').download === '0001TP_009180.nobg.png'"
                 " && document.getElementById('result-info').textContent", "the screenshot's cut-out")
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        # a 256-colour palette keeps the picture small: the page is flat colours around two photos
        shot.quantize(256, method=Image.Quantize.MEDIANCUT).save(os.environ["BGREMOVER_PAGE_SCREENSHOT"], optimize=True)


def test_bad_file_shows_clear_error(browser, base, tmp_path):
    open_page(browser, base)
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello, I am a text file, not a photo\n")
    browser.find_element("id", "file").send_keys(str(bad))
    message = wait_for(browser, "(() => { const e = document.getElementById('error');"
                       " return e.hidden ? '' : e.textContent })()", "the error message")
    assert "notes.jpg" in message and "not a recognised image file" in message
    assert browser.find_element("id", "error").is_displayed()
    assert browser.execute_script("return document.getElementById('result').hidden") is True
    assert browser.find_element("id", "download").get_attribute("aria-disabled") == "true"
    # then a good photo clears the error
    browser.find_element("id", "file").send_keys(str(EXAMPLE))
    wait_for(browser, "document.getElementById('error').hidden && document.getElementById('result').naturalWidth",
             "the cut-out after the error")


def test_a_new_file_or_no_class_stops_the_cutout_in_flight(browser, remover, tmp_path):
    """A photo still being cut out when the user picks a file over the size limit: its answer then arrived,
    cleared the size error and showed the old photo's cut-out, offered for download under the new file's name.
    And unticking every class while one was in flight left the spinner turning for good."""
    gated = _ts.GatedRemover(remover)
    service = Service(gated, workers=1, max_bytes=_ts.MAX_BYTES)
    with live_server(service) as url:
        try:
            open_page(browser, url)
            big = tmp_path / "big.jpg"
            big.write_bytes(b"\xff" * (_ts.MAX_BYTES + 1))
            browser.find_element("id", "file").send_keys(str(EXAMPLE))
            assert gated.entered.wait(WAIT), "the upload never reached the model"
            browser.find_element("id", "file").send_keys(str(big))
            gated.gate.set()  # the first photo's cut-out finishes now
            deadline = time.monotonic() + WAIT
            while service.served < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert service.served == 1
            time.sleep(0.5)  # time for the page to have handled that answer, had it still been listening
            state = browser.execute_script(
                "return [document.getElementById('error').hidden, document.getElementById('error').textContent,"
                " document.getElementById('result').hidden, document.getElementById('download').getAttribute('href'),"
                " document.getElementById('spinner').hidden]")
            assert state[0] is False and "big.jpg" in state[1] and "accepts up to" in state[1], state
            assert state[2] is True and state[3] is None and state[4] is True, state

            gated.entered.clear()
            gated.gate.clear()
            browser.find_element("id", "file").send_keys(str(EXAMPLE))
            assert gated.entered.wait(WAIT), "the second upload never reached the model"
            browser.find_element("id", "cls-none").click()
            wait_for(browser, "document.getElementById('error').textContent.includes('at least one class')",
                     "the no-class message")
            wait_for(browser, "document.getElementById('spinner').hidden"
                     " && !document.getElementById('result-stage').classList.contains('busy')", "the spinner to stop")
        finally:
            gated.gate.set()  # a failed check must not leave the worker waiting 30 s


def test_an_old_error_goes_when_the_next_cutout_starts_and_a_refused_file_stays_unsent(browser, remover, tmp_path):
    """After a bad file's error, the next photo's cut-out ran under that error (for seconds on a large photo, the
    page said "Could not cut out notes.jpg" beside the new photo's spinner). And after a file over the size limit
    was refused, ticking an option uploaded it anyway, and the server's 413 replaced the page's own message."""
    gated = _ts.GatedRemover(remover)
    gated.gate.set()
    service = Service(gated, workers=1, max_bytes=_ts.MAX_BYTES)
    with live_server(service) as url:
        try:
            open_page(browser, url)
            bad = tmp_path / "notes.jpg"
            bad.write_text("hello, I am a text file, not a photo\n")
            browser.find_element("id", "file").send_keys(str(bad))
            wait_for(browser, "!document.getElementById('error').hidden", "the bad file's error")
            gated.gate.clear()
            gated.entered.clear()
            browser.find_element("id", "file").send_keys(str(EXAMPLE))
            assert gated.entered.wait(WAIT), "the upload never reached the model"
            state = browser.execute_script("return [document.getElementById('error').hidden,"
                                           " document.getElementById('error').textContent,"
                                           " document.getElementById('spinner').hidden]")
            assert state[0] is True and state[2] is False, state  # the new photo's spinner, no old error
            gated.gate.set()
            wait_for(browser, "document.getElementById('result').naturalWidth", "the cut-out")

            big = tmp_path / "big.jpg"
            big.write_bytes(b"\xff" * (_ts.MAX_BYTES + 1))
            browser.find_element("id", "file").send_keys(str(big))
            wait_for(browser, "document.getElementById('error').textContent.includes('accepts up to')", "the size error")
            browser.find_element("id", "refine").click()
            time.sleep(1.0)  # the re-run's 120 ms delay, and an upload's answer had one been sent
            message = browser.execute_script("return document.getElementById('error').textContent")
            assert "big.jpg" in message and "accepts up to" in message, message
            assert browser.execute_script("return document.getElementById('spinner').hidden") is True
        finally:
            gated.gate.set()
