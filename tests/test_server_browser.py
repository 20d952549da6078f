"""The web UI end to end in headless Chromium (Debian's `chromium`, driven by Playwright; the
browser is never downloaded): type a prompt, generate, see the image; inpaint with a drawn mask;
watch the progress bar and preview; reuse a gallery entry's parameters; live mode, as you type."""
import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.live import FAST_CFG, FAST_SAMPLER, FAST_STEPS, LiveConfig
from marble.server.state import ServerConfig
from marble.server.thread import ServerThread
from server_support import GatedPipeline, noise_image, png_array

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
NO_CHROMIUM = "Debian's chromium is not installed (apt-get install chromium)"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "two red circles above a blue square"


@pytest.fixture(scope="module")
def browser():
    # here, not only in this module's mark: other modules borrow the fixture, and without chromium
    # Playwright would look for a browser of its own and error instead of skipping
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def gated(tiny_pipe):
    g = GatedPipeline(tiny_pipe, at=3)
    g.gate.set()                    # open unless a test closes it
    return g


@pytest.fixture
def site(gated, tmp_path):
    app = create_app([gated], ServerConfig(outputs=tmp_path, preview_interval=0.0, limits=ServerLimits(max_steps=100)))
    with ServerThread(app) as url:
        yield url


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url + "/")
    pg.wait_for_function("document.getElementById('sampler').options.length > 0")
    yield pg
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, site):
    yield from open_page(browser, site)


@pytest.fixture
def live_page(browser, tiny_pipe, tmp_path):
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path, live=LiveConfig(debounce_ms=50)))
    with ServerThread(app) as url:
        yield from open_page(browser, url)


def fill_form(pg, prompt=PROMPT, seed=5, steps=2, size=32, sampler="Euler"):
    pg.fill("#prompt", prompt)
    pg.fill("#seed", str(seed))
    pg.fill("#steps", str(steps))
    pg.fill("#width", str(size))
    pg.fill("#height", str(size))
    pg.select_option("#sampler", sampler)


def result_pixels(pg, index=0):
    src = pg.locator("#results img").nth(index).get_attribute("src")
    return png_array(base64.b64decode(src.split(",", 1)[1]))


def test_type_a_prompt_generate_and_see_the_image(page, tiny_pipe):
    fill_form(page)
    page.click("#generate")
    page.wait_for_function("(() => { const i = document.querySelector('#results img'); "
                           "return i && i.complete && i.naturalWidth === 32; })()")
    request = GenerationRequest(prompt=PROMPT, seed=5, steps=2, width=32, height=32, sampler="Euler", cfg=7.0)
    want = tiny_pipe.generate(resolve(request, tiny_pipe.defaults)).images[0]
    assert np.array_equal(result_pixels(page), np.asarray(want))
    assert "seeds 5" in page.inner_text("#progress-text")
    # the gallery shows it, with its parameters, and can put them back in the form
    first = page.locator("#gallery figure").first
    first.locator("img").wait_for()
    assert first.locator("pre").inner_text().startswith(f"{PROMPT}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5")
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    first.locator("button.use").click()
    assert page.input_value("#prompt") == PROMPT
    assert (page.input_value("#seed"), page.input_value("#steps"), page.input_value("#sampler")) == ("5", "2", "Euler")


def test_inpaint_with_a_mask_drawn_on_the_image(page, site, tmp_path):
    init = noise_image(32, seed=3)
    init_path = tmp_path / "init.png"
    init.save(init_path)
    fill_form(page, prompt="inpaint", seed=9, steps=3)
    page.set_input_files("#init-file", str(init_path))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()                     # 32 px shown at 256 px: 8 screen px per image px
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 2, y, steps=8)
    page.mouse.up()
    page.evaluate("document.getElementById('strength').value = '1'")
    page.click("#generate")
    page.locator("#results img").wait_for()
    got = result_pixels(page)
    record = httpx.get(site + "/api/outputs").json()["items"][0]["record"]
    assert record["mode"] == "inpaint" and record["strength"] == 1.0 and record["prompt"] == "inpaint"
    # an 8-px brush across the middle: rows far from it are kept exactly, the stroke is repainted
    kept = np.asarray(init)
    assert np.array_equal(got[:10], kept[:10]) and np.array_equal(got[-10:], kept[-10:])
    assert not np.array_equal(got[15:17], kept[15:17])


