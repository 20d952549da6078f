"""Stable Diffusion parity with diffusers / transformers on identical random weights, offline.

Two directions, SD1 and SD2 shapes (tests/sd_fixtures.py):
- born in diffusers: diffusers builds and saves a pipeline folder; marble reads it; U-Net, VAE
  encode/decode and text encoder agree within 1e-4 (fp32), and the configs translate exactly;
- born in marble: marble writes a diffusers folder; StableDiffusionPipeline.from_pretrained loads
  it; full txt2img with Euler and with DDIM agrees within 1/255 per pixel.
"""
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from marble.checkpoints.checkpoint import from_model, to_model
from marble.checkpoints.detect import open_checkpoint
from marble.checkpoints.diffusers_folder import write_diffusers
from marble.checkpoints.resolve import LoadedModel, random_model
from marble.diffusion.denoiser import c_in
from marble.diffusion.guidance import guided_denoiser
from marble.diffusion.noise import NoiseSource
from marble.diffusion.samplers import sample_ddim
from marble.diffusion.schedule import spacing
from marble.pipeline import Pipeline
from marble.request import GenerationRequest, resolve
from sd_fixtures import (SD1_UNET, SD2_UNET, TINY_VAE, clip_text_kwargs, diffusers_oracle, diffusers_unet_kwargs,
                         diffusers_vae_kwargs, oracle_tokenizer_folder, randomize_, tiny_sd)

diffusers = diffusers_oracle()
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat on a blue chair", "", "castle " * 90]   # the last is over 77 tokens


def scheduler_kwargs(prediction: str) -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])


def diffusers_folder(tmp_path_factory, family: str, in_channels: int) -> tuple:
    """A pipeline folder written by diffusers itself (its own key names, configs and tokenizer)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    unet = randomize_(UNet2DConditionModel(**diffusers_unet_kwargs(family, in_channels)), seed=1)
    vae = randomize_(AutoencoderKL(**diffusers_vae_kwargs()), seed=2)
    text = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text_kwargs(family))), seed=3)
    root = tmp_path_factory.mktemp(f"diffusers-{family}-{in_channels}")
    pad = "<|endoftext|>" if family == "sd1" else "!"
    tokenizer = transformers.CLIPTokenizer.from_pretrained(oracle_tokenizer_folder(root / "vocab", pad),
                                                           local_files_only=True)
    prediction = "eps" if family == "sd1" else "v"
    scheduler = EulerDiscreteScheduler(**scheduler_kwargs(prediction), timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe, prediction


@pytest.fixture(scope="module", params=[("sd1", 4), ("sd2", 4), ("sd1", 9)], ids=["sd1", "sd2", "sd1-inpaint"])
def born_in_diffusers(request, tmp_path_factory):
    family, in_channels = request.param
    folder, pipe, prediction = diffusers_folder(tmp_path_factory, family, in_channels)
    return family, in_channels, folder, pipe, prediction


@torch.no_grad()
def test_diffusers_folder_configs_translate_exactly(born_in_diffusers):
    family, in_channels, folder, _, prediction = born_in_diffusers
    config = open_checkpoint(folder).config
    want = SD1_UNET if family == "sd1" else SD2_UNET
    assert config.unet == replace(want, in_channels=in_channels)
    assert config.vae == TINY_VAE
    assert config.prediction == prediction
    assert config.schedule == {"name": "scaled_linear", "n": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    text = tiny_sd(family).text
    assert config.text["activation"] == ("quick_gelu" if family == "sd1" else "gelu")
    assert config.text["pad_id"] == text.get("pad_id", 49407)
    assert config.default_width == 64   # unet sample_size 16 × VAE factor 4


@torch.no_grad()
def test_components_match_diffusers_and_transformers(born_in_diffusers):
    family, in_channels, folder, pipe, _ = born_in_diffusers
    model = to_model(open_checkpoint(folder))
    # text: the tokenizer diffusers saved and marble's own, then the encoder (SD2: pad "!")
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(model.text_encoder.tokenize(PROMPTS), ids)
    want = pipe.text_encoder(ids)[0]
    got = model.text_encoder.encode(PROMPTS)
    assert (got - want).abs().max() < 1e-4
    # U-Net at integer and fractional timesteps; a 9-channel U-Net takes mask + masked latent as `concat`
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 500.5, 3.25])
    context = torch.randn(3, 77, 32, generator=g)
    concat = torch.randn(3, in_channels - 4, 16, 12, generator=g) if in_channels > 4 else None
    want = pipe.unet(x if concat is None else torch.cat([x, concat], 1), t, encoder_hidden_states=context).sample
    got = model.unet(x, t, context, concat)
    assert want.abs().max() > 0.5 and (got - want).abs().max() < 1e-4
    # VAE: encode = scaled posterior mean, decode = unscale + decode
    pixels = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    want = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    assert (model.vae.encode(pixels) - want).abs().max() < 1e-4
    latent = torch.randn(2, 4, 16, 12, generator=g)
    want = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    assert (model.vae.decode(latent) - want).abs().max() < 1e-4


# --- full pipelines -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sd1", "sd2"])
def born_in_marble(request, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    family = request.param
    model = random_model(lambda: tiny_sd(family), seed=5)
    folder = write_diffusers(from_model(model), tmp_path_factory.mktemp(f"marble-{family}") / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return family, model, pipe


def initial_noise(seed: int, shape: tuple) -> torch.Tensor:
    """How seeds map: marble's seed s draws the initial noise from torch.Generator("cpu").manual_seed(s),
    exactly as a diffusers pipeline given that generator does."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_seeds_map_to_the_same_initial_noise():
    shape = (1, 4, 16, 16)
    assert torch.equal(NoiseSource([1234]).randn(shape), initial_noise(1234, shape))
    from diffusers.utils.torch_utils import randn_tensor
    assert torch.equal(randn_tensor(shape, generator=torch.Generator().manual_seed(1234)), initial_noise(1234, shape))


