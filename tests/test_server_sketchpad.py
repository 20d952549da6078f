"""The web UI's ControlNet panel in headless Chromium (as tests/test_server_browser.py): draw shapes on
the sketch pad by mouse, generate, and check what the page sent (one sd-webui-controlnet unit whose PNG
holds exactly the drawn shapes in the shapes world's palette on white) and what came back (the
ControlNet's image, not the one without it); the tools (eraser, undo, clear); a page without ControlNets."""
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from marble.checkpoints.checkpoint import file_hash
from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
from marble.data.shapes import BACKGROUNDS, COLORS
from marble.models.controlnet import ControlNet, controlnet_config
from marble.pipeline import Pipeline
from marble.server.app import create_app
from marble.server.state import ServerConfig
from marble.server.thread import ServerThread
from sd_fixtures import randomize_
from server_support import png_array
from test_server_browser import browser, fill_form, open_page, result_pixels  # noqa: F401 (browser: a fixture)

SIZE = 32            # the generation's size, so the pad is 32 px shown at 256: 8 screen px per pad px
WHITE = BACKGROUNDS["white"]


def write_random_controlnet(folder, model) -> str:
    """A seeded random ControlNet for the tiny model (non-zero zero-convs: it changes the image)."""
    folder.mkdir(exist_ok=True)
    config = controlnet_config(model.config.unet, model.latent_factor)
    net = randomize_(ControlNet(config), seed=4)
    path = write_controlnet(ControlNetFile(config, net.state_dict(), folder, "", "marble"),
                            folder / "sketch.safetensors", "single-file")
    return f"sketch [{file_hash(path)}]"


def serve(browser, pipe, tmp_path):  # noqa: F811
    app = create_app([pipe], ServerConfig(outputs=tmp_path / "outputs"))
    with ServerThread(app) as url:
        for pg in open_page(browser, url):
            pg.wait_for_function("window.marbleSketch.colour !== null")   # the panel's lists are in
            yield pg, url


@pytest.fixture
def sketch_site(browser, tiny_loaded, tmp_path):  # noqa: F811
    name = write_random_controlnet(tmp_path / "controlnet", tiny_loaded.model)
    pipe = Pipeline(tiny_loaded, control_dir=tmp_path / "controlnet")
    for pg, url in serve(browser, pipe, tmp_path):
        yield pg, url, name


def drag(pg, a, b, steps=6):
    """Press at pad pixel a, move to pad pixel b, release (pad pixels to screen points)."""
    box = pg.locator("#cn-canvas").bounding_box()
    scale = box["width"] / SIZE
    at = lambda p: (box["x"] + p[0] * scale, box["y"] + p[1] * scale)   # noqa: E731
    pg.mouse.move(*at(a))
    pg.mouse.down()
    pg.mouse.move(*at(b), steps=steps)
    pg.mouse.up()


def pad_pixels(pg) -> np.ndarray:
    flat = pg.evaluate("(() => { const c = document.getElementById('cn-canvas'); "
                       "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); })()")
    return np.array(flat, dtype=np.uint8).reshape(SIZE, SIZE, 4)[:, :, :3]


def generate(pg, url_part="/sdapi/v1/txt2img"):
    """Click Generate; the request the page sent (its JSON) and the image it shows."""
    pg.evaluate("document.getElementById('results').replaceChildren()")
    with pg.expect_request(lambda r: r.url.endswith(url_part) and r.method == "POST") as sent:
        pg.click("#generate")
    pg.wait_for_function(f"(() => {{ const i = document.querySelector('#results img'); "
                         f"return (i && i.complete && i.naturalWidth === {SIZE}) "
                         f"|| !document.getElementById('error').hidden; }})()", timeout=120_000)
    assert pg.is_hidden("#error"), pg.inner_text("#error")
    return sent.value.post_data_json, result_pixels(pg)


