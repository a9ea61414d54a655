"""The web page in a real browser: headless Debian Chromium driven by Selenium.

The page is loaded from a real server beside a live pipeline; a WAV is
uploaded through the form, and the verdict must appear on the page, equal
to what the API answers for the same file. The screenshot goes to the test's
tmp dir; with SOUNDWATCH_SAVE_SCREENSHOT=1 it is also saved as
docs/img/web-ui.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from soundwatch.bundle import load_bundle
from tests.httpkit import TOKEN, bundle_dir, make_runtime, run_until_events, running_server
from tests.httpkit import write_wav as write_clip

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = REPO / "docs" / "img" / "web-ui.png"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(
        "Debian chromium and chromium-driver are not installed "
        "(apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = Options()
    options.binary_location = CHROMIUM
    # The flags this machine's docs give for headless Chromium as root on a
    # closed network, and a fresh profile.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1560",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _upload(driver: Any, wav: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(wav))
    driver.find_element(By.ID, "classify").click()
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("data-state") in ("done", "error")
    )


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_shows_live_state_and_classifies_an_upload(browser: Any, tmp_path: Path) -> None:
    path = bundle_dir()
    runtime = make_runtime(tmp_path, path)
    wav = write_clip(tmp_path / "fan-clip.wav", 10.0)
    with running_server(runtime.bundle, runtime) as srv:
        run_until_events(runtime, 6)
        expected = requests.post(
            srv.url + "/inference", files={"file": wav.open("rb")}, timeout=30
        ).json()

        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 20)
        # Model info, live state and events arrive through the JSON API.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model-classes li"))
        wait.until(lambda d: "waiting" not in _text(d, "current-class"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#events-body tr td.num"))
        wait.until(lambda d: _text(d, "health-text") == "healthy")
        assert _text(browser, "model-version") == runtime.bundle.model_version
        # Which unit this page is about: the device id, and the source as opened.
        assert _text(browser, "device-id") == runtime.config.device_id
        wait.until(lambda d: _text(d, "source").startswith(f"{runtime.config.source.type}: "))
        assert Path(runtime.source.health().device).name in _text(browser, "source")
        assert "dBFS" in _text(browser, "rms-value")
        live_rows = browser.find_elements(By.CSS_SELECTOR, "#live-probs .bar")
        assert len(live_rows) == len(runtime.bundle.classes)

        _upload(browser, wav)
        assert browser.find_element(By.ID, "result").get_attribute("data-state") == "done"
        assert _text(browser, "result-label") == expected["Label"]
        assert _text(browser, "result-badge") == ("ANOMALY" if expected["Anomaly"] else "OK")
        assert expected["Details"]["Message"] in _text(browser, "result-message")
        bars = browser.find_elements(By.CSS_SELECTOR, "#result-probs .bar")
        assert [b.get_attribute("data-cls") for b in bars] == expected["Classes"]
        top = browser.find_element(By.CSS_SELECTOR, "#result-probs .bar.best")
        assert top.get_attribute("data-cls") == expected["Label"]

        # Everything the page loaded came from the module itself.
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(str(r).startswith(srv.url) for r in resources), resources
        assert _console_errors(browser) == []

        shot = tmp_path / "web-ui.png"
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("SOUNDWATCH_SAVE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)


def test_page_asks_for_the_token_and_reports_bad_uploads(browser: Any, tmp_path: Path) -> None:
    from soundwatch.bundle import load_bundle

    bundle = load_bundle(bundle_dir())
    wav = write_clip(tmp_path / "clip.wav", 10.0)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a sound\n" * 100)
    with running_server(bundle, token=TOKEN) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "tokenbar").is_displayed())
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model-classes li"))
        assert not browser.find_element(By.ID, "tokenbar").is_displayed()

        _upload(browser, not_audio)
        assert browser.find_element(By.ID, "result").get_attribute("data-state") == "error"
        error = _text(browser, "result-error")
        assert "415" in error and "not an audio format" in error

        _upload(browser, wav)
        assert browser.find_element(By.ID, "result").get_attribute("data-state") == "done"
        assert _text(browser, "result-label") in bundle.class_names
        browser.execute_script("localStorage.clear()")


def test_docs_show_their_pictures_and_link_to_the_reference_pages(browser: Any) -> None:
    bundle = load_bundle(bundle_dir())
    _console_errors(browser)  # what earlier tests left in the log
    with running_server(bundle) as srv:
        browser.get(srv.url + "/docs")
        pictures = browser.find_elements(By.CSS_SELECTOR, "article img")
        assert len(pictures) >= 3  # the flow, this model's and the previous confusion matrices
        for picture in pictures:
            # Pictures load lazily: each as a reader scrolls to it.
            browser.execute_script("arguments[0].scrollIntoView()", picture)
            WebDriverWait(browser, 10).until(
                lambda d, p=picture: d.execute_script("return arguments[0].naturalWidth", p) > 0
            )
        browser.execute_script("window.scrollTo(0, 0)")
        browser.find_element(By.LINK_TEXT, "MQTT and Home Assistant").click()
        WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith("/docs/mqtt.md"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "MQTT and Home Assistant"
        browser.find_element(By.LINK_TEXT, "commands.md").click()
        WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith("/docs/commands.md"))
        assert not _console_errors(browser)


def test_page_shows_how_far_the_units_baseline_is_learned(browser: Any, tmp_path: Path) -> None:
    """A fresh unit learns its baseline: the page says how far ("learning: 0:42 of 1:00:00")."""
    import re
    import threading

    from soundwatch.app import Runtime
    from soundwatch.config import load_config

    wav = write_clip(tmp_path / "fan.wav", 12.0, fault="normal")
    config = load_config(
        None,
        env={},
        overrides={
            "source": {"type": "file", "path": str(wav), "loop": True, "realtime": False},
            "sinks": [],
            "state_dir": str(tmp_path / "state"),
            "model.bundle": str(bundle_dir()),
            "baseline": {"learn_s": 3600},
        },
    )
    runtime = Runtime(config)
    _console_errors(browser)  # what earlier tests left in the log
    stop = threading.Event()
    worker = threading.Thread(target=runtime.run, args=(stop,), name="pipeline", daemon=True)
    with running_server(runtime.bundle, runtime) as srv:
        worker.start()
        try:
            browser.get(srv.url + "/")
            WebDriverWait(browser, 30).until(lambda d: "learning: " in _text(d, "baseline-text"))
            text = _text(browser, "baseline-text")
            assert re.match(r"learning: \d+:\d\d of 1:00:00 · ", text), text
            assert re.fullmatch(r"\d+ %", _text(browser, "baseline-value"))
            assert not _console_errors(browser)
        finally:
            stop.set()
            worker.join(30)