def test_progress_bar_and_preview_while_a_job_runs(page, gated, site):
    gated.gate.clear()
    httpx.get(site + "/sdapi/v1/progress")          # someone watches: previews are made from step 0
    fill_form(page, steps=8)
    page.click("#generate")
    assert gated.reached.wait(10)                   # held before step 3 of 8
    page.wait_for_function("document.getElementById('progress').value === 3 / 8")
    page.locator("#preview").wait_for(state="visible")
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 32
    assert "step 3 of 8" in page.inner_text("#progress-text")
    assert page.is_disabled("#generate") and page.is_enabled("#interrupt")
    gated.gate.set()
    page.locator("#results img").wait_for()
    page.locator("#preview").wait_for(state="hidden")          # the preview goes when the job is done
    page.wait_for_function("!document.getElementById('generate').disabled")


def test_a_bad_request_shows_the_servers_message(page):
    fill_form(page, steps=500)
    page.click("#generate")
    page.locator("#error").wait_for(state="visible")
    assert page.inner_text("#error") == "400: steps 500 is over this server's limit of 100"


LIVE_PROMPT = "a red circle"


def test_live_mode_draws_the_prompt_as_it_is_typed(live_page, tiny_pipe, tmp_path):
    pg = live_page
    pg.fill("#width", "32")
    pg.fill("#height", "32")
    pg.check("#live")
    pg.wait_for_function("window.marbleLive.stream !== null && window.marbleLive.shown.length === 1")
    seed = int(pg.input_value("#seed"))                     # live mode fixed a random seed
    assert (pg.input_value("#steps"), pg.input_value("#sampler")) == (str(FAST_STEPS), FAST_SAMPLER)
    pg.click("#prompt")
    pg.keyboard.type(LIVE_PROMPT[:6], delay=10)             # faster than the debounce: few requests
    pg.keyboard.type(LIVE_PROMPT[6:], delay=150)            # slower: about one image a key
    pg.wait_for_function(f"window.marbleLive.shown.at(-1).prompt === {json.dumps(LIVE_PROMPT)} "
                         "&& window.marbleLive.pendingKeys.length === 0", timeout=60_000)
    live = pg.evaluate("({shown: marbleLive.shown, stale: marbleLive.stale, latencies: marbleLive.latencies, "
                       "seq: marbleLive.seq})")
    seqs = [s["seq"] for s in live["shown"]]
    assert seqs == sorted(set(seqs)) and live["stale"] == []      # never an older image after a newer one
    assert seqs[-1] == live["seq"]                                # the last one drawn is the last one asked
    assert all(LIVE_PROMPT.startswith(s["prompt"]) for s in live["shown"])
    # the final image is the final prompt's, bit for bit, through the same settings
    request = GenerationRequest(prompt=LIVE_PROMPT, seed=seed, steps=FAST_STEPS, sampler=FAST_SAMPLER, cfg=FAST_CFG,
                                width=32, height=32)
    want = tiny_pipe.generate(resolve(request, tiny_pipe.defaults)).images[0]
    src = pg.get_attribute("#live-image", "src")
    assert np.array_equal(png_array(base64.b64decode(src.split(",", 1)[1])), np.asarray(want))
    assert pg.evaluate("getComputedStyle(document.getElementById('live-image')).imageRendering") == "pixelated"
    assert f"Seed: {seed}" in pg.inner_text("#live-info")
    # keystroke-to-image latency: recorded, not asserted (benchmarks/live_latency.py holds the bar)
    out = Path(os.environ.get("MARBLE_LIVE_LATENCY_JSON", tmp_path / "live-latency.json"))
    lat = sorted(live["latencies"])
    out.write_text(json.dumps({"model": "tiny-random", "keys": len(LIVE_PROMPT), "latencies_ms": live["latencies"],
                               "median_ms": lat[len(lat) // 2], "images": len(seqs)}, indent=1))
    assert len(lat) == len(LIVE_PROMPT)                           # every key answered once
    # a click keeps it: saved to the outputs with its record, shown in the gallery
    pg.click("#live-image")
    pg.locator("#gallery figure").first.wait_for()
    assert pg.locator("#gallery figure pre").first.inner_text().startswith(f"{LIVE_PROMPT}\nSteps: {FAST_STEPS}")
    assert len(list(tmp_path.glob("marble-*.png"))) == 1
