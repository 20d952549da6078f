"""ControlNet in whole pipelines: marble's image against diffusers' StableDiffusionControlNetPipeline on
identical random weights (within 1/255), with a conditioning scale, guidance start/end and guess mode;
several units at once; img2img and inpainting; control and resize modes."""
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from marble.adapters.controlnet import ControlSpec, resize_control, soft_scales
from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.controlnet_files import read_controlnet
from marble.checkpoints.diffusers_folder import write_diffusers
from marble.checkpoints.resolve import LoadedModel, random_model
from marble.pipeline import Pipeline
from marble.request import GenerationRequest, RequestError, resolve
from sd_fixtures import diffusers_oracle, randomize_, tiny_sd
from test_controlnet import controlnet_kwargs

diffusers = diffusers_oracle()

SIZE, STEPS, SEED, PROMPT = 64, 10, 42, "a red cat on a blue chair"


def control_image(seed: int) -> Image.Image:
    """Blocky random colours: a control image with structure at the ControlNet's scale."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((SIZE, SIZE), Image.NEAREST)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline, \
        StableDiffusionPipeline
    root = tmp_path_factory.mktemp("cn-pipe")
    model = random_model(lambda: tiny_sd("sd1"), seed=5)
    folder = write_diffusers(from_model(model), root / "pipe")
    base = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    nets = []
    for i in range(2):
        cn = randomize_(ControlNetModel(**controlnet_kwargs("sd1")), seed=20 + i)
        cn.save_pretrained(root / "controlnet" / f"cn{i}")
        nets.append(cn)
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder",)}
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=nets[0])
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    ours = Pipeline(LoadedModel(model, "m", "h"), control_dir=root / "controlnet")
    return model, pipe, nets, ours, root


def theirs_image(pipe, image, **kw) -> np.ndarray:
    """diffusers' linspace Euler starts at σ_max·noise; marble at sqrt(1 + σ_max²)·noise: hand it marble's start."""
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(SEED))
    start = noise * ((1 + sigma_max ** 2) ** 0.5 / pipe.scheduler.init_noise_sigma)
    out = pipe(PROMPT, image=image, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5,
               height=SIZE, width=SIZE, latents=start, **kw).images[0]
    return np.asarray(out).astype(int)


def ours_image(ours, controls, **kw) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, negative_prompt="blurry", seed=SEED, steps=STEPS, sampler="Euler",
                                cfg=7.5, width=SIZE, height=SIZE, controls=tuple(controls), **kw)
    return np.asarray(ours.generate(resolve(request, ours.defaults)).images[0]).astype(int)


def unit(image, name="cn0", **kw) -> ControlSpec:
    return ControlSpec(image=image, model=name, resize="Just Resize", **kw)


@pytest.mark.parametrize("scale, start, end", [(1.0, 0.0, 1.0), (0.6, 0.1, 0.8)])
def test_image_matches_diffusers_controlnet_pipeline(setup, scale, start, end):
    model, pipe, nets, ours, _ = setup
    image = control_image(1)
    theirs = theirs_image(pipe, image, controlnet_conditioning_scale=scale, control_guidance_start=start,
                          control_guidance_end=end)
    got = ours_image(ours, [unit(image, weight=scale, start=start, end=end)])
    plain = ours_image(ours, [])
    assert got.std() > 20
    assert np.abs(got - plain).max() > 10           # the control changes the image
    assert np.abs(got - theirs).max() <= 1          # within 1/255


def test_guess_mode_matches_diffusers(setup):
    """diffusers' guess mode: control on the conditional half of CFG only, residuals scaled by
    logspace(-1, 0). marble's closure takes exactly these two parameters (`scales`, `cond_only`);
    its named modes use sd-webui-controlnet's scales, so here the unit is given diffusers'."""
    model, pipe, nets, ours, _ = setup
    image = control_image(2)
    theirs = theirs_image(pipe, image, guess_mode=True, controlnet_conditioning_scale=0.9)
    n = len(nets[0].controlnet_down_blocks) + 1
    guess = tuple(float(s) for s in torch.logspace(-1, 0, n))
    build = Pipeline.control_units
    ours.control_units = lambda req, images: [replace(u, scales=guess, cond_only=True) for u in build(ours, req, images)]
    try:
        got = ours_image(ours, [unit(image, weight=0.9)])
    finally:
        del ours.control_units
    assert np.abs(got - theirs).max() <= 1


def test_two_units_match_multi_controlnet(setup):
    from diffusers import StableDiffusionControlNetPipeline
    model, pipe, nets, ours, _ = setup
    multi = StableDiffusionControlNetPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"},
                                              controlnet=list(nets))
    multi.set_progress_bar_config(disable=True)
    images = [control_image(3), control_image(4)]
    theirs = theirs_image(multi, images, controlnet_conditioning_scale=[0.7, 0.5], control_guidance_start=[0.0, 0.2],
                          control_guidance_end=[1.0, 0.9])
    got = ours_image(ours, [unit(images[0], weight=0.7), unit(images[1], "cn1", weight=0.5, start=0.2, end=0.9)])
    assert np.abs(got - theirs).max() <= 1


def test_control_modes_and_soft_scales(setup):
    model, pipe, nets, ours, _ = setup
    assert soft_scales(13) == tuple(0.825 ** float(12 - i) for i in range(13))   # SD1.5's 13 residuals
    image = control_image(5)
    images = {mode: ours_image(ours, [unit(image, mode=mode)]) for mode in
              ("Balanced", "My prompt is more important", "ControlNet is more important")}
    assert len({im.tobytes() for im in images.values()}) == 3
    assert np.array_equal(ours_image(ours, [unit(image, mode=1)]), images["My prompt is more important"])


def test_img2img_and_inpainting_take_control(setup):
    model, pipe, nets, ours, _ = setup
    init = control_image(6)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    for kw in ({"init_image": init, "strength": 0.6}, {"init_image": init, "mask": mask}):
        plain = ours_image(ours, [], **kw)
        got = ours_image(ours, [unit(control_image(7))], **kw)
        assert np.abs(got - plain).max() > 10
        if "mask" in kw:   # outside the mask the init image is kept exactly
            keep = np.asarray(mask) == 0
            assert np.array_equal(got[keep], np.asarray(init).astype(int)[keep])


def test_hires_fix_takes_control_in_both_passes(setup):
    model, pipe, nets, ours, _ = setup
    from marble.hires import HiresFix
    hires = HiresFix(scale=1.5, steps=3, denoise=0.6, upscaler="Latent")
    plain = ours_image(ours, [], hires=hires)
    got = ours_image(ours, [replace(unit(control_image(10)), resize="Crop and Resize")], hires=hires)
    assert got.shape == plain.shape == (96, 96, 3)
    assert np.abs(got - plain).max() > 10


def test_resize_modes():
    wide = Image.new("RGB", (40, 20), (200, 0, 0))
    wide.paste((0, 0, 200), (0, 0, 10, 20))   # a blue band at the left
    assert resize_control(wide, 20, 20, "Just Resize").size == (20, 20)
    crop = np.asarray(resize_control(wide, 20, 20, "Crop and Resize"))
    assert (crop[:, :, 0] > 150).all()        # the centre crop cuts the band away
    fill = np.asarray(resize_control(wide, 20, 20, "Resize and Fill"))
    assert fill.shape == (20, 20, 3) and (fill[0, 10] == fill[-1, 10]).all()   # filled above and below
    assert fill[10, 15, 0] > 150 and fill[10, 1, 2] > 150


def test_bad_units_are_refused(setup):
    model, pipe, nets, ours, root = setup
    image = control_image(8)
    bad = [(unit(image, weight=3.0), "weight"), (unit(image, start=0.5, end=0.5), "start"),
           (unit(image, mode="loud"), "control mode"), (replace(unit(image), resize="zoom"), "resize mode"),
           (unit(image, module="openpose"), "needs downloaded weights"), (unit(image, module="blur"), "unknown"),
           (replace(unit(image), image=None), "not an image")]
    for spec, message in bad:
        with pytest.raises(RequestError, match=message):
            resolve(GenerationRequest(prompt="x", controls=(spec,)), ours.defaults)
    with pytest.raises(RequestError, match="at most 3"):
        resolve(GenerationRequest(prompt="x", controls=(unit(image),) * 4), ours.defaults)
    from marble.errors import ModelLoadError
    for name in ("../pipe", "missing", "/etc/passwd"):
        with pytest.raises(ModelLoadError):
            ours.generate(resolve(GenerationRequest(prompt="x", steps=1, controls=(unit(image, name),)), ours.defaults))


def test_record_carries_the_units(setup):
    model, pipe, nets, ours, root = setup
    request = GenerationRequest(prompt=PROMPT, seed=1, steps=2, width=SIZE, height=SIZE,
                                controls=(replace(unit(control_image(9), weight=0.5, mode=2), image_path="c.png",
                                                  image_sha256="ab" * 32),))
    record = ours.generate(resolve(request, ours.defaults)).records[0]
    cn = read_controlnet(root / "controlnet" / "cn0")
    (entry,) = record.controlnets
    assert entry["model"] == "cn0" and entry["hash"] == cn.hash and entry["image_sha256"] == "ab" * 32
    text = record.to_parameters()
    assert (f'ControlNet 0: "Module: none, Model: cn0 [{cn.hash}], Weight: 0.5, Resize Mode: Just Resize, '
            'Guidance Start: 0, Guidance End: 1, Control Mode: ControlNet is more important, '
            'Processor Res: 512, Pixel Perfect: False"') in text
    from marble.record import GenerationRecord
    assert GenerationRecord.from_json(record.to_json()) == record


def test_the_builtin_model_takes_a_controlnet_built_from_its_unet(tmp_path):
    """One module for every U-Net: a ControlNet built from the built-in model's config (random, non-zero),
    saved in lllyasviel's layout, loads against that model and steers its images."""
    from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
    from marble.checkpoints.resolve import builtin_path, load_model
    from marble.models.controlnet import ControlNet, controlnet_config
    if not builtin_path().is_file():
        pytest.skip("the built-in model is not shipped in this checkout")
    loaded = load_model("builtin")
    m = loaded.model
    config = controlnet_config(m.config.unet, m.latent_factor)
    net = randomize_(ControlNet(config), seed=9)
    write_controlnet(ControlNetFile(config, net.state_dict(), tmp_path, "", "marble"), tmp_path / "cn.safetensors",
                     "single-file")
    ours = Pipeline(loaded, control_dir=tmp_path)
    kw = dict(prompt="a red circle", seed=3, steps=3, width=64, height=64)
    plain = np.asarray(ours.generate(resolve(GenerationRequest(**kw), ours.defaults)).images[0]).astype(int)
    request = GenerationRequest(**kw, controls=(ControlSpec(image=control_image(11), model="cn", weight=0.5),))
    got = np.asarray(ours.generate(resolve(request, ours.defaults)).images[0]).astype(int)
    assert np.abs(got - plain).max() > 10
