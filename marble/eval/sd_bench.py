"""`marble bench`: Stable Diffusion 1.5's architecture, timed in marble and in diffusers on the same
weights in one process.

The weights are random (seeded, from the config: nothing is downloaded), so images are noise-like;
what counts is time and memory. diffusers' pipeline is built around the very same tensors (no
copy) and starts from the same initial latent, so its image is also a full-size parity check.
Reported: seconds per U-Net step (one CFG-batched call, batch 2), per VAE decode, per image; peak
RSS of each phase; the marble / diffusers ratio; and marble's bf16 mode with its PSNR against fp32.
With opt-in approximations (`approximations`: request fields such as {"tome": 0.5}; `quantize`:
"int8", on a second copy of the weights, fp32 only), marble's fp32 and bf16 images are made again
with them: image time and PSNR against the exact fp32 image, so the issue's "≤ 0.5× diffusers with
approximations that keep 30 dB" is one run's ratio.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from marble.checkpoints.diffusers_folder import (rename, scheduler_config_to_diffusers, text_config_to_diffusers,
                                                 tokenizer_files, unet_config_to_diffusers, unet_table,
                                                 vae_config_to_diffusers, vae_table, vae_to_diffusers_tensor)
from marble.checkpoints.resolve import LoadedModel
from marble.diffusion.guidance import guided_denoiser
from marble.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from marble.models.skeleton import skeleton
from marble.models.stable_diffusion import sd_config
from marble.models.text import text_config_from_dict

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"
NEGATIVE = "blurry, low quality"
Log = Callable[[str], None]


@dataclass
class BenchSettings:
    preset: str = "sd15"
    size: int = 512               # pixels per side
    steps: int = 20               # sampler steps per image (Euler)
    cfg: float = 7.5
    unet_calls: int = 3           # timed U-Net calls (median), after one warm-up call
    decodes: int = 2              # timed VAE decodes (median), after one warm-up
    images: bool = True           # time whole images (steps U-Net calls + decode each)
    diffusers: bool = True        # time diffusers on the same weights
    bf16: bool = True             # time marble in bf16 and compare its image with fp32 (PSNR)
    channels_last: bool = False   # NHWC weights for marble's convolutions (oneDNN's other layout); not what generate uses
    seed: int = 0
    threads: int | None = None
    approximations: dict = field(default_factory=dict)   # request fields, e.g. {"tome": 0.5}: extra image rows
    quantize: str | None = None   # "int8": the fp32 extra row runs a quantised copy (bf16 refuses it)

    def approximation_label(self, quantized: bool = True) -> str:
        names = {"tome": "ToMe", "deepcache": "DeepCache"}
        parts = [f"{names.get(k, k)} {v:g}" for k, v in self.approximations.items()]
        return " + ".join(parts + ([self.quantize] if quantized and self.quantize else []))


@dataclass
class Timing:
    unet_step_s: float | None = None
    vae_decode_s: float | None = None
    image_s: float | None = None
    peak_rss_gb: float | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    latent: torch.Tensor | None = field(default=None, repr=False)   # the final latent, before decoding


def rss_gb(field_name: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Linux: reset VmHWM (peak RSS) to the current RSS, to measure one phase at a time."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def median_time(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- the model -------------------------------------------------------------------------------------

@torch.no_grad()
def random_sd_model(preset: str | LatentDiffusionConfig = "sd15", seed: int = 0) -> LatentDiffusion:
    """The SD architecture with seeded random weights, built without a first default initialisation:
    meta construction, then every tensor drawn once (the scheme of resolve.random_model: normal with
    std 1/sqrt(fan_in) for matrices and kernels, norms near 1, small biases)."""
    config = sd_config(preset) if isinstance(preset, str) else preset
    with skeleton():
        model = LatentDiffusion(config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            draw_weight(module, name, p, g)
    return model.eval().requires_grad_(False)


def draw_weight(module: torch.nn.Module, name: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Fill `t` (parameter `name` of `module`) in place: norms' weights near 1, matrices and kernels
    normal with std 1/sqrt(fan_in), other vectors small."""
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
        return t.normal_(1.0, 0.1, generator=g)
    if t.ndim > 1:
        return t.normal_(0.0, 1.0 / max(1, t[0].numel()) ** 0.5, generator=g)
    return t.normal_(0.0, 0.1, generator=g)


def use_channels_last(model: LatentDiffusion) -> LatentDiffusion:
    """Convolution weights in NHWC: oneDNN then runs the U-Net and VAE convolutions without layout
    conversions (inputs follow the weights' format)."""
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    return model


# --- diffusers on the same tensors ---------------------------------------------------------------

