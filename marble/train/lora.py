"""`marble train lora`: a LoRA on top of a frozen model, from a captioned image folder.

model table:
  init      the base model: `builtin`, a registered name (`tiny-random`) or any file/folder marble
            loads (marble, SD single file, diffusers folder). Its weights are never written.
[lora] table (marble/train/config.py LoraConfig): rank, alpha, targets (attention | conv | text),
  name, min_snr_gamma, snapshot_every, sample_prompts.

The LoRA layers (lora.attach_trainable: down Kaiming-uniform, up zero, so step 0 is the base model)
are the only parameters: the optimizer, the EMA and the checkpoint hold them and nothing else, and
`--resume` continues exactly, as in `marble train diffusion` (the same TrainLoop). VAE latents are
cached once; text-encoder states too unless `text` is a target (then the encoder runs every step,
with its LoRA). Output: run_dir/NAME.safetensors, a kohya-format file of the EMA weights with kohya's
`ss_*` metadata, written atomically and never over an existing file; with snapshot_every, also
run_dir/snapshots/step-NNNNNN.safetensors along the way (for the overfitting curve).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from marble.adapters.lora import TrainableLora, attach_trainable
from marble.adapters.lora_files import save_kohya
from marble.adapters.lora_table import module_table
from marble.checkpoints.resolve import LoadedModel, load_model
from marble.models.unet import UNetConfig
from marble.train.config import ConfigError, TrainConfig
from marble.train.data import batch_indices, digest, latent_cache, load_captioned, text_cache
from marble.train.distributed import World
from marble.train.loop import TrainLoop
from marble.train.objective import diffusion_loss

MODEL_KEYS = {"init"}


def load_base(cfg: TrainConfig) -> LoadedModel:
    """The frozen base model the config names (ModelLoadError when it cannot be loaded)."""
    unknown = set(cfg.model) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in model: {', '.join(sorted(unknown))} (a LoRA run takes model.init only)")
    init = cfg.model.get("init")
    if not isinstance(init, str) or not init:
        raise ConfigError("model.init must name the base model: builtin, a registered name or a model path")
    return load_model(init)


def output_path(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) / f"{cfg.lora.name or 'lora'}.safetensors"


def base_model_version(loaded: LoadedModel) -> str:
    """kohya's ss_base_model_version for SD models (by the text context width), else marble's name."""
    from marble.models.clip import CLIPTextEncoder
    text = loaded.model.text_encoder
    if isinstance(text, CLIPTextEncoder) and text.dim in (768, 1024):
        return "sd_v1" if text.dim == 768 else "sd_v2"
    return f"marble:{loaded.name}"


def kohya_metadata(cfg: TrainConfig, loaded: LoadedModel, n_images: int, step: int) -> dict[str, str]:
    """The `ss_*` fields kohya's sd-scripts writes that apply here (dim and alpha come from the layers)."""
    lr = cfg.optim.lr
    targets = cfg.lora.targets
    args = {"conv_dim": str(cfg.lora.rank), "conv_alpha": str(cfg.lora.alpha or cfg.lora.rank)} if "conv" in targets else {}
    return {
        "ss_base_model_version": base_model_version(loaded), "ss_v2": str(base_model_version(loaded) == "sd_v2"),
        "ss_sd_model_name": loaded.name, "ss_sd_model_hash": loaded.hash, "ss_new_sd_model_hash": loaded.hash,
        "ss_steps": str(step), "ss_max_train_steps": str(cfg.steps), "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr), "ss_text_encoder_lr": str(lr if "text" in targets else 0),
        "ss_network_train_unet_only": str("text" not in targets), "ss_network_args": json.dumps(args) if args else "",
        "ss_resolution": f"({cfg.data.size}, {cfg.data.size})", "ss_num_train_images": str(n_images),
        "ss_batch_size_per_device": str(cfg.batch), "ss_seed": str(cfg.seed), "ss_lr_scheduler": "cosine_with_warmup",
        "ss_lr_warmup_steps": str(cfg.optim.warmup), "ss_min_snr_gamma": str(cfg.lora.min_snr_gamma),
        "ss_caption_dropout_rate": str(cfg.data.caption_dropout), "ss_training_comment": "marble train lora",
        "ss_lora_targets": ",".join(targets),
    }


def write_lora(loop: TrainLoop, trainable: TrainableLora, table, path: Path, meta: dict[str, str]) -> Path | None:
    """The EMA weights as a kohya file at `path` (None if it already exists: never overwritten)."""
    if path.exists():
        return None
    try:
        with loop.ema_weights(trainable):
            path.parent.mkdir(parents=True, exist_ok=True)
            return save_kohya(path, trainable.to_lora(path.stem), table, meta)
    except FileExistsError:
        return None


