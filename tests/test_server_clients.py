"""The real clients people already use, against `marble serve`'s app on a loopback port:
the official `openai` Python client and A1111's `webuiapi`. Images are compared bit for bit with
the pipeline run directly."""
import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.state import ServerConfig
from marble.server.thread import ServerThread
from server_support import GatedPipeline, noise_image, png_array

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

KEY = "test-key"
PROMPT = "two red circles above a blue square"


@pytest.fixture(scope="module")
def server(tiny_pipe, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("client-outputs")
    app = create_app([tiny_pipe], ServerConfig(outputs=outputs, api_key=KEY, max_queue=4,
                                               limits=ServerLimits(max_steps=50)))
    with ServerThread(app) as url:
        yield url, outputs


def want(pipe, **kw):
    return [np.asarray(im) for im in pipe.generate(resolve(GenerationRequest(**kw), pipe.defaults)).images]


# ---- openai --------------------------------------------------------------------------------
def test_openai_client_generates_b64_and_url(server, tiny_pipe):
    url, outputs = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    res = client.images.generate(prompt=PROMPT, n=2, size="32x32", response_format="b64_json",
                                 extra_body={"seed": 21, "steps": 3})
    assert len(res.data) == 2 and res.created > 0
    expected = want(tiny_pipe, prompt=PROMPT, n=2, width=32, height=32, seed=21, steps=3)
    for item, w in zip(res.data, expected):
        assert np.array_equal(png_array(item.b64_json), w)

    res = client.images.generate(prompt=PROMPT, size="32x32", response_format="url", model="tiny-random",
                                 extra_body={"seed": 21, "steps": 3})
    link = res.data[0].url
    assert link.startswith(f"{url}/outputs/")
    fetched = httpx.get(link, headers={"Authorization": f"Bearer {KEY}"})
    assert fetched.content == (outputs / link.rsplit("/", 1)[1]).read_bytes()
    assert np.array_equal(png_array(fetched.content), expected[0])


def test_openai_client_edit_with_transparent_mask(server, tiny_pipe):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    init = noise_image(32, seed=8)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, :16] = 0
    mask = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return ("x.png", buf.getvalue(), "image/png")
    res = client.images.edit(image=png(init), mask=png(mask), prompt=PROMPT, response_format="b64_json",
                             extra_body={"seed": 6, "steps": 3})
    white = np.where(alpha == 0, 255, 0).astype(np.uint8)
    expected = want(tiny_pipe, prompt=PROMPT, seed=6, steps=3, init_image=init, mask=Image.fromarray(white))
    got = png_array(res.data[0].b64_json)
    assert np.array_equal(got, expected[0])
    assert np.array_equal(got[:, 16:], np.asarray(init)[:, 16:])


def test_openai_client_raises_its_typed_errors(server):
    url, _ = server
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        good.images.generate(prompt=PROMPT, n=0)
    assert "n must be an integer in [1, 64], got 0" in e.value.message
    with pytest.raises(openai.NotFoundError):
        good.images.generate(prompt=PROMPT, model="dall-e-3")
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt=PROMPT)


# ---- webuiapi ------------------------------------------------------------------------------
def host_port(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_webuiapi_txt2img_img2img_inpaint_and_png_info(server, tiny_pipe):
    host, port = host_port(server[0])
    api = webuiapi.WebUIApi(host=host, port=port, sampler="Euler", steps=3, username="me", password=KEY)
    r = api.txt2img(prompt=PROMPT, negative_prompt="blur", seed=13, cfg_scale=6, width=32, height=32, batch_size=2)
    expected = want(tiny_pipe, prompt=PROMPT, negative_prompt="blur", seed=13, cfg=6.0, width=32, height=32,
                    sampler="Euler", steps=3, n=2)
    assert [np.asarray(im.convert("RGB")).tolist() for im in r.images] == [e.tolist() for e in expected]
    assert r.info["all_seeds"] == [13, 14] and r.info["sampler_name"] == "Euler"
    assert r.info["infotexts"][0].startswith(f"{PROMPT}\nNegative prompt: blur\nSteps: 3, Sampler: Euler, CFG scale: 6, Seed: 13")

    info = api.png_info(r.image)          # the image as returned, its text chunks included
    assert info.info == r.info["infotexts"][0]

    init = noise_image(32, seed=4)
    r = api.img2img(images=[init], prompt=PROMPT, seed=3, denoising_strength=0.6, width=32, height=32)
    expected = want(tiny_pipe, prompt=PROMPT, seed=3, steps=3, sampler="Euler", cfg=7.0, width=32, height=32,
                    init_image=init, strength=0.6)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), expected[0])

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=3, denoising_strength=1.0, width=32, height=32)
    expected = want(tiny_pipe, prompt=PROMPT, seed=3, steps=3, sampler="Euler", cfg=7.0, width=32, height=32,
                    init_image=init, mask=mask, strength=1.0)
    got = np.asarray(r.image.convert("RGB"))
    assert np.array_equal(got, expected[0])
    assert np.array_equal(got[:8], np.asarray(init)[:8])


def test_webuiapi_listings(server, tiny_pipe):
    host, port = host_port(server[0])
    api = webuiapi.WebUIApi(host=host, port=port, username="me", password=KEY)
    assert "DPM++ 2M Karras" in [s["name"] for s in api.get_samplers()]
    assert [m["title"] for m in api.get_sd_models()] == [f"tiny-random [{tiny_pipe.loaded.hash}]"]
    assert api.get_progress()["progress"] == 0


def test_webuiapi_progress_preview_and_interrupt(tiny_pipe, tmp_path):
    """A job held at step 3 of 8: progress says 3/8 with a preview; interrupt ends it with no images."""
    gated = GatedPipeline(tiny_pipe, at=3)
    app = create_app([gated], ServerConfig(outputs=tmp_path, preview_interval=0.0))
    with ServerThread(app) as url:
        host, port = host_port(url)
        api = webuiapi.WebUIApi(host=host, port=port, sampler="Euler", steps=8)
        api.get_progress()                                        # someone is watching: previews on
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", api.txt2img(prompt=PROMPT, seed=1, width=32, height=32)))
        t.start()
        assert gated.reached.wait(10)
        p = api.get_progress()
        assert p["progress"] == 3 / 8 and p["state"]["sampling_step"] == 3 and p["state"]["sampling_steps"] == 8
        assert p["eta_relative"] >= 0
        preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
        assert preview.size == (32, 32)
        assert api.interrupt() == {}
        gated.gate.set()
        t.join(30)
        r = out["r"]
        assert r.images == [] and r.info["interrupted"] is True
        assert gated.steps == [0, 1, 2, 3]                         # stopped at the step it was interrupted in
        assert not list(tmp_path.glob("marble-*.png"))
        assert api.get_progress()["progress"] == 0
        assert api.get_progress()["state"]["job_count"] == 0
