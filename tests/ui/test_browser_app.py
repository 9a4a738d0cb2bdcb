"""The whole app in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium):
upload 3 photos, click the subject, propagate, fix one photo with a negative click, train a tiny LoRA and watch it,
generate an image. A screenshot of each step is kept in ``$PERSAM_UI_SCREENSHOTS`` (default: the test's tmp folder).

Skipped when Chromium or its driver is missing, unless ``PERSAM_REQUIRE_BROWSER=1`` (CI), then it fails.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from ui_server import ServedApp, masks_of, write_photos

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if chromium is None or driver is None:
        missing = "chromium" if chromium is None else "chromedriver (Debian package chromium-driver)"
        if os.environ.get("PERSAM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PERSAM_REQUIRE_BROWSER=1 but {missing} was not found (apt-get install chromium "
                        "chromium-driver).")
        pytest.skip(f"{missing} is not installed")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1250")
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Page:
    def __init__(self, driver, shots: Path) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.shots, self.by = driver, shots, By
        self.shots.mkdir(parents=True, exist_ok=True)

    def wait(self, condition, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                result = condition()
                if result:
                    return result
            except Exception as exc:  # noqa: BLE001 - the DOM is re-rendered under us; retry
                last_error = exc
            time.sleep(0.2)
        self.shot("timeout")
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error}); "
                             f"page text: {self.text('body')[-1500:]}")

    def all(self, css: str):
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def one(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        found = self.all(css)
        return found[0].text if found else ""

    def images(self, css: str) -> list:
        return [img for img in self.all(f"{css} img") if img.get_attribute("src")]

    def loaded_image(self, css: str):
        """The first ``<img>`` under ``css`` once it has decoded (``naturalWidth > 0``)."""
        script = "return arguments[0].complete && arguments[0].naturalWidth > 0;"
        return self.wait(lambda: next((i for i in self.images(css) if self.driver.execute_script(script, i)), None),
                         20, f"a decoded image in {css}")

    def click_xpath(self, xpath: str) -> None:
        element = self.driver.find_element(self.by.XPATH, xpath)
        self.driver.execute_script("arguments[0].click();", element)

    def tab(self, label: str) -> None:
        self.wait(lambda: self.driver.find_elements(self.by.XPATH, f"//button[@role='tab'][contains(., '{label}')]"),
                  what=f"tab {label}")
        self.click_xpath(f"//button[@role='tab'][contains(., '{label}')]")

    def set_text(self, elem_id: str, value: str) -> None:
        field = self.one(f"#{elem_id} input, #{elem_id} textarea")
        field.clear()
        field.send_keys(value)
        field.send_keys("\t")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def test_app_end_to_end_in_chromium(browser, project_dir, ui_models, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    started = time.monotonic()
    timings = {}

    def lap(name: str, scroll_to: str | None = None) -> None:
        timings[name] = round(time.monotonic() - started, 1)
        browser.execute_script(  # dismiss the notifications so they do not hide the page in the screenshot
            "document.querySelectorAll('.toast-close, button[aria-label=\"Close\"]').forEach(b => b.click());")
        time.sleep(0.3)
        if scroll_to:
            browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", page.one(scroll_to))
            time.sleep(0.5)
        page.shot(name)
    photos = write_photos(tmp_path / "upload", n=3)
    defaults = {"run_name": "tiny-run", "base_model": "models/tiny-sd", "max_train_steps": 4, "resolution": 32,
                "checkpointing_steps": 2, "learning_rate": "1e-3", "validation_prompt": "a photo of sks dog",
                "validation_steps": 2, "validation_inference_steps": 2, "num_validation_images": 1}
    app = ServedApp(project_dir, ui_models["sam"], tmp_path / "app.log", defaults)
    page = Page(browser, Path(os.environ.get("PERSAM_UI_SCREENSHOTS", tmp_path / "screenshots")))
    try:
        # 1. open the app
        browser.get(app.url)
        page.wait(lambda: page.all("#persam-upload input[type=file]"), 60, "the upload field")
        lap("01_open")

        # 2. upload three photos
        page.one("#persam-upload input[type=file]").send_keys("\n".join(str(p) for p in photos))
        page.wait(lambda: len(page.images("#persam-photos")) == 3, 30, "three thumbnails")
        page.wait(lambda: "3 photo(s)" in page.text("#persam-photo-info"), 10, "the photo count")
        assert sorted(p.name for p in (project_dir / "photos").iterdir()) == [p.name for p in photos]
        lap("02_uploaded")

        # 3. click on the subject in the first photo: a mask overlay appears
        page.driver.execute_script("arguments[0].click();", page.images("#persam-photos")[0])
        page.wait(lambda: "photo_0.jpg" in page.text("#persam-editor-info"), 20, "the editor")
        img = page.loaded_image("#persam-editor")
        before = img.get_attribute("src")
        ActionChains(browser).move_to_element_with_offset(img, 5, 3).click().perform()  # near the photo's centre
        page.wait(lambda: "mask:" in page.text("#persam-editor-info"), 20, "the mask preview")
        page.wait(lambda: page.images("#persam-editor")[0].get_attribute("src") != before, 10, "a new picture")
        assert masks_of(project_dir)["photo_0"].any()
        lap("03_reference_click")

        # 4. propagate: three overlays with scores
        page.one("#persam-propagate").click()
        page.wait(lambda: "score" in page.text("#persam-overlays") and len(page.images("#persam-overlays")) == 3,
                  30, "three overlays with scores")
        page.wait(lambda: "| photo_2.jpg |" in page.text("#persam-mask-table") or "photo_2.jpg" in page.text(
            "#persam-mask-table"), 10, "the table of scores")
        assert set(masks_of(project_dir)) == {"photo_0", "photo_1", "photo_2"}
        lap("04_propagated")

        # 5. a negative click on the second photo changes its mask
        old = masks_of(project_dir)["photo_1"]
        page.driver.execute_script("arguments[0].click();", page.images("#persam-overlays")[1])
        page.wait(lambda: "photo_1.jpg" in page.text("#persam-editor-info"), 20, "photo_1 in the editor")
        page.click_xpath("//*[@id='persam-mode']//label[contains(., 'negative click')]")
        img = page.loaded_image("#persam-editor")
        size = img.size
        x, y = _mask_point(old, size["width"], size["height"])
        ActionChains(browser).move_to_element_with_offset(img, x, y).click().perform()
        page.wait(lambda: "click→mask" in page.text("#persam-editor-info"), 20, "the refined mask")
        page.wait(lambda: not np.array_equal(masks_of(project_dir)["photo_1"], old), 10, "a changed mask file")
        lap("05_negative_click", "#persam-photo-pick")

        # 6. train a tiny LoRA: progress reaches the last step, a validation image appears
        page.tab("Train")
        page.wait(lambda: "accelerate launch" in page.one("#persam-command textarea").get_attribute("value"),
                  20, "the command")
        page.one("#persam-train").click()
        page.wait(lambda: "finished, step 4/4" in page.text("#persam-train-status"), 120, "the end of training")
        bar = page.one("#persam-train-bar .persam-progress")
        assert (bar.get_attribute("data-step"), bar.get_attribute("data-total")) == ("4", "4")
        page.wait(lambda: page.images("#persam-validation"), 20, "a validation image")
        lap("06_trained", "#persam-command")

        # 7. the weights exist
        assert (project_dir / "runs" / "tiny-run" / "pytorch_lora_weights.safetensors").is_file()

        # 8. generate one image (and the base model's, same seed)
        page.tab("Generate")
        page.wait(lambda: "tiny-run" in page.text("#persam-gen-run") or page.all("#persam-gen-run input"), 10,
                  "the run list")
        page.click_xpath("//*[@id='persam-gen-base']//input")  # the LoRA only (its base twin: test_generate_compare)
        page.set_text("persam-gen-steps", "2")
        page.set_text("persam-gen-prompts", "a photo of sks dog")
        page.wait(lambda: "tiny-run" in (page.one("#persam-gen-run input").get_attribute("value") or ""), 10,
                  "the trained run selected")
        page.one("#persam-generate").click()
        page.wait(lambda: page.images("#persam-gen-lora"), 90, "the generated image")
        assert "1 image(s)" in page.text("#persam-gen-info") and not page.images("#persam-gen-basegallery")
        assert len(list((project_dir / "runs" / "tiny-run" / "samples").glob("*/lora/images/*.png"))) == 1
        lap("07_generated")
    except BaseException:
        print(app.log.read_text(errors="replace")[-4000:])  # noqa: T201 - shown by pytest on failure
        raise
    finally:
        app.stop()
    print(f"browser test: {time.monotonic() - started:.1f} s; seconds at each step: {timings}")  # noqa: T201


def _mask_point(mask: np.ndarray, shown_w: int, shown_h: int) -> tuple[int, int]:
    """An offset from the displayed image's centre that lands inside ``mask`` (selenium offsets are centre-based)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0
    i = len(xs) // 2
    height, width = mask.shape
    return int(xs[i] * shown_w / width - shown_w / 2), int(ys[i] * shown_h / height - shown_h / 2)