def train_lora(cfg: TrainConfig, world: World, resume: bool = False) -> Path:
    if world.size > 1:
        raise ConfigError("marble train lora runs in one process; start it without torchrun")
    run_dir = Path(cfg.run_dir)
    out = output_path(cfg)
    if out.exists() and not resume:
        raise ConfigError(f"{out} already exists; marble never overwrites a file (choose another run_dir or lora.name)")
    if cfg.data.folder is None:
        raise ConfigError("a LoRA trains on an image folder: set data.folder (a folder with metadata.jsonl)")
    loaded = load_base(cfg)
    if loaded.model.config.prediction == "flow" or not isinstance(loaded.model.config.unet, UNetConfig):
        raise ConfigError(f"LoRA training needs a U-Net model trained on discrete timesteps; {loaded.name} is "
                          f"a {type(loaded.model.unet).__name__} with prediction {loaded.model.config.prediction!r}")
    model = loaded.model.to(world.device).eval().requires_grad_(False)
    table = module_table(model)
    trainable = attach_trainable(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, table,
                                 torch.Generator(device=world.device).manual_seed(cfg.seed))
    train_text = "text" in cfg.lora.targets

    data = load_captioned(cfg.data)
    n_images, captions = len(data), list(data.captions)
    cache = run_dir / "cache"
    data_key = digest(cfg.data.__dict__)
    # the LoRA is attached, but its up weights are zero: the encoders compute the base model here
    vae_key = digest(data_key, loaded.hash, [float(v.double().sum()) for v in model.vae.state_dict().values()])
    latents = latent_cache(cache / "latents.safetensors", vae_key, model.vae, data)
    del data
    if not train_text:
        text = model.text_encoder
        text_key = digest(data_key, loaded.hash, [float(v.double().sum()) for v in text.state_dict().values()])
        states, rows = text_cache(cache / "text.safetensors", text_key, text, captions)
        rows = torch.tensor(rows)

    loop = TrainLoop(cfg, trainable, world, run_dir)
    if resume:
        loop.resume()
    T = model.schedule.num_timesteps
    dev = world.device

    def step_loss(net, step, gen):
        idx = torch.tensor(batch_indices(len(latents), cfg.batch, step, cfg.seed))
        t = torch.randint(0, T, (cfg.batch,), generator=gen)
        eps = torch.randn((cfg.batch, *latents.shape[1:]), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.data.caption_dropout
        if train_text:   # the text encoder's LoRA layers learn too: encode with gradients
            context = model.text_encoder.encode(["" if d else captions[i] for i, d in zip(idx.tolist(), drop)])
        else:
            context = states[torch.where(drop, torch.zeros_like(rows[idx]), rows[idx])]
        loss = diffusion_loss(model.unet, model.schedule, model.config.prediction, latents[idx].to(dev),
                              context.to(dev), t.to(dev), eps.to(dev), cfg.lora.min_snr_gamma)
        return loss, {}

    prompts = cfg.lora.sample_prompts or list(dict.fromkeys(c for c in captions if c))[:6]

    def on_sample(step: int) -> None:
        write_samples(loop, trainable, loaded, prompts, run_dir / "samples" / f"step-{step:06d}.png")

    def on_step(step: int) -> None:
        if cfg.lora.snapshot_every and step % cfg.lora.snapshot_every == 0:
            write_lora(loop, trainable, table, run_dir / "snapshots" / f"step-{step:06d}.safetensors",
                       kohya_metadata(cfg, loaded, n_images, step))

    loop.fit(step_loss, on_sample, on_step)
    write_lora(loop, trainable, table, out, kohya_metadata(cfg, loaded, n_images, loop.step))
    write_samples(loop, trainable, loaded, prompts, run_dir / "samples" / "final.png")
    trainable.detach()
    return out


@torch.inference_mode()
def write_samples(loop: TrainLoop, trainable: TrainableLora, loaded: LoadedModel, prompts: list[str], path: Path) -> None:
    """A grid from the EMA LoRA: one row per seed (0, 1), one column per prompt."""
    from PIL import Image

    from marble.fileio import write_replace
    from marble.pipeline import Pipeline

    with loop.ema_weights(trainable):
        pipe = Pipeline(loaded)
        images = [pipe.generate_image(p, seed=s) for s in (0, 1) for p in prompts]
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(prompts), h * 2))
    for i, im in enumerate(images):
        grid.paste(im, ((i % len(prompts)) * w, (i // len(prompts)) * h))
    write_replace(path, lambda f: grid.save(f, format="PNG"))
