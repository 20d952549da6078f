"""The pipeline on a tiny random-weight model: seeds, batches, guidance, img2img, inpainting."""
import numpy as np
import pytest
import torch
from PIL import Image

from marble.diffusion.guidance import cfg_denoiser, conditional_denoiser, inpaint_denoiser
from marble.diffusion.noise import NoiseSource
from marble.diffusion.samplers import SAMPLERS, get_sampler
from marble.pipeline import pil_to_pixels, pixels_to_pil
from marble.request import GenerationRequest, RequestError, resolve

pytestmark = pytest.mark.unit

BASE = dict(prompt="two red circles above a blue square", steps=4, sampler="Euler", cfg=5.0, width=32, height=32)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def gen(pipe, **kw):
    return pipe.generate(resolve(GenerationRequest(**{**BASE, **kw}), pipe.defaults))


def test_shapes_and_records(tiny_pipe):
    res = gen(tiny_pipe, seed=3, n=2, width=48, height=32)
    assert [im.size for im in res.images] == [(48, 32)] * 2
    assert [r.seed for r in res.records] == [3, 4]
    r = res.records[0]
    assert (r.steps, r.sampler, r.cfg, r.width, r.height, r.mode) == (4, "Euler", 5.0, 48, 32, "txt2img")
    assert r.model_name == "tiny-random" and len(r.model_hash) == 10


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDPM"])
def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(tiny_pipe, sampler):
    batch = gen(tiny_pipe, seed=11, n=3, sampler=sampler).images
    for i in range(3):
        single = gen(tiny_pipe, seed=11 + i, n=1, sampler=sampler).images[0]
        assert np.array_equal(arr(batch[i]), arr(single)), f"image {i}"


