"""`vargpt ui`: the gradio page over the embedded default model, served on a free 127.0.0.1 port and driven in
headless Chromium (selenium + Debian's chromium and chromium-driver; a missing browser fails the test with the
install command, it is never skipped).

Generate: a bad size is a one-line error pop-up; a prompt gives a gallery of images of the requested size, equal to
`pipe.generate`, plus one coarse-to-fine preview per scale; the page fetched nothing from outside. Chat: a ShapesWorld
picture and a question are answered as `pipe.chat` answers. Edit: a corrupt upload is a one-line error; an image
and an instruction give the result `pipe.edit` gives. The CLI binds loopback by default.

The Generate test saves a full-page screenshot to a temporary path; ``VARGPT_UI_SCREENSHOT=docs/ui.png pytest
tests/test_ui.py -k generate`` refreshes the README's screenshot with the same code.
"""

from __future__ import annotations

import base64
import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from vargpt.eval.tasks import vqa_cases
from vargpt.pipeline import VARGPTPipeline
from vargpt.ui import MAX_NEW_TOKENS, launch

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the networking switches Chromium keeps dialling Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"]
WAIT_S = 60
PROMPT = "A red circle above a blue square."

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # gradio's use of pandas


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained(device="cpu", progress=False)


@pytest.fixture(scope="module")
def url(pipe) -> Iterator[str]:
    port = free_port()
    demo = launch(pipe, port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the web UI test drives headless Chromium; install it with "
                    "`apt-get install -y chromium chromium-driver` (as root; .ci/run does this)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path too, Selenium Manager downloads nothing
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# ----------------------------------------------------------------------------------------------- page helpers


def wait_for(driver: WebDriver, condition, message: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message)


def open_tab(driver: WebDriver, url: str, name: str) -> None:
    driver.get(url)
    tab = wait_for(driver, lambda d: d.find_elements(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']"),
                   f"no {name} tab")[0]
    tab.click()


def field(driver: WebDriver, elem_id: str):
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")


def type_into(driver: WebDriver, elem_id: str, text: str) -> None:
    box = field(driver, elem_id)
    box.clear()
    box.send_keys(text)


def upload(driver: WebDriver, elem_id: str, path: Path) -> None:
    before = image_srcs(driver, elem_id)
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))
    wait_for(driver, lambda d: image_srcs(d, elem_id) not in ([], before), f"{path.name} was not uploaded")


def error_popup(driver: WebDriver) -> str:
    """The text of the error pop-up (waits for it), then closes it."""
    texts = wait_for(driver, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")
                                        if e.text], "no error pop-up")
    for close in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):
        close.click()
    return texts[0]


def image_srcs(driver: WebDriver, elem_id: str) -> list[str]:
    return [im.get_attribute("src") for im in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
            if im.get_attribute("src")]


def fetch_image(src: str) -> Image.Image:
    """An <img> src the page shows: a data URL or a file gradio serves."""
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2])))
    r = httpx.get(src, timeout=30)
    r.raise_for_status()
    return Image.open(io.BytesIO(r.content))


def assert_same_pixels(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    assert np.abs(np.asarray(a.convert("RGB"), int) - np.asarray(b.convert("RGB"), int)).max() <= 1


def full_page_png(driver: WebDriver) -> bytes:
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                              "clip": clip})
    return base64.b64decode(shot["data"])


# ----------------------------------------------------------------------------------------------- tests


def test_generate_tab(browser, url, pipe, tmp_path):
    open_tab(browser, url, "Generate")
    type_into(browser, "gen-prompt", PROMPT)
    type_into(browser, "gen-size", "100")
    browser.find_element(By.ID, "gen-button").click()
    message = error_popup(browser)
    assert "100x100" in message and "nearest supported sizes" in message and "Traceback" not in message

    type_into(browser, "gen-size", "80x40")  # WIDTHxHEIGHT
    n = int(field(browser, "gen-n").get_attribute("value"))
    browser.find_element(By.ID, "gen-button").click()
    srcs = wait_for(browser, lambda d: len(image_srcs(d, "gen-gallery")) == n and image_srcs(d, "gen-gallery"),
                    "the gallery never showed the generated images")
    assert all(src.startswith(("data:", url)) for src in srcs)
    expected = pipe.generate(PROMPT, seed=0, size=(40, 80), n=n)
    for src, want in zip(srcs, expected, strict=True):
        shown = fetch_image(src)
        assert shown.size == (80, 40)
        assert_same_pixels(shown, want)
    previews = wait_for(browser, lambda d: image_srcs(d, "gen-previews"), "no coarse-to-fine previews")
    assert len(previews) == len(pipe.engine.schedule_for((40, 80)))
    assert_same_pixels(fetch_image(previews[-1]), expected[0])  # the last scale is the finished first image

    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and [u for u in fetched if not u.startswith((url, "data:", "blob:"))] == []

    shot = Path(os.environ.get("VARGPT_UI_SCREENSHOT") or tmp_path / "ui.png")
    shot.write_bytes(full_page_png(browser))
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 600


def test_chat_tab(browser, url, pipe, tmp_path):
    case = vqa_cases(1, split="test")[0]
    picture = tmp_path / "shapes.png"
    case.image.save(picture)
    expected = pipe.chat(case.question, case.image, max_new_tokens=MAX_NEW_TOKENS)
    assert expected.strip()

    open_tab(browser, url, "Chat")
    upload(browser, "chat-image", picture)
    type_into(browser, "chat-question", case.question)
    browser.find_element(By.ID, "chat-ask").click()

    def answer(d):
        bots = d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
        return bots and bots[-1].text.strip() == expected.strip() and not d.find_elements(
            By.CSS_SELECTOR, "#chatbot .generating")

    wait_for(browser, answer, f"the chat never answered {expected!r}")
    assert browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user] img")  # the picture is in the chat
    assert field(browser, "chat-question").get_attribute("value") == ""


def test_edit_tab(browser, url, pipe, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    picture = tmp_path / "shapes.png"
    source = vqa_cases(1, split="test")[0].image
    source.save(picture)

    open_tab(browser, url, "Edit")
    upload(browser, "edit-before", corrupt)
    type_into(browser, "edit-instruction", "Make the circle blue.")
    browser.find_element(By.ID, "edit-button").click()
    message = error_popup(browser)
    assert message.startswith("corrupt.png:") and "Traceback" not in message

    upload(browser, "edit-before", picture)
    browser.find_element(By.ID, "edit-button").click()
    after = wait_for(browser, lambda d: image_srcs(d, "edit-after"), "the edited image never appeared")[0]
    assert_same_pixels(fetch_image(after), pipe.edit(source, "Make the circle blue."))


def test_cli_ui_binds_loopback_by_default(monkeypatch, tmp_path):
    from vargpt.cli import main

    seen = []
    monkeypatch.setattr(VARGPTPipeline, "from_pretrained", classmethod(lambda cls, path, **kw: (path, kw)))
    monkeypatch.setattr("vargpt.ui.launch", lambda pipe, **kw: seen.append((pipe, kw)))
    main(["ui"])
    main(["ui", "--port", "9123", "--host", "0.0.0.0", "--model", str(tmp_path), "--device", "cpu"])
    assert seen[0] == ((None, {"device": "auto", "dtype": "auto", "progress": False}),
                       {"host": "127.0.0.1", "port": 7860})
    assert seen[1] == ((tmp_path, {"device": "cpu", "dtype": "auto", "progress": False}),
                       {"host": "0.0.0.0", "port": 9123})