def import_diffusers():
    """diffusers' classes for the comparison. Importing its SD pipeline makes transformers advise
    installing torchvision (the pipeline module names CLIP's image processor, which we never build:
    feature_extractor=None); torchvision fails to import beside this torch and then breaks diffusers,
    so that one import runs with transformers' warnings off."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    finally:
        hf_logging.set_verbosity(level)
    return AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel


def diffusers_pipeline(model: LatentDiffusion):
    """diffusers' StableDiffusionPipeline whose modules hold marble's tensors (renamed, not copied),
    with Euler on linspace timesteps (marble's "normal" spacing)."""
    import transformers

    AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel = import_diffusers()

    c = model.config
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}   # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel(**strip(unet_config_to_diffusers(c.unet, c.default_height // c.latent_factor)))
        vae = AutoencoderKL(**strip(vae_config_to_diffusers(c.vae, c.default_height)))
        text_cfg = text_config_from_dict(c.text)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config_to_diffusers(text_cfg)))
    ut, vt = unet_table(c.unet), vae_table(c.vae)
    unet.load_state_dict({rename(k, ut): v for k, v in model.unet.state_dict().items()}, assign=True)
    vae.load_state_dict({rename(k, vt): vae_to_diffusers_tensor(k, v) for k, v in model.vae.state_dict().items()},
                        assign=True)
    text_state = model.text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in text.state_dict()):   # transformers 5 drops the prefix
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    text.load_state_dict(text_state, assign=True)
    for name, buffer in list(text.named_buffers()):   # transformers' position_ids constant, still on meta
        owner, _, leaf = name.rpartition(".")
        if buffer.is_meta and leaf == "position_ids":
            text.get_submodule(owner).register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                                      persistent=False)
    left = [n for n, t in [*text.named_buffers(), *unet.named_buffers(), *vae.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers modules left uninitialised: {left}")
    with tempfile.TemporaryDirectory() as folder:
        for name, data in tokenizer_files(text_cfg.pad_id, text_cfg.max_tokens).items():
            Path(folder, name).write_text(data, encoding="utf-8")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    scheduler = EulerDiscreteScheduler.from_config(strip(scheduler_config_to_diffusers(c)))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- timing ----------------------------------------------------------------------------------------

@torch.inference_mode()
def time_marble(model: LatentDiffusion, s: BenchSettings, log: Log, fields: dict | None = None,
                quantize: str | None = None) -> Timing:
    """U-Net step, decode and whole image as s asks; `fields`: extra request fields for the image;
    `quantize`: the image's pipeline quantises the model's U-Net (in place)."""
    from marble.pipeline import Pipeline
    from marble.request import GenerationRequest, resolve

    reset_peak()
    out = Timing()
    dtype, latent = model.dtype, s.size // model.latent_factor
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
    context = model.text_encoder.encode([PROMPT, NEGATIVE]).to(dtype)
    denoiser = guided_denoiser(model.denoiser, {"context": context[:1]}, {"context": context[1:]}, s.cfg)
    sigma = torch.tensor([1.0])
    if s.unet_calls:
        denoiser(x, sigma)   # warm-up: oneDNN picks and caches kernels on first use
        out.unet_step_s = median_time(lambda: denoiser(x, sigma), s.unet_calls)
        log(f"  U-Net step (CFG batch 2): {out.unet_step_s:.2f} s")
    if s.decodes:
        model.vae.decode(x)
        out.vae_decode_s = median_time(lambda: model.vae.decode(x), s.decodes)
        log(f"  VAE decode {s.size}²: {out.vae_decode_s:.2f} s")
    if s.images:
        pipe = Pipeline(LoadedModel(model, s.preset, "random"), quantize=quantize)
        request = resolve(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=s.seed, steps=s.steps,
                                            sampler="Euler", cfg=s.cfg, width=s.size, height=s.size, **(fields or {})),
                          pipe.defaults)
        last = {}
        t0 = time.perf_counter()
        image = pipe.generate(request, callback=lambda i, n, x0: last.update(x0=x0)).images[0]
        out.image_s = time.perf_counter() - t0
        out.latent = last["x0"].float()   # Euler's last step lands on its x0 estimate
        out.image = np.asarray(image)
        log(f"  image ({s.steps} steps): {out.image_s:.1f} s")
    out.peak_rss_gb = rss_gb()
    return out


@torch.inference_mode()
def time_diffusers(pipe, model: LatentDiffusion, s: BenchSettings, log: Log) -> Timing:
    reset_peak()
    out = Timing()
    latent = s.size // model.latent_factor
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ids = pipe.tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    context = pipe.text_encoder(ids)[0]
    t = torch.tensor(500.0)
    unet_call = lambda: pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample   # noqa: E731
    if s.unet_calls:
        unet_call()
        out.unet_step_s = median_time(unet_call, s.unet_calls)
        log(f"  U-Net step (CFG batch 2): {out.unet_step_s:.2f} s")
    if s.decodes:
        decode = lambda: pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample   # noqa: E731
        decode()
        out.vae_decode_s = median_time(decode, s.decodes)
        log(f"  VAE decode {s.size}²: {out.vae_decode_s:.2f} s")
    if s.images:
        # the same start as marble: its seed's noise at sqrt(1 + σ_max²) (linspace Euler would use σ_max)
        pipe.scheduler.set_timesteps(s.steps)
        sigma_max = float(pipe.scheduler.sigmas[0])
        start = torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(s.seed))
        start = start * ((1 + sigma_max ** 2) ** 0.5 / float(pipe.scheduler.init_noise_sigma))
        last = {}

        def keep(_pipe, _i, _t, tensors):
            last["latents"] = tensors["latents"]
            return tensors

        t0 = time.perf_counter()
        image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=s.steps, guidance_scale=s.cfg,
                     height=s.size, width=s.size, latents=start, callback_on_step_end=keep).images[0]
        out.image_s = time.perf_counter() - t0
        out.latent = last["latents"].float()
        out.image = np.asarray(image)
        log(f"  image ({s.steps} steps): {out.image_s:.1f} s")
    out.peak_rss_gb = rss_gb()
    return out


