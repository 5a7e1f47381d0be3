"""The /playground page in a real headless Chromium (Debian's chromium + chromium-driver, via selenium)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from server.config import ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained"),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed"),
]
TOKEN = "playground-admin"


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token=TOKEN, max_batch=8)
    with running_server(config) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, and nothing that phones home: this machine's network is closed.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def _wait(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def test_compose_run_side_by_side_and_pin(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server + "/playground")
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters .adapter")) == 4)
    assert not d.find_element(By.ID, "pin").is_enabled()  # read-only without the admin token

    # Compose ties(sql, json) with density 0.5: untick the two code adapters, set the knob.
    for row in d.find_elements(By.CSS_SELECTOR, "#adapters .adapter"):
        if row.get_attribute("data-name") in ("python", "pystr"):
            row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    Select(d.find_element(By.ID, "method")).select_by_value("ties")
    density = d.find_element(By.CSS_SELECTOR, "#params [data-param=density]")
    density.clear()
    density.send_keys("0.5")
    mix = d.execute_script("return composedMix()")
    assert mix["method"] == "ties" and mix["density"] == 0.5
    assert sorted(c["adapter"] for c in mix["children"]) == ["json", "sql"]
    d.find_element(By.ID, "addColumn").click()
    # A second column: DELLA over all four (ticked back), a third: the json adapter by name.
    for row in d.find_elements(By.CSS_SELECTOR, "#adapters .adapter"):
        if row.get_attribute("data-name") in ("python", "pystr"):
            row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    Select(d.find_element(By.ID, "method")).select_by_value("della")
    d.find_element(By.ID, "addColumn").click()
    Select(d.find_element(By.ID, "model")).select_by_value("json")
    d.find_element(By.ID, "addModel").click()
    assert len(d.find_elements(By.CSS_SELECTOR, "#columns .col")) == 3

    d.find_element(By.ID, "run").click()
    _wait(d, lambda d: all(c.get_attribute("data-done") for c in d.find_elements(By.CSS_SELECTOR, "#columns .col")))
    for col in d.find_elements(By.CSS_SELECTOR, "#columns .col"):
        assert col.get_attribute("data-done") == "ok", col.text
        text = col.find_element(By.CSS_SELECTOR, ".out").text
        stats = col.find_element(By.CSS_SELECTOR, ".stats").text
        assert text.strip(), col.text  # streamed text arrived
        assert "TTFT" in stats and "tok/s" in stats and "cache" in stats, stats
    outputs = [c.find_element(By.CSS_SELECTOR, ".out").text for c in d.find_elements(By.CSS_SELECTOR, "#columns .col")]
    assert outputs[2].startswith('{"name": "pudo"')  # the json adapter alone answers the demo prompt
    stats = [c.find_element(By.CSS_SELECTOR, ".stats").text for c in d.find_elements(By.CSS_SELECTOR, "#columns .col")]
    assert "cache miss" in stats[0] and "merge" in stats[0] and "no merge" not in stats[0]

    # The live panel reads the server's metrics.
    _wait(d, lambda d: "cache entries" in d.find_element(By.ID, "live").text, timeout=10)

    # With the admin token, "pin this mix" works and the pin shows up as a model.
    d.find_element(By.ID, "adminToken").send_keys(TOKEN)
    assert d.find_element(By.ID, "pin").is_enabled()
    d.find_element(By.ID, "pinName").send_keys("pg-della")
    d.find_element(By.ID, "pin").click()
    _wait(d, lambda d: "pinned pg-della" in d.find_element(By.ID, "composeMsg").text, timeout=60)
    models = {m["id"] for m in httpx.get(server + "/v1/models").json()["data"]}
    assert "pg-della" in models

    shot = Path(os.environ.get("MIXSERVE_PLAYGROUND_SCREENSHOT", tmp_path / "playground.png"))
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_playground_needs_nothing_from_the_internet(server):
    page = httpx.get(server + "/playground").text
    assert "<script>" in page and "http://" not in page and "https://" not in page.replace("https://arxiv", "")
    methods = httpx.get(server + "/playground/methods").json()["methods"]
    assert {"ties", "della", "tsv", "iso_c"} <= {m["name"] for m in methods}