def test_draw_a_sketch_and_generate_with_it(sketch_site):
    pg, url, name = sketch_site
    assert pg.evaluate("Object.keys(marbleSketch.palette)") == list(COLORS)   # the server's one list
    fill_form(pg, seed=5, steps=3, size=SIZE)
    pg.check("#cn-enable")
    pg.locator("#cn-canvas").wait_for(state="visible")
    assert (pg.input_value("#cn-module"), pg.input_value("#cn-model")) == ("none", name)
    # a blue rectangle, a red circle and a green brush stroke, by mouse
    pg.click("#cn-palette [data-colour=blue]")
    pg.click("#cn-tools [data-tool=rect]")
    drag(pg, (4, 4), (14, 12))
    pg.click("#cn-palette [data-colour=red]")
    pg.click("#cn-tools [data-tool=circle]")
    drag(pg, (24, 22), (29, 22))
    pg.click("#cn-palette [data-colour=green]")
    pg.click("#cn-tools [data-tool=brush]")
    pg.fill("#cn-brush", "32")                       # 32 screen px: a 4-pad-px wide brush
    drag(pg, (4, 27), (14, 27))
    pg.fill("#cn-weight", "1.5")
    pg.dispatch_event("#cn-weight", "input")

    body, shown = generate(pg)
    unit, = body["alwayson_scripts"]["controlnet"]["args"]
    assert {k: unit[k] for k in ("enabled", "module", "model", "weight", "guidance_start", "guidance_end",
                                 "control_mode")} == {"enabled": True, "module": "none", "model": name, "weight": 1.5,
                                                      "guidance_start": 0, "guidance_end": 1, "control_mode": "Balanced"}
    with Image.open(io.BytesIO(base64.b64decode(unit["image"]))) as im:
        assert im.format == "PNG" and im.size == (SIZE, SIZE)
        sent = np.asarray(im.convert("RGB"))
    # the drawn pixels have the chosen colours (no anti-aliased blends), the rest is the white background
    assert (sent[5:11, 5:13] == COLORS["blue"]).all()
    assert (sent[20:25, 22:27] == COLORS["red"]).all()
    assert (sent[26:28, 6:13] == COLORS["green"]).all()
    assert (sent[:3] == WHITE).all() and (sent[:, 16:19] == WHITE).all() and (sent[14:17, :20] == WHITE).all()
    colours = {tuple(c) for c in sent.reshape(-1, 3)}
    assert colours == {WHITE, COLORS["blue"], COLORS["red"], COLORS["green"]}
    # the image shown is the server's answer to that request, and the ControlNet changed it
    again = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120).json()
    assert np.array_equal(png_array(again["images"][0]), shown)
    plain_body = {k: v for k, v in body.items() if k not in ("alwayson_scripts", "regions")}
    plain = png_array(httpx.post(url + "/sdapi/v1/txt2img", json=plain_body, timeout=120).json()["images"][0])
    assert np.abs(plain.astype(int) - shown.astype(int)).max() > 10
    record = httpx.get(url + "/api/outputs").json()["items"][-1]["record"]
    assert record["controlnets"][0]["model"] == "sketch" and record["controlnets"][0]["weight"] == 1.5
    # colour words bound to the sketch (0.5 by default): sent as marble's `regions`, recorded
    assert body["regions"] == 0.5 and record["regions"] == 0.5
    pg.fill("#cn-regions", "0")                                        # 0: off, not sent
    body_zero, _ = generate(pg)
    assert "regions" not in body_zero and body_zero["alwayson_scripts"] == body["alwayson_scripts"]
    assert httpx.get(url + "/api/outputs").json()["items"][0]["record"]["regions"] == 0   # newest first

    # the panel off: the page sends no unit, and gets the plain image
    pg.uncheck("#cn-enable")
    body_off, shown_off = generate(pg)
    assert "alwayson_scripts" not in body_off and body_off == plain_body
    assert np.array_equal(shown_off, plain)


def test_eraser_undo_and_clear(sketch_site):
    pg, _, _ = sketch_site
    fill_form(pg, size=SIZE)
    pg.check("#cn-enable")
    assert (pad_pixels(pg) == WHITE).all()
    pg.click("#cn-palette [data-colour=purple]")
    pg.click("#cn-tools [data-tool=rect]")
    drag(pg, (2, 2), (30, 30))
    drawn = pad_pixels(pg)
    assert (drawn[3:29, 3:29] == COLORS["purple"]).all()
    pg.click("#cn-tools [data-tool=eraser]")
    pg.fill("#cn-brush", "32")
    drag(pg, (2, 16), (30, 16))
    erased = pad_pixels(pg)
    assert (erased[15:17, 4:28] == WHITE).all() and (erased[4:12, 4:28] == COLORS["purple"]).all()
    pg.click("#cn-undo")
    assert np.array_equal(pad_pixels(pg), drawn)
    pg.click("#cn-clear")
    assert (pad_pixels(pg) == WHITE).all()
    pg.click("#cn-undo")
    assert np.array_equal(pad_pixels(pg), drawn)
    pg.click("#cn-undo")
    assert (pad_pixels(pg) == WHITE).all()


def test_an_uploaded_image_is_sent_as_uploaded(sketch_site, tmp_path):
    pg, _, _ = sketch_site
    upload = Image.new("RGB", (48, 40), WHITE)
    upload.paste(COLORS["orange"], (10, 8, 30, 20))
    path = tmp_path / "control.png"
    upload.save(path)
    fill_form(pg, seed=3, steps=2, size=SIZE)
    pg.check("#cn-enable")
    pg.set_input_files("#cn-file", str(path))
    pg.wait_for_function("window.marbleSketch.upload !== null")
    body, _ = generate(pg)
    unit, = body["alwayson_scripts"]["controlnet"]["args"]
    assert np.array_equal(png_array(unit["image"]), np.asarray(upload))    # its own size, not the pad's
    assert (pad_pixels(pg)[12:14, 12:18] == COLORS["orange"]).all()      # shown on the pad


def test_the_page_works_without_controlnets(browser, tiny_loaded, tmp_path):  # noqa: F811
    empty = tmp_path / "no-controlnets"
    empty.mkdir()
    for pg, _ in serve(browser, Pipeline(tiny_loaded, control_dir=empty), tmp_path):
        pg.locator("#cn-empty").wait_for(state="visible")
        assert pg.inner_text("#cn-empty") == f"no ControlNet models in {empty}"
        assert pg.is_disabled("#cn-enable") and pg.is_hidden("#cn-body")
        fill_form(pg, size=SIZE, steps=2)
        body, shown = generate(pg)
        assert "alwayson_scripts" not in body and shown.shape == (SIZE, SIZE, 3)
