"""`marble train diffusion`: noise-prediction training of the U-Net on cached VAE latents and
cached frozen text-encoder states.

model table:
  name            the model's name in PNG records
  init            a marble model file to start from (fine-tuning, e.g. models/builtin.safetensors):
                  its U-Net weights, and its VAE, text encoder, U-Net shape, prediction, schedule
                  and defaults wherever this table does not name them
  unet            the denoising network: a U-Net preset name, or a table of UNetConfig fields (with
                  optional `preset`; coord_channels / attention_position add explicit 2-D position),
                  or a table with kind = "mmdit" and MMDiTConfig fields (marble/models/mmdit.py);
                  with `init` it must equal the init's
  vae             path to a VAE file from `marble train vae`, or a table {preset = NAME} for a
                  seeded random VAE (tests); with `init` it must equal the init's
  text            the text encoder config, e.g. {pretrained = "all-MiniLM-L6-v2"} or {preset = "clip-tiny"}
  prediction      eps | v | flow (rectified flow, logit-normal t; needs schedule {name = "flow"})
  schedule        {name = "scaled_linear", beta_start = ..., beta_end = ..., zero_terminal_snr = false};
                  zero_terminal_snr rescales it so the last timestep is pure noise (Lin et al. 2024);
                  {name = "flow", shift = 1.0} for prediction = "flow"
  export_dtype    float16 | float32 for the shipped file
  min_snr_gamma   > 0: Min-SNR-γ timestep weighting (Hang et al. 2023); 0 = the plain simple loss
  grounding       {token_weight, pixel_weight, levels}: TokenCompose's losses on the cross-attention
                  maps from the shapes world's object masks (marble/train/grounding.py); absent = off
  snapshot_every  > 0: also write the EMA model every this many steps to
                  run_dir/snapshots/step-NNNNNN.safetensors (for learning curves: `marble eval` on each)
  default_steps / default_cfg / default_sampler / default_width / default_height / max_pixels
Output: run_dir/model.safetensors (marble format, EMA weights), samples in run_dir/samples/.
"""
from __future__ import annotations

from pathlib import Path

import torch

from marble.checkpoints.checkpoint import from_model, to_model
from marble.checkpoints.marble_format import read_marble, read_vae, write_marble
from marble.config import config_from_dict, config_to_dict
from marble.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from marble.models.mmdit import MMDIT_PRESETS, MMDiTConfig
from marble.models.text import build_text_encoder
from marble.models.unet import UNET_PRESETS, UNetConfig
from marble.models.vae import AutoencoderKL
from marble.train.config import ConfigError, TrainConfig
from marble.train.data import batch_indices, digest, latent_cache, load_captioned, text_cache
from marble.train.distributed import World, barrier, shard
from marble.train.grounding import grounding_closure, grounding_config
from marble.train.loop import TrainLoop
from marble.train.objective import diffusion_loss, flow_loss, logit_normal_t
from marble.train.vae import vae_config

# the model's settings that are not networks: from the table, else the init's, else the defaults
SETTINGS = ("name", "prediction", "schedule", "default_steps", "default_cfg", "default_sampler", "default_width",
            "default_height", "max_pixels")
MODEL_KEYS = {"init", "unet", "vae", "text", "export_dtype", "min_snr_gamma", "snapshot_every", "grounding", *SETTINGS}


def unet_config(spec, context_dim: int) -> UNetConfig | MMDiTConfig:
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
    if spec.get("kind") == "mmdit":
        preset = spec.pop("preset", None)
        if preset is not None and preset not in MMDIT_PRESETS:
            raise ConfigError(f"unknown MMDiT preset {preset!r}; choose from {', '.join(MMDIT_PRESETS)}")
        base = config_to_dict(MMDIT_PRESETS[preset]) if preset else {}
        return config_from_dict(MMDiTConfig, {**base, "context_dim": context_dim, **spec}, "model.unet")
    preset = spec.pop("preset", None)
    if preset is not None and preset not in UNET_PRESETS:
        raise ConfigError(f"unknown U-Net preset {preset!r}; choose from {', '.join(UNET_PRESETS)}")
    base = config_to_dict(UNET_PRESETS[preset]) if preset else {}
    return config_from_dict(UNetConfig, {**base, "context_dim": context_dim, **spec}, "model.unet")


