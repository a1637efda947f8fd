"""The explorer clicked through in headless Chromium (Debian's package): every panel, what appears in
it, a screenshot of each, and no request to any host but the server's.

Screenshots go to the test's tmp folder, or to ``$DIFFLAB_SCREENSHOTS`` (the docs' pictures were
made so, on the mnist-small demo run: ``DIFFLAB_SERVE_RUNS=folder-with-runs``)."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import guarded_page, launch_browser, runs_dir  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(runs_dir):  # noqa: F811
    from difflab.serve import ExplorerServer

    srv = ExplorerServer(os.environ.get("DIFFLAB_SERVE_RUNS") or runs_dir, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_click_through_every_panel(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    shots = Path(os.environ.get("DIFFLAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    upload = tmp_path / "upload.png"
    a = np.zeros((64, 64), np.uint8)
    a[12:52, 26:38] = 255  # a thick "1"
    Image.fromarray(a).save(upload)
    with sync_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = guarded_page(browser, served)
            page.goto(f"http://127.0.0.1:{served.port}/")
            page.wait_for_selector("#run option", state="attached")
            page.wait_for_selector("#compare-columns .colspec", state="attached")

            # sample: images stream in, the path scrubs back and forth
            page.fill("#sample-form input[name=steps]", "10")
            page.select_option("#sample-form select[name=label]", "7")
            page.fill("#sample-form input[name=guidance]", "2")
            page.click("#sample-go")
            page.wait_for_selector("#sample-grid img:nth-child(16)", timeout=60_000)
            page.wait_for_selector("#sample-status:has-text('all in')", timeout=60_000)
            assert page.locator("#sample-grid img").count() == 16
            assert page.get_attribute("#path-slider", "max") == "9"
            page.locator("#path-slider").fill("3")
            assert "step 4 of 10" in page.inner_text("#path-label")
            page.screenshot(path=str(shots / "serve-sample.png"), full_page=True)

            # another sample's path, replayed on click
            page.click("#sample-grid img:nth-child(5)")
            page.wait_for_selector("#path-which:has-text('sample 4')")
            page.wait_for_selector("#path-label:has-text('step 10 of 10')", timeout=60_000)

            # cancel: a long request stops
            page.fill("#sample-form input[name=steps]", "1000")
            page.select_option("#sample-form select[name=sampler]", "ddpm")
            page.fill("#sample-form input[name=count]", "64")
            page.click("#sample-go")
            page.wait_for_selector("#path-label:has-text('step 1 ')", timeout=60_000)
            page.click("#sample-cancel")
            page.wait_for_selector("#sample-status:has-text('cancelled')", timeout=60_000)

            # a bad parameter: a clear message, no stack trace
            page.fill("#sample-form input[name=steps]", "0")
            page.click("#sample-go")
            page.wait_for_selector("#sample-error:not([hidden])")
            assert "steps must be between 1 and" in page.inner_text("#sample-error")
            assert "Traceback" not in page.content()

            # compare samplers: four columns, each with its evaluations
            page.click("#tabs button[data-panel=compare]")
            page.click("#compare-go")
            page.wait_for_selector("#compare-out .col:nth-child(4) div.muted:has-text('evaluations ·')", timeout=120_000)
            heads = page.locator("#compare-out .col h3").all_inner_texts()
            assert heads == ["ddim · 10 steps", "dpmpp-2m · 10 steps", "heun · 10 steps", "ddpm · 50 steps"]
            assert "19 evaluations" in page.locator("#compare-out .col").nth(2).inner_text()
            assert page.locator("#compare-out .col img").count() == 16
            page.screenshot(path=str(shots / "serve-compare.png"), full_page=True)

            # the forward process: binomial noise with its untouched pixels, then a Gaussian schedule
            page.click("#tabs button[data-panel=forward]")
            page.click("#data-strip img:nth-child(3)")
            page.select_option("#forward-process", "binomial")
            page.wait_for_selector("#forward-summary:has-text('binomial noise k=32')")
            page.locator("#forward-slider").fill("60")
            assert "pixels never touched" in page.inner_text("#forward-untouched")
            page.screenshot(path=str(shots / "serve-forward-binomial.png"), full_page=True)
            page.select_option("#forward-process", "cosine")
            page.wait_for_selector("#forward-curve-label:has-text('SNR')")
            page.locator("#forward-slider").fill("12")
            assert page.locator("#forward-curve polyline").count() == 1
            page.screenshot(path=str(shots / "serve-forward.png"), full_page=True)

            # interpolate: a strip of 8
            page.click("#tabs button[data-panel=interpolate]")
            page.click("#interp-go")
            page.wait_for_selector("#interp-strip figure:nth-child(8) figcaption:has-text('t = 1.00')", timeout=60_000)
            page.screenshot(path=str(shots / "serve-interpolate.png"), full_page=True)

            # invert: a dataset image, then an uploaded file
            page.click("#tabs button[data-panel=invert]")
            page.click("#invert-go")
            page.wait_for_selector("#invert-psnr:has-text('dB')", timeout=120_000)
            page.set_input_files("#invert-file", str(upload))
            page.wait_for_selector("#invert-psnr:has-text('inverting')")
            page.wait_for_selector("#invert-psnr:has-text('dB')", timeout=120_000)
            page.wait_for_selector("#invert-recon[src^='data:image/png']", state="attached")
            page.wait_for_timeout(300)  # let the last image decode before the picture is taken
            page.screenshot(path=str(shots / "serve-invert.png"), full_page=True)

            # training monitor: the loss curve and the newest grid
            page.click("#tabs button[data-panel=monitor]")
            page.wait_for_selector("#monitor-loss polyline", state="attached", timeout=30_000)
            page.wait_for_selector("#monitor-grid[src^='data:image/png']", state="attached", timeout=30_000)
            assert "checkpoint step" in page.inner_text("#monitor-state")
            page.screenshot(path=str(shots / "serve-monitor.png"), full_page=True)

            assert page.foreign == [], f"requests left the machine: {page.foreign}"
            assert page.errors == [] or all("400" in e for e in page.errors), page.errors
        finally:
            browser.close()
    for name in ("sample", "compare", "forward", "forward-binomial", "interpolate", "invert", "monitor"):
        with Image.open(io.BytesIO((shots / f"serve-{name}.png").read_bytes())) as im:
            assert im.width >= 1000  # a real screenshot, not an empty file


def test_edit_and_few_step_panels(served, runs_dir, tmp_path):  # noqa: F811
    """Edit: a dataset image edited by SDEdit with its path shown, then its lower half painted and repainted (the
    unpainted upper half of every edit is the original's), then an upload; few steps: the run's own sampler and a
    second one at 1, 2, 4, 6 and 10 network evaluations, each cell with its steps, evaluations and time."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    from serve_helpers import png_array

    from difflab.serve.catalog import Catalog

    shots = Path(os.environ.get("DIFFLAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    upload = tmp_path / "upload.jpg"
    a = np.zeros((48, 64, 3), np.uint8)
    a[8:40, 26:38] = 255
    Image.fromarray(a).save(upload)
    with sync_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = guarded_page(browser, served)
            page.goto(f"http://127.0.0.1:{served.port}/")
            page.wait_for_selector("#run option", state="attached")
            page.click("#tabs button[data-panel=edit]")
            page.wait_for_selector("#edit-source:has-text('dataset image 0')")
            shape = page.evaluate("state.run.shape")

            # SDEdit of dataset image 0: the edits, and the path of the first, one frame per step run
            page.locator("#edit-strength").fill("0.6")
            assert page.inner_text("#edit-strength-value") == "0.60"
            page.select_option("#edit-form select[name=sampler]", "ddim")
            page.fill("#edit-form input[name=steps]", "8")
            page.click("#edit-go")
            page.wait_for_selector("#edit-grid img:nth-child(4)", timeout=60_000)
            page.wait_for_selector("#edit-status:has-text('edits in')", timeout=60_000)
            assert "SDEdit: 4 edits · 5 steps each" in page.inner_text("#edit-status")
            assert page.get_attribute("#edit-path-slider", "max") == "4"
            page.locator("#edit-path-slider").fill("1")
            assert "step 2 of 5" in page.inner_text("#edit-path-label")

            # paint the lower half with the 1-pixel brush, row by row: RePaint keeps the upper half
            page.select_option("#edit-brush", "0")
            box = page.locator("#edit-canvas").bounding_box()
            cell = box["height"] / shape[1]
            for y in range(shape[1] // 2, shape[1]):
                page.mouse.move(box["x"] + 1, box["y"] + (y + 0.5) * cell)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] - 1, box["y"] + (y + 0.5) * cell, steps=2 * shape[2])
                page.mouse.up()
            page.fill("#edit-form input[name=resample]", "2")
            page.fill("#edit-form input[name=jump_length]", "2")
            page.locator("#edit-strength").fill("1")
            page.click("#edit-go")
            page.wait_for_selector("#edit-status:has-text('RePaint')", timeout=60_000)
            page.wait_for_selector("#edit-status:has-text('edits in')", timeout=60_000)
            frames = int(page.get_attribute("#edit-path-slider", "max")) + 1
            assert frames > 8 and f"{frames} sampler steps each, the jumps back included" in page.inner_text("#edit-status")
            original = Catalog(runs_dir).training_data("tiny").images[0].numpy()
            edits = [png_array(page.get_attribute(f"#edit-grid img:nth-child({k})", "src")) for k in range(1, 5)]
            half = shape[1] // 2
            assert all(np.array_equal(e[:, :half], original[:, :half]) for e in edits)
            assert any(not np.array_equal(e[:, half:], original[:, half:]) for e in edits)
            page.screenshot(path=str(shots / "serve-edit.png"), full_page=True)

            # an uploaded file (fitted to the run), no mask: SDEdit again
            page.click("#edit-clear")
            page.set_input_files("#edit-file", str(upload))
            page.wait_for_selector("#edit-source:has-text('upload upload.jpg')")
            page.locator("#edit-strength").fill("0.5")
            page.click("#edit-go")
            page.wait_for_selector("#edit-status:has-text('SDEdit')", timeout=60_000)
            page.wait_for_selector("#edit-status:has-text('edits in')", timeout=60_000)

            # a bad setting: one clear line
            page.fill("#edit-form input[name=steps]", "0")
            page.click("#edit-go")
            page.wait_for_selector("#edit-error:not([hidden])")
            assert "steps must be between 1 and" in page.inner_text("#edit-error")

            # few steps: the run's own sampler and heun at each budget
            page.click("#tabs button[data-panel=fewstep]")
            page.click("#fewstep-add")
            page.select_option("#fewstep-samplers span:nth-child(2) select", "heun")
            page.click("#fewstep-go")
            page.wait_for_selector("#fewstep-out tr:nth-child(3) td:nth-child(6) .note:has-text(' s')", timeout=120_000)
            heads = page.locator("#fewstep-out tr:first-child th").all_inner_texts()
            assert heads == ["", "1 evaluation", "2 evaluations", "4 evaluations", "6 evaluations", "10 evaluations"]
            rows = page.locator("#fewstep-out tr th:first-child").all_inner_texts()[1:]
            assert rows == [page.evaluate("state.run.sampler") + " (the run's own)", "heun"]
            notes = page.locator("#fewstep-out tr:nth-child(3) .note").all_inner_texts()
            assert notes[1] == "1 step · 1 evaluation · the images of 1" and notes[4].startswith("5 steps · 9 evaluations · ")
            assert page.locator("#fewstep-out .cell img").count() == 2 * 5 * 4
            page.screenshot(path=str(shots / "serve-fewstep.png"), full_page=True)

            assert page.foreign == [], f"requests left the machine: {page.foreign}"
            assert page.errors == [] or all("400" in e for e in page.errors), page.errors
        finally:
            browser.close()