def test_same_seed_is_bit_identical_and_other_seeds_differ(tiny_pipe):
    a = arr(gen(tiny_pipe, seed=7, sampler="Euler a").images[0])
    b = arr(gen(tiny_pipe, seed=7, sampler="Euler a").images[0])
    c = arr(gen(tiny_pipe, seed=8, sampler="Euler a").images[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_every_registered_sampler_runs_through_the_pipeline(tiny_pipe):
    outs = {name: arr(gen(tiny_pipe, seed=1, sampler=name, steps=3).images[0]) for name in SAMPLERS}
    assert all(o.shape == (32, 32, 3) for o in outs.values())
    # deterministic first-order samplers share the first step; samplers must not all collapse to one image
    assert len({o.tobytes() for o in outs.values()}) >= 5


def test_cfg_scale_one_is_the_conditional_prediction(tiny_loaded):
    m = tiny_loaded.model
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([3.0, 0.5])
    cond = {"context": torch.randn(2, 5, 32)}
    uncond = {"context": torch.randn(2, 5, 32)}
    batched = cfg_denoiser(m.denoiser, cond, uncond, 1.0)(x, sigma)
    plain = conditional_denoiser(m.denoiser, cond)(x, sigma)
    assert torch.allclose(batched, plain, atol=1e-5, rtol=1e-5)
    # and scale s is the lerp u + s (c - u), with the uncond prediction really used
    u = m.denoiser(x, sigma, **uncond)
    guided = cfg_denoiser(m.denoiser, cond, uncond, 4.0)(x, sigma)
    assert torch.allclose(guided, u + 4.0 * (plain - u), atol=1e-4, rtol=1e-4)


def test_cfg_one_in_the_pipeline_ignores_the_negative_prompt(tiny_pipe):
    a = arr(gen(tiny_pipe, seed=5, cfg=1.0, negative_prompt="green").images[0])
    b = arr(gen(tiny_pipe, seed=5, cfg=1.0, negative_prompt="").images[0])
    assert np.array_equal(a, b)


def test_negative_prompt_changes_the_output(tiny_pipe):
    a = arr(gen(tiny_pipe, seed=5, negative_prompt="").images[0]).astype(int)
    b = arr(gen(tiny_pipe, seed=5, negative_prompt="blurry green triangles").images[0]).astype(int)
    assert np.abs(a - b).mean() > 1.0


def init_image(size=32) -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.zeros((size, size, 3), np.uint8)
    base[: size // 2] = (200, 40, 40)
    base[size // 2:] = (30, 60, 210)
    base = base.astype(int) + rng.integers(-20, 20, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def test_img2img_strength_to_zero_returns_the_codec_round_trip_of_the_init(tiny_pipe):
    init = init_image()
    m = tiny_pipe.model
    with torch.inference_mode():
        round_trip = pixels_to_pil(m.vae.decode(m.vae.encode(pil_to_pixels(init, 32, 32))))[0]
    # int(steps * strength) == 0: no step runs, the init comes back through the codec only
    out = gen(tiny_pipe, seed=1, init_image=init, strength=0.1, steps=4).images[0]
    assert np.array_equal(arr(out), arr(round_trip))
    full = gen(tiny_pipe, seed=1, init_image=init, strength=1.0, steps=4).images[0]
    assert not np.array_equal(arr(full), arr(round_trip))


def test_img2img_runs_the_tail_of_the_schedule(tiny_pipe):
    calls = []
    req = GenerationRequest(**{**BASE, "steps": 10, "seed": 2}, init_image=init_image(), strength=0.55)
    res = tiny_pipe.generate(resolve(req, tiny_pipe.defaults), callback=lambda i, total, x0: calls.append((i, total)))
    assert calls == [(i, 5) for i in range(5)]  # int(10 * 0.55) = 5 steps
    assert res.records[0].mode == "img2img" and res.records[0].strength == 0.55


def test_inpainting_keeps_unmasked_pixels_identical(tiny_pipe):
    init = init_image()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:28] = 255
    res = gen(tiny_pipe, seed=4, n=2, init_image=init, mask=Image.fromarray(mask))
    for im in res.images:
        out, src = arr(im), arr(init)
        assert np.array_equal(out[mask == 0], src[mask == 0])
        assert not np.array_equal(out[mask == 255], src[mask == 255])
    assert res.records[0].mode == "inpaint" and res.records[0].strength == 1.0


def test_inpaint_closure_tracks_the_known_latent_along_the_schedule():
    """With Euler, the kept region of x must sit exactly at known + sigma_i * noise at every step."""
    known = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    fixed = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    seen = []

    def model(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return torch.tanh(x) * 0.5  # an arbitrary denoiser

    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0])
    x = known + fixed * sigmas[0]
    x = get_sampler("Euler").fn(inpaint_denoiser(model, known, mask, fixed), x, sigmas, noise=NoiseSource([0]))
    for x_in, sigma in seen:
        keep = (known + sigma.reshape(-1, 1, 1, 1) * fixed)[..., 2:, :]
        assert torch.allclose(x_in[..., 2:, :], keep, atol=1e-6)
    assert torch.allclose(x[..., 2:, :], known[..., 2:, :], atol=1e-6)


def test_empty_prompt_is_unconditional_generation(tiny_pipe):
    res = gen(tiny_pipe, prompt="", seed=1)
    assert res.records[0].prompt == "" and res.images[0].size == (32, 32)


def test_long_prompt_is_read_whole_without_a_warning(tiny_pipe):
    """Past 75 tokens a prompt takes more windows (marble.prompts.encode) instead of being cut: text
    after the first window changes the image, and nothing warns."""
    long = " ".join(["red circle"] * 60)
    res = gen(tiny_pipe, prompt=long, seed=1, steps=1)
    more = gen(tiny_pipe, prompt=long + " blue square" * 10, seed=1, steps=1)
    assert not res.warnings and not more.warnings
    assert np.asarray(res.images[0]).tobytes() != np.asarray(more.images[0]).tobytes()


@pytest.mark.parametrize("kw, message", [
    (dict(sampler="Bogus"), "sampler"),
    (dict(steps=0), "steps"),
    (dict(steps=1001), "steps"),
    (dict(cfg=-1.0), "cfg"),
    (dict(cfg=float("nan")), "cfg"),
    (dict(cfg=3.402823466385289e+38), "cfg"),   # found by the server fuzz test: overflowed float32 in lerp
    (dict(width=33), "multiple"),
    (dict(width=4096, height=4096), "limit"),
    (dict(n=0), "n must"),
    (dict(seed=2**32), "seed"),
    (dict(prompt="a \udcff circle"), "not valid Unicode"),
    (dict(negative_prompt="\ud800"), "not valid Unicode"),
    (dict(strength=0.5), "init image"),
    (dict(init_image=Image.new("RGB", (32, 32)), strength=0.0), "strength"),
    (dict(init_image=Image.new("RGB", (32, 32)), strength=1.5), "strength"),
    (dict(init_image=Image.new("RGB", (32, 32)), mask=Image.new("L", (16, 16))), "mask"),
    (dict(mask=Image.new("L", (32, 32))), "mask"),
])
def test_invalid_requests_are_refused(tiny_pipe, kw, message):
    with pytest.raises(RequestError, match=message):
        resolve(GenerationRequest(**{**BASE, **kw}), tiny_pipe.defaults)


def test_a_request_is_resolved_once_and_the_pipeline_runs_only_resolved_ones(tiny_pipe):
    """resolve fills every default (a random seed is drawn once and kept); resolving again changes
    nothing; the pipeline refuses an unresolved request instead of resolving it a second time."""
    c = tiny_pipe.model.config
    raw = GenerationRequest(prompt="a circle", n=2)
    req = resolve(raw, tiny_pipe.defaults)
    assert (req.steps, req.sampler, req.cfg, req.width, req.height, req.strength) == \
        (c.default_steps, c.default_sampler, c.default_cfg, c.default_width, c.default_height, None)
    assert isinstance(req.seed, int) and resolve(req, tiny_pipe.defaults) == req
    with pytest.raises(TypeError, match="resolve"):
        tiny_pipe.generate(raw)
    img = resolve(GenerationRequest(prompt="", init_image=Image.new("RGB", (48, 32))), tiny_pipe.defaults)
    assert (img.width, img.height, img.strength, img.mode) == (48, 32, 0.75, "img2img")