def build_vae(spec) -> AutoencoderKL:
    if isinstance(spec, str):
        return read_vae(Path(spec))
    torch.manual_seed(int(spec.get("seed", 0)))
    return AutoencoderKL(vae_config({k: v for k, v in spec.items() if k != "seed"}))


def check_keys(m: dict, has_init: bool) -> None:
    unknown = set(m) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in model: {', '.join(sorted(unknown))}")
    for key in ("unet", "vae", "text"):
        if key not in m and not has_init:
            raise ConfigError(f"model.{key} is required (or model.init, a model to start from)")


def model_config(m: dict, size: int, vae: AutoencoderKL, text_dim: int) -> LatentDiffusionConfig:
    """The model config from the (completed) model table; `size` is the training resolution."""
    extra = {k: m[k] for k in SETTINGS if k in m}
    return LatentDiffusionConfig(unet=unet_config(m["unet"], text_dim), vae=vae.config, text=dict(m["text"]),
                                 **{"name": "marble", "default_width": size, "default_height": size, **extra})


def load_init(path) -> LatentDiffusion:
    if not isinstance(path, str):
        raise ConfigError(f"model.init must be the path of a marble model file, got {path!r}")
    return to_model(read_marble(Path(path)))


def with_init(m: dict, init: LatentDiffusion) -> dict:
    """The model table completed from the init wherever it names nothing: the init's U-Net shape,
    text encoder and settings (its VAE and weights are taken as modules)."""
    own = {k: getattr(init.config, k) for k in SETTINGS}
    return {"unet": config_to_dict(init.config.unet), "text": dict(init.config.text), **own, **m}


def check_matches_init(config: LatentDiffusionConfig, init: LatentDiffusion) -> None:
    """Fine-tuning keeps the networks the init's weights were trained for."""
    for part in ("unet", "vae", "text"):
        if getattr(config, part) != getattr(init.config, part):
            raise ConfigError(f"model.{part} differs from model.init's; leave it out to use the init's")


