"""The web page at `/` in a real headless Chromium (Debian's, driven by Playwright): type a prompt,
press Generate, watch the progress bar move, get the image; click it to reuse its settings.

The screenshot goes to test-artifacts/serve-page.png (gitignored). Skipped when Chromium or
Playwright is missing (`.ci/run` installs both).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lens_jax.pipelines.text_to_image import LensPipeline
from lens_jax.tools.serve.app import ServeConfig, create_app

from .test_serve import serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium (apt-get install -y chromium)", allow_module_level=True)


def test_page_generates_with_progress_and_reuses_settings():
    pipe = LensPipeline.tiny_random()
    pipe.defaults.update({"num_inference_steps": 2, "guidance_scale": 4.0})
    app = create_app(pipe, ServeConfig(max_batch=2, max_wait_ms=0, model="tiny-random"))
    ARTIFACTS.mkdir(exist_ok=True)
    with serve(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
            page.goto(base + "/")
            sync_api.expect(page.locator("#status")).to_contain_text("tiny-random")
            page.fill("#prompt", "a red cube on a wooden table")
            page.select_option("#sizemode", "size")
            page.fill("#width", "96")
            page.fill("#height", "64")
            page.fill("#seed", "18446744073709551615")  # 2**64 - 1: past a JavaScript number's exact range
            # Record every value the progress bar takes (the SSE events drive it).
            page.evaluate("""() => { window.seen = [];
                new MutationObserver(() => window.seen.push(document.getElementById('progresstext').textContent))
                  .observe(document.getElementById('progresstext'), {childList: true, characterData: true, subtree: true}); }""")
            page.click("#generate")
            figure = page.locator("#gallery figure")
            sync_api.expect(figure).to_have_count(1, timeout=120_000)
            img = figure.locator("img")
            sync_api.expect(img).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
            assert page.evaluate("() => document.querySelector('#gallery img').naturalWidth") == 96
            seen = page.evaluate("() => window.seen")
            # Mutation records coalesce within one task, so fast steps may show as the last one only.
            assert seen[0].startswith("queued") and "step 2 / 2" in seen and seen[-1] == "done", seen
            assert page.evaluate("() => document.getElementById('progress').value") == 1
            sync_api.expect(figure.locator("figcaption")).to_contain_text("seed 18446744073709551615")
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

            # Click the result: its settings come back into the form.
            page.fill("#prompt", "")
            page.fill("#seed", "")
            figure.click()
            assert page.input_value("#prompt") == "a red cube on a wooden table"
            assert page.input_value("#seed") == "18446744073709551615" and page.input_value("#width") == "96"
            assert page.input_value("#steps") == "2"

            # A field the server rejects is shown, naming it.
            page.fill("#width", "4096")  # the form accepts it; the server's pixel limit does not
            page.fill("#height", "4096")
            page.click("#generate")
            sync_api.expect(page.locator("#error")).to_contain_text("size")
            assert not errors, errors
        finally:
            browser.close()