@pytest.mark.parametrize("steps", [10, 7])
def test_txt2img_euler_matches_diffusers(born_in_marble, steps):
    """marble "Euler" (spacing "normal": t = linspace(999, 0, steps), σ log-linear between timesteps)
    against EulerDiscreteScheduler(timestep_spacing="linspace"); 7 steps puts t between timesteps,
    where diffusers interpolates σ linearly instead (a ~1e-5 relative difference in σ)."""
    family, model, pipe = born_in_marble
    from diffusers import EulerDiscreteScheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    seed, size = 42, 64
    request = GenerationRequest(prompt=PROMPTS[0], negative_prompt="blurry", seed=seed, steps=steps,
                                sampler="Euler", cfg=7.5, width=size, height=size)
    x0s = []
    ours = Pipeline(LoadedModel(model, "m", "h"))
    result = ours.generate(resolve(request, ours.defaults), callback=lambda i, n, x0: x0s.append(x0.clone()))
    ours = np.asarray(result.images[0]).astype(int)
    # marble starts at sqrt(1 + σ_max²)·noise (the VP prior, diffusers' init_noise_sigma for "leading");
    # diffusers' linspace Euler starts at σ_max·noise, so hand it the same start
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas[0])
    start = initial_noise(seed, (1, 4, size // 4, size // 4)) * ((1 + sigma_max ** 2) ** 0.5 / pipe.scheduler.init_noise_sigma)
    final = {}

    def keep_latents(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    theirs = pipe(PROMPTS[0], negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5,
                  height=size, width=size, latents=start, callback_on_step_end=keep_latents).images[0]
    theirs = np.asarray(theirs).astype(int)
    assert ours.std() > 20                        # a random model still draws a varied image
    assert np.abs(ours - theirs).max() <= 1       # within 1/255
    # sharper: the final latents (Euler's last step lands on x0) agree to float32 rounding
    latents = final["latents"]
    assert (x0s[-1] - latents).abs().max() < 1e-4 * latents.abs().max()


def test_ddim_matches_diffusers_step_for_step(born_in_marble):
    """DDIM, eta 0, on SD1.5's DDIMScheduler config (leading timesteps, steps_offset 1,
    set_alpha_to_one False). diffusers' last step goes from t = 1 to ā_0, not to ā = 1: it returns
    z = sqrt(ā_0)·x0 + sqrt(1 − ā_0)·eps, a latent with noise σ_min ≈ 0.029 left in it, and decodes
    that. marble's DDIM ends at σ = 0 (the clean x0). Same walk: marble's sample_ddim over the
    leading σ's with the final 0 replaced by σ(t=0), then the VP latent sqrt(ā)·x is decoded."""
    family, model, pipe = born_in_marble
    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading", steps_offset=1,
                                               set_alpha_to_one=False, clip_sample=False)
    seed, steps, size, cfg = 3, 8, 64, 7.5
    theirs = np.asarray(pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
                             generator=torch.Generator().manual_seed(seed)).images[0]).astype(int)

    with torch.inference_mode():
        context = model.text_encoder.encode([PROMPTS[0], ""])
        denoiser = guided_denoiser(model.denoiser, {"context": context[:1]}, {"context": context[1:]}, cfg)
        sigmas = spacing("leading", model.schedule, steps)
        sigmas[-1] = model.schedule.sigma_min
        noise = NoiseSource([seed])
        x = noise.randn((1, 4, size // 4, size // 4)) * (1 + sigmas[0] ** 2) ** 0.5   # z_T = noise (init_noise_sigma 1)
        x = sample_ddim(denoiser, x, sigmas, noise=noise)
        pixels = model.vae.decode(x * c_in(sigmas[-1]))
    ours = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(int)
    assert ours.std() > 20
    assert np.abs(ours - theirs).max() <= 1


# --- full size -------------------------------------------------------------------------------------

@pytest.mark.slow
@torch.inference_mode()
def test_full_size_sd15_unet_matches_diffusers():
    """SD1.5's U-Net at full size (859,520,964 parameters, ~3.4 GB fp32) with seeded random weights:
    diffusers' UNet2DConditionModel with SD1.5's config holds the very same tensors (renamed, not
    copied) and agrees with marble's within 1e-4 on a CFG-sized batch at 512² (64² latents)."""
    from diffusers import UNet2DConditionModel

    from marble.checkpoints.diffusers_keys import rename, unet_table
    from marble.models.unet import UNET_PRESETS, UNet

    config = UNET_PRESETS["sd15"]
    with torch.device("meta"):
        ours = UNet(config)
        theirs = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)   # diffusers' SD1.5 defaults
    ours.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, p in ours.named_parameters():
        if p.ndim > 1:
            p.normal_(0.0, 1.0 / p[0].numel() ** 0.5, generator=g)
        else:
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1, generator=g)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    table = unet_table(config)
    theirs.load_state_dict({rename(k, table): v for k, v in ours.state_dict().items()}, strict=True, assign=True)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.tensor([999.0, 250.5])
    context = torch.randn(2, 77, 768, generator=g)
    want = theirs(x, t, encoder_hidden_states=context).sample
    got = ours.eval()(x, t, context)
    assert want.abs().max() > 0.1          # not a degenerate output
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, diff
