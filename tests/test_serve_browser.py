"""The page of `arm-jax serve` in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Without the browser these tests are skipped, unless ARM_JAX_REQUIRE_BROWSER is set (CI
sets it: there a missing browser is a failure). A screenshot of the page is written to
$ARM_JAX_TEST_ARTEFACTS (if set) as serve.png.
"""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serving import ServerProcess, write_models

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Offline: no first-run, sync, component updates or background fetches (each would retry refused connections).
QUIET_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage")
# A fake camera (a test pattern) that is granted without asking.
FAKE_CAMERA_FLAGS = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
WAIT_S = 60

# Slow tier: a Chromium process and a server of its own (the fast tier checks the API in test_serve.py).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("ARM_JAX_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in QUIET_FLAGS + FAKE_CAMERA_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=960,760")
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    models = write_models(root)
    with ServerProcess(models.onnx, root / "server.log", "--no-access-log") as server:
        yield server, models


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=f"waited {WAIT_S} s for {what}")


def test_page_shows_the_face_in_a_photo_and_its_expression(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    server, models = served
    with models.astronaut.open("rb") as photo:
        api = httpx.post(f"{server.url}/v1/predict?detect_faces=true", files={"image": ("astronaut.png", photo)},
                         timeout=60).json()
    (face,) = api["faces"]
    browser.get(server.url)
    wait_for(browser, lambda d: "onnxruntime" in d.find_element(By.ID, "model").text, "the model's description")
    browser.find_element(By.ID, "file").send_keys(str(models.astronaut))
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"),
             "the answer")
    assert browser.find_element(By.ID, "status").text == "1 face"
    (box,) = browser.find_elements(By.CSS_SELECTOR, "#boxes .box")
    expression = face["expression"]
    assert box.get_attribute("data-expression") == expression
    assert box.text == f"{expression} {face['probabilities'][expression]:.2f}"
    # The box sits where the API says, on the photo as displayed.
    photo = browser.find_element(By.ID, "photo").rect
    scale = photo["width"] / 512
    left, top, width, _ = face["box"]
    assert abs(box.rect["x"] - photo["x"] - left * scale) <= 2 and abs(box.rect["y"] - photo["y"] - top * scale) <= 2
    assert abs(box.rect["width"] - width * scale) <= 2
    (card,) = browser.find_elements(By.CSS_SELECTOR, "#faces .face")
    bars = card.find_elements(By.CSS_SELECTOR, ".bar")
    assert [b.find_element(By.CSS_SELECTOR, ".name").text for b in bars] == list(face["probabilities"])
    assert [b.find_element(By.CSS_SELECTOR, ".name").text for b in bars if "top" in b.get_attribute("class")] == \
        [expression]
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors  # no script error, nothing the Content-Security-Policy blocked
    screenshot = tmp_path / "serve.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("ARM_JAX_TEST_ARTEFACTS"):
        shutil.copy(screenshot, Path(os.environ["ARM_JAX_TEST_ARTEFACTS"]) / "serve.png")


def test_webcam_frames_of_the_fake_camera_show_no_face(browser, served):
    """Chromium's fake camera shows a test pattern: frames are sent and the page says that no face is found."""
    from selenium.webdriver.common.by import By

    server, _ = served
    before = sum(httpx.get(f"{server.url}/v1/stats").json()["responses"].values())
    browser.get(server.url)
    camera = wait_for(browser, lambda d: d.find_element(By.ID, "camera"), "the camera button")
    wait_for(browser, lambda d: camera.is_displayed(), "the camera button to show")
    camera.click()
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text in ("no face found",)
             or d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error", "a camera frame's answer")
    assert browser.find_element(By.ID, "status").text == "no face found"
    assert browser.find_element(By.ID, "video").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#boxes .box") == []
    wait_for(browser, lambda d: sum(httpx.get(f"{server.url}/v1/stats").json()["responses"].values()) >= before + 3,
             "three frames")  # it goes on sending frames, one after the other
    camera.click()
    assert browser.find_element(By.ID, "camera").text == "Use the camera"
