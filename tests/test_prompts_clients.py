"""A1111 prompts and the hires fix through a real client: `webuiapi` against `marble serve`'s app on a
loopback port, with a weighted, long, BREAK prompt and enable_hr. Images are compared bit for bit
with the pipeline run directly."""
import numpy as np
import pytest

from marble.hires import HiresFix
from marble.prompts.conditioning import window_count
from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.state import ServerConfig
from marble.server.thread import ServerThread

webuiapi = pytest.importorskip("webuiapi")

KEY = "test-key"
PROMPT = "masterpiece, (two red circles:1.3), [blurry], " + "a blue square above a green star, " * 12 + \
    "BREAK background, (forest:0.8)"
NEGATIVE = "[lowres|ugly], (bad anatomy:1.2)"


@pytest.fixture(scope="module")
def api(tiny_pipe, tmp_path_factory):
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path_factory.mktemp("out"), api_key=KEY, max_queue=4,
                                               limits=ServerLimits(max_steps=50, max_pixels=64 * 64)))
    with ServerThread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3, username="me", password=KEY)


def test_weighted_long_break_prompt_with_hires_fix(api, tiny_pipe):
    assert window_count(tiny_pipe.model.text_encoder, PROMPT) == 3       # 75 tokens, the rest, BREAK
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, cfg_scale=6, width=32, height=32,
                    enable_hr=True, hr_scale=2, hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=4,
                    denoising_strength=0.55)
    assert r.image.size == (64, 64)
    expected = tiny_pipe.generate(resolve(GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, cfg=6.0, width=32, height=32, steps=3, sampler="Euler",
        hires=HiresFix(scale=2, steps=4, denoise=0.55, upscaler="Latent")), tiny_pipe.defaults))
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(expected.images[0]))
    infotext = r.info["infotexts"][0]
    assert infotext == f"{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 3, Sampler: Euler, CFG scale: 6, Seed: 11, " \
        f"Size: 32x32, Model hash: {tiny_pipe.loaded.hash}, Model: tiny-random, Denoising strength: 0.55, " \
        f"Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent, Version: {r.info['version']}"
    assert r.info["denoising_strength"] == 0.55 and (r.info["width"], r.info["height"]) == (32, 32)
    assert api.png_info(r.image).info == infotext
    assert not r.info["warnings"]


def test_lanczos_hires_by_resize(api, tiny_pipe):
    r = api.txt2img(prompt="a (red:1.2) circle", seed=2, width=32, height=32, enable_hr=True, hr_resize_x=48,
                    hr_resize_y=64, hr_upscaler="Lanczos", denoising_strength=0.5)
    assert r.image.size == (48, 64)
    assert "Denoising strength: 0.5, Hires resize: 48x64, Hires upscaler: Lanczos," in r.info["infotexts"][0]


def test_upscaler_listings(api):
    assert [u["name"] for u in api.get_upscalers()] == ["Lanczos", "Nearest", "None"]
    assert "Latent (bicubic)" in [m["name"] for m in api.get_latent_upscale_modes()]


@pytest.mark.parametrize("payload, message", [
    (dict(enable_hr=True, hr_scale=4), "over this server's limit"),          # 128x128 > 64x64
    (dict(enable_hr=True, hr_upscaler="R-ESRGAN 4x+"), "marble can run"),
    (dict(enable_hr=True, denoising_strength=1.5), "denoising strength"),
    (dict(enable_hr=True, hr_second_pass_steps=500), "hires steps"),
    (dict(prompt="a (cat:1.2.3)"), "not a number"),
    (dict(prompt="[a:b:-1]"), "negative"),
])
def test_bad_hires_and_prompts_are_4xx_with_one_line(api, payload, message):
    import httpx
    body = {"prompt": "x", "width": 32, "height": 32, "steps": 2, **payload}
    res = httpx.post(f"{api.baseurl}/txt2img", json=body, auth=("me", KEY), timeout=60)
    assert 400 <= res.status_code < 500 and message in res.json()["detail"]
    assert "\n" not in res.json()["detail"]


def test_emphasis_from_override_settings(api, tiny_pipe):
    r = api.txt2img(prompt="a (red:1.4) circle", seed=4, width=32, height=32,
                    override_settings={"emphasis": "No norm"})
    expected = tiny_pipe.generate(resolve(GenerationRequest(prompt="a (red:1.4) circle", seed=4, width=32, height=32,
                                                            steps=3, sampler="Euler", emphasis="no-norm"),
                                          tiny_pipe.defaults))
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(expected.images[0]))
    assert ", Emphasis: No norm, Version: " in r.info["infotexts"][0]