@dataclass
class BenchReport:
    settings: BenchSettings
    threads: int
    build_s: float
    weights_gb: float
    marble: Timing
    diffusers: Timing | None = None
    marble_bf16: Timing | None = None
    max_pixel_diff_vs_diffusers: int | None = None
    mean_pixel_diff_vs_diffusers: float | None = None
    latent_rel_diff_vs_diffusers: float | None = None   # max |a − b| / max |b| of the final latents
    saturated_fraction: float | None = None             # marble fp32 pixels at 0 or 255
    psnr_bf16_db: float | None = None
    marble_approx: Timing | None = None        # the fp32 image with settings.approximations
    marble_bf16_approx: Timing | None = None   # the bf16 image with them
    psnr_approx_db: float | None = None        # each against the exact fp32 image
    psnr_bf16_approx_db: float | None = None

    def image_ratios(self) -> dict[str, float]:
        """Each marble image's time over diffusers fp32's, in this run."""
        if not (self.diffusers and self.diffusers.image_s):
            return {}
        rows = {"fp32": self.marble, "bf16": self.marble_bf16, "fp32_approx": self.marble_approx,
                "bf16_approx": self.marble_bf16_approx}
        return {k: t.image_s / self.diffusers.image_s for k, t in rows.items() if t is not None and t.image_s}

    def ratios(self) -> dict[str, float]:
        out = {}
        if self.diffusers:
            for name in ("unet_step_s", "vae_decode_s", "image_s"):
                a, b = getattr(self.marble, name), getattr(self.diffusers, name)
                if a and b:
                    out[name] = a / b
        return out

    def to_json(self) -> str:
        def timing(t):
            return None if t is None else {k: getattr(t, k) for k in ("unet_step_s", "vae_decode_s", "image_s",
                                                                        "peak_rss_gb")}
        return json.dumps({"settings": asdict(self.settings), "threads": self.threads, "build_s": self.build_s,
                           "weights_gb": self.weights_gb, "marble": timing(self.marble),
                           "diffusers": timing(self.diffusers), "marble_bf16": timing(self.marble_bf16),
                           "marble_over_diffusers": self.ratios(),
                           "max_pixel_diff_vs_diffusers": self.max_pixel_diff_vs_diffusers,
                           "mean_pixel_diff_vs_diffusers": self.mean_pixel_diff_vs_diffusers,
                           "latent_rel_diff_vs_diffusers": self.latent_rel_diff_vs_diffusers,
                           "saturated_fraction": self.saturated_fraction,
                           "psnr_bf16_vs_fp32_db": self.psnr_bf16_db,
                           "marble_approx": timing(self.marble_approx),
                           "marble_bf16_approx": timing(self.marble_bf16_approx),
                           "psnr_approx_vs_fp32_db": self.psnr_approx_db,
                           "psnr_bf16_approx_vs_fp32_db": self.psnr_bf16_approx_db,
                           "image_over_diffusers": self.image_ratios()}, indent=2)

    def markdown(self) -> str:
        s = self.settings
        fmt = lambda v, unit: "—" if v is None else f"{v:.2f} {unit}"   # noqa: E731
        approx, approx16 = s.approximation_label(), s.approximation_label(quantized=False)
        cols = [("marble fp32", self.marble), ("diffusers fp32", self.diffusers), ("marble bf16", self.marble_bf16),
                (f"marble fp32 + {approx}", self.marble_approx), (f"marble bf16 + {approx16}", self.marble_bf16_approx)]
        cols = [(n, t) for n, t in cols if t is not None]
        lines = [f"SD1.5 architecture, random weights ({self.weights_gb:.2f} GB fp32), {s.size}×{s.size}, "
                 f"Euler {s.steps} steps, CFG {s.cfg:g}, {self.threads} threads",
                 "", "| | " + " | ".join(n for n, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for label, name, unit in [("U-Net step (batch 2)", "unet_step_s", "s"), ("VAE decode", "vae_decode_s", "s"),
                                  ("image", "image_s", "s"), ("peak RSS", "peak_rss_gb", "GB")]:
            lines.append(f"| {label} | " + " | ".join(fmt(getattr(t, name), unit) for _, t in cols) + " |")
        extra = [f"marble / diffusers: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}×" for k, v in self.ratios().items())
                 ] if self.ratios() else []
        if self.max_pixel_diff_vs_diffusers is not None:
            extra.append(f"marble vs diffusers (same weights, same start): final latents differ by "
                         f"{self.latent_rel_diff_vs_diffusers:.1e} (relative); pixels by "
                         f"{self.mean_pixel_diff_vs_diffusers:.3f}/255 on average, {self.max_pixel_diff_vs_diffusers}/255 "
                         f"at most ({100 * self.saturated_fraction:.0f}% of the random model's pixels are "
                         f"saturated, where a sign flip is a full-scale difference)")
        if self.psnr_bf16_db is not None:
            extra.append(f"bf16 image vs fp32 image: PSNR {self.psnr_bf16_db:.1f} dB")
        for name, db in ((f"fp32 + {approx}", self.psnr_approx_db), (f"bf16 + {approx16}", self.psnr_bf16_approx_db)):
            if db is not None:
                extra.append(f"{name} image vs fp32 image: PSNR {db:.1f} dB")
        if self.marble_approx is not None and self.image_ratios():
            names = {"fp32_approx": f"fp32 + {approx}", "bf16_approx": f"bf16 + {approx16}"}
            extra.append("image / diffusers fp32 image: " + ", ".join(
                f"{names.get(k, k)} {v:.2f}×" for k, v in self.image_ratios().items()))
        return "\n".join(lines + [""] + extra)


def run_bench(s: BenchSettings, log: Log = print, config: LatentDiffusionConfig | None = None) -> BenchReport:
    """The whole benchmark; `config` replaces the preset (tests use a tiny SD-shaped model)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    model = random_sd_model(config or s.preset, s.seed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    build = time.perf_counter() - t0
    log(f"built {s.preset} with random weights: {weights:.2f} GB in {build:.0f} s; {torch.get_num_threads()} threads")
    report = BenchReport(s, torch.get_num_threads(), build, weights, Timing())
    if s.diffusers:
        pipe = diffusers_pipeline(model)   # shares the tensors: build it before any layout change
        log("diffusers fp32:")
        report.diffusers = time_diffusers(pipe, model, s, log)
        del pipe   # its modules held marble's own tensors
    if s.channels_last:
        use_channels_last(model)
    log("marble fp32:")
    report.marble = time_marble(model, s, log)
    images_only = replace(s, unet_calls=0, decodes=0)
    if (s.approximations or s.quantize) and s.images:
        log(f"marble fp32 + {s.approximation_label()}:")
        # quantising rewrites a U-Net in place: a second copy of the same seeded weights
        fp32 = random_sd_model(config or s.preset, s.seed) if s.quantize else model
        report.marble_approx = time_marble(fp32, images_only, log, s.approximations, quantize=s.quantize)
        report.psnr_approx_db = psnr(report.marble.image, report.marble_approx.image)
        del fp32
    if report.diffusers is not None and report.diffusers.image is not None and report.marble.image is not None:
        diff = np.abs(report.marble.image.astype(int) - report.diffusers.image.astype(int))
        report.max_pixel_diff_vs_diffusers = int(diff.max())
        report.mean_pixel_diff_vs_diffusers = float(diff.mean())
        a, b = report.marble.latent, report.diffusers.latent
        report.latent_rel_diff_vs_diffusers = float((a - b).abs().max() / b.abs().max())
        report.saturated_fraction = float(np.isin(report.marble.image, (0, 255)).mean())
    if s.bf16:
        fp32_image = report.marble.image
        model = model.to(torch.bfloat16)
        log("marble bf16:")
        report.marble_bf16 = time_marble(model, s, log)
        if fp32_image is not None and report.marble_bf16.image is not None:
            report.psnr_bf16_db = psnr(fp32_image, report.marble_bf16.image)
        if s.approximations and s.images:
            log(f"marble bf16 + {s.approximation_label(quantized=False)}:")
            report.marble_bf16_approx = time_marble(model, images_only, log, s.approximations)
            report.psnr_bf16_approx_db = psnr(fp32_image, report.marble_bf16_approx.image)
    return report