def cached_training_set(cfg: TrainConfig, world: World, vae, text, text_config: dict
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w), text states (U, T, D), row of each image's caption in the states; row 0
    is ""), cached in run_dir/cache under a key of the data table and the encoders' weights. Rank 0
    computes and writes, the others read after the barrier."""
    data = load_captioned(cfg.data)
    cache = Path(cfg.run_dir) / "cache"
    data_key = digest(cfg.data.__dict__)
    vae_key = digest(data_key, [float(v.double().sum()) for v in vae.state_dict().values()])
    text_key = digest(data_key, text_config, [float(v.double().sum()) for v in text.state_dict().values()])
    if world.is_main:
        latent_cache(cache / "latents.safetensors", vae_key, vae, data)
        text_cache(cache / "text.safetensors", text_key, text, data.captions)
    barrier(world)
    latents = latent_cache(cache / "latents.safetensors", vae_key, vae, data)
    states, rows = text_cache(cache / "text.safetensors", text_key, text, data.captions)
    return latents, states, torch.tensor(rows)


def train_diffusion(cfg: TrainConfig, world: World, resume: bool = False) -> Path:
    run_dir = Path(cfg.run_dir)
    init = load_init(cfg.model["init"]) if "init" in cfg.model else None
    check_keys(cfg.model, init is not None)
    m = cfg.model if init is None else with_init(cfg.model, init)
    vae = (build_vae(m["vae"]) if "vae" in m else init.vae).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    # the init's own text encoder: already loaded, and its U-Net was trained on its states
    text = (init.text_encoder if init is not None else build_text_encoder(dict(m["text"])))
    text = text.eval().requires_grad_(False)
    config = model_config(m, cfg.data.size, vae, text.dim)
    model = LatentDiffusion(config, text_encoder=text)
    model.vae.load_state_dict(vae.state_dict())
    if init is not None:
        check_matches_init(config, init)
        model.unet.load_state_dict(init.unet.state_dict())
        del init
    model.requires_grad_(False)
    model.unet.requires_grad_(True)

    grounding = grounding_config(cfg.model.get("grounding", {}))
    latents, states, rows = cached_training_set(cfg, world, model.vae, text, config.text)
    ground = grounding_closure(grounding, cfg, world, model.unet, text, config.text, latents.shape[-1])
    loop = TrainLoop(cfg, model.unet, world, run_dir)
    if resume:
        loop.resume()
    T = model.schedule.num_timesteps
    flow = config.prediction == "flow"
    if flow and float(cfg.model.get("min_snr_gamma", 0.0)) > 0:
        raise ConfigError("min_snr_gamma weights discrete VP timesteps; rectified flow (prediction = \"flow\") "
                          "samples its time logit-normal instead")

    def step_loss(net, step, gen):
        # Draw for the whole global batch, then take this rank's slice: every world size sees
        # the same numbers, so DDP training equals single-process training on the global batch.
        idx = torch.tensor(batch_indices(len(latents), cfg.batch, step, cfg.seed))
        t = logit_normal_t(torch.randn(cfg.batch, generator=gen)) if flow else torch.randint(0, T, (cfg.batch,), generator=gen)
        eps = torch.randn((cfg.batch, *latents.shape[1:]), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.data.caption_dropout
        context_rows = torch.where(drop, torch.zeros_like(rows[idx]), rows[idx])
        mine = slice(world.rank * (cfg.batch // world.size), (world.rank + 1) * (cfg.batch // world.size))
        dev = world.device

        def denoising():
            if flow:
                return flow_loss(net, latents[idx[mine]].to(dev), states[context_rows[mine]].to(dev), t[mine].to(dev),
                                 eps[mine].to(dev))
            return diffusion_loss(net, model.schedule, config.prediction, latents[idx[mine]].to(dev),
                                  states[context_rows[mine]].to(dev), t[mine].to(dev), eps[mine].to(dev),
                                  float(cfg.model.get("min_snr_gamma", 0.0)))
        if ground is None:
            return denoising(), {}
        return ground(denoising, idx[mine], drop[mine])

    def on_sample(step: int) -> None:
        write_samples(loop, model, run_dir / "samples" / f"step-{step:06d}.png")

    dtype = torch.float16 if cfg.model.get("export_dtype", "float32") == "float16" else None
    snapshot_every = cfg.model.get("snapshot_every", 0)
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 0:
        raise ConfigError(f"model.snapshot_every must be an integer >= 0, got {snapshot_every!r}")

    def on_step(step: int) -> None:
        if snapshot_every and step % snapshot_every == 0:
            write_snapshot(loop, model, run_dir / "snapshots" / f"step-{step:06d}.safetensors", dtype)

    loop.fit(step_loss, on_sample, on_step)
    out = run_dir / "model.safetensors"
    if world.is_main:
        loop.ema.copy_to(model.unet)
        if not out.exists():
            write_marble(from_model(model, dtype=dtype), out)
        write_samples(loop, model, run_dir / "samples" / "final.png", ema_loaded=True)
    barrier(world)
    return out


def write_snapshot(loop: TrainLoop, model: LatentDiffusion, path: Path, dtype: torch.dtype | None) -> None:
    """The EMA weights as a model file, the training weights put back exactly after. A snapshot
    that exists (a resumed run passing the step again) is kept."""
    if path.exists():
        return
    with loop.ema_weights(model.unet):
        write_marble(from_model(model, dtype=dtype), path)


SAMPLE_PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle",
                  "three purple stars", "a large orange square", "a white circle above a red triangle"]


@torch.inference_mode()
def write_samples(loop: TrainLoop, model: LatentDiffusion, path: Path, ema_loaded: bool = False) -> None:
    """A grid of samples from the EMA weights, one row per seed, one column per prompt."""
    from PIL import Image

    from marble.checkpoints.resolve import LoadedModel
    from marble.fileio import write_replace
    from marble.pipeline import Pipeline

    saved = None
    if not ema_loaded:
        saved = {k: v.clone() for k, v in model.unet.state_dict().items()}
        loop.ema.copy_to(model.unet)
    model.eval()
    pipe = Pipeline(LoadedModel(model, model.config.name, "training"))
    images = [pipe.generate_image(p, seed=s) for s in (0, 1) for p in SAMPLE_PROMPTS]
    if saved is not None:
        model.unet.load_state_dict(saved)
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(SAMPLE_PROMPTS), h * 2))
    for i, im in enumerate(images):
        grid.paste(im, ((i % len(SAMPLE_PROMPTS)) * w, (i // len(SAMPLE_PROMPTS)) * h))
    write_replace(path, lambda f: grid.save(f, format="PNG"))
