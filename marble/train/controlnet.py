"""`marble train controlnet`: a ControlNet for a frozen base model, trained on the shapes world with
each scene's sketch (marble/data/sketch.py: flat-coloured silhouettes on white) as control image.

As Zhang et al. 2023 train one: the ControlNet is a copy of the base U-Net's encoder and middle
block (its weights copied), its zero convolutions and the hint encoder's last convolution start
at zero, so at step 0 the controlled model is exactly the base model; the base model never
changes. The loss is the base model's own objective (its prediction: eps, v or flow), with the
residuals added to its U-Net, on (latent of the scene's image, caption states, sketch). Latents
and caption states are cached as `marble train diffusion` caches them; the sketches too.

model table:
  base          the frozen base model: `builtin` (default), a registered name or a model file
  export_dtype  float16 (default) | float32 for the shipped file
  min_snr_gamma > 0: Min-SNR-γ timestep weighting (discrete-time models), as in train diffusion
  regions       > 0: train under regions (marble.adapters.regions), the base U-Net's cross-attention
                modulated as `--regions W` modulates it at sampling, W drawn per row uniformly in
                [0, regions] (0 on dropped captions), so the ControlNet learns its residuals for the
                network it will steer with regions on as well as off. 0 (default): never
data: the shapes world only (data.world = "shapes"): the sketches come from its scenes' truth.
data.caption_dropout also trains the control alone (the paper replaces half the captions by "").

Output: run_dir/controlnet.safetensors, marble's ControlNet format (config in the metadata, read
by marble.checkpoints.controlnet_files) with the EMA weights, and in the metadata the base model
it pairs with (name and file hash) and the training steps; written once, never over a file.
Every sample_every steps: a grid in run_dir/samples/ (a row of sketches of held-out scenes, then
one row per seed) and the EMA weights as run_dir/snapshots/step-NNNNNN.safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from marble.adapters.regions import DECAY, MAX_STRENGTH, Region, phrase_regions, region_attention, row_modulation, \
    time_law, transformer_blocks
from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
from marble.checkpoints.resolve import LoadedModel, load_model
from marble.models.controlnet import ControlNet, controlnet_config
from marble.models.unet import UNetConfig
from marble.train.config import ConfigError, TrainConfig
from marble.train.data import _cached, batch_indices, digest, load_captioned
from marble.train.diffusion import cached_training_set
from marble.train.distributed import World
from marble.train.loop import TrainLoop
from marble.train.objective import diffusion_loss, flow_loss, logit_normal_t

MODEL_KEYS = {"base", "export_dtype", "min_snr_gamma", "regions"}
OUTPUT = "controlnet.safetensors"
SAMPLE_SCENES = 6     # held-out scenes in the sample grid


def check_model_table(m: dict) -> None:
    unknown = set(m) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in model: {', '.join(sorted(unknown))} "
                          f"(a ControlNet run takes {', '.join(sorted(MODEL_KEYS))})")
    if not isinstance(m.get("base", "builtin"), str) or not m.get("base", "builtin"):
        raise ConfigError("model.base must name the base model: builtin, a registered name or a model path")
    if m.get("export_dtype", "float16") not in ("float16", "float32"):
        raise ConfigError(f"model.export_dtype must be float16 or float32, not {m['export_dtype']!r}")
    gamma = m.get("min_snr_gamma", 0.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ConfigError(f"model.min_snr_gamma must be a number >= 0, not {gamma!r}")
    regions = m.get("regions", 0.0)
    if isinstance(regions, bool) or not isinstance(regions, (int, float)) or not 0 <= regions <= MAX_STRENGTH:
        raise ConfigError(f"model.regions must be a number in [0, {MAX_STRENGTH:g}], not {regions!r}")


def initial_controlnet(model, seed: int) -> ControlNet:
    """The ControlNet for `model`'s U-Net: the encoder and middle block copied from it, the hint
    encoder's convolutions random (seeded) except its last, which is zero like every zero conv."""
    torch.manual_seed(seed)
    net = ControlNet(controlnet_config(model.config.unet, model.latent_factor, model.latent_channels))
    own = net.state_dict()
    copied = {k: v for k, v in model.unet.state_dict().items() if k in own}
    missing, _ = net.load_state_dict(copied, strict=False)
    if any(not k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in missing):
        raise ConfigError("the base U-Net's encoder does not match its ControlNet copy")   # never for marble's U-Nets
    return net.to(model.device)


def sketch_cache(path: Path, key: str, data) -> torch.Tensor:
    """(N, size, size) uint8 palette indices of each training scene's sketch (marble.data.sketch)."""
    from marble.data.shapes import kind_probabilities, sample_scene
    from marble.data.sketch import sketch_indices

    def compute():
        kinds = kind_probabilities(data.kinds)
        out = np.empty((data.n, data.size, data.size), np.uint8)
        for i in range(data.n):
            out[i] = sketch_indices(sample_scene(data.split, data.seed, i, data.size, kinds)[0], data.size)
        return {"sketches": torch.from_numpy(out)}
    return _cached(path, key, compute)["sketches"]


def hints(indices: torch.Tensor) -> torch.Tensor:
    """Palette indices (B, H, W) -> sketch images (B, 3, H, W) in [0, 1], as hint_tensor reads an RGB image."""
    from marble.data.sketch import PALETTE
    rgb = torch.from_numpy(PALETTE)[indices.long()]
    return rgb.permute(0, 3, 1, 2).float() / 255.0


def index_masks(indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """{colour name: (H, W) float mask} of a cached sketch's palette indices: what color_masks reads
    from the sketch image."""
    from marble.data.sketch import COLOR_INDEX
    return {name: mask for name, k in COLOR_INDEX.items() if (mask := (indices == k).float()).any()}


def with_regions(network, blocks, rows: list[list[Region]], latent: tuple[int, int], scale: torch.Tensor):
    """network(x, t, context) with each row's regions on the cross-attention of `blocks`, at λ = scale."""
    modulate = row_modulation(rows, latent)

    def call(x, t, context):
        with region_attention(blocks, lambda scores: modulate(scores, scale)):
            return network(x, t, context)
    return call


def controlled(unet, controlnet, hint: torch.Tensor):
    """network(x, t, context) of the frozen U-Net with the ControlNet's residuals for `hint`."""
    def network(x, t, context):
        return unet(x, t, context, control=controlnet(x, t, context, hint))
    return network


def load_base(cfg: TrainConfig) -> LoadedModel:
    check_model_table(cfg.model)
    loaded = load_model(cfg.model.get("base", "builtin"))
    if not isinstance(loaded.model.config.unet, UNetConfig) or loaded.model.config.unet.adm_in_channels:
        raise ConfigError(f"a ControlNet is trained here for a U-Net without vector conditioning; {loaded.name}'s "
                          f"denoiser is a {type(loaded.model.unet).__name__}")
    if loaded.model.config.unet.in_channels != loaded.model.latent_channels:
        raise ConfigError(f"{loaded.name} is an inpainting model; train the ControlNet for its base model")
    return loaded


def controlnet_metadata(cfg: TrainConfig, loaded: LoadedModel, step: int) -> dict[str, str]:
    """What the file says beyond its config: the base model it pairs with and how it was trained."""
    return {"base_model": loaded.name, "base_model_hash": loaded.hash, "control": "sketch",
            "training": json.dumps({"steps": step, "batch": cfg.batch, "seed": cfg.seed, "lr": cfg.optim.lr,
                                    **({"regions": cfg.model["regions"]} if cfg.model.get("regions") else {}),
                                    "data": {"world": cfg.data.world, "split": cfg.data.split, "n": cfg.data.n,
                                             "size": cfg.data.size}}, sort_keys=True)}


def write_file(loop: TrainLoop, net: ControlNet, path: Path, dtype: torch.dtype | None, meta: dict) -> Path | None:
    """The EMA weights at `path` in marble's ControlNet format (None when the file exists: never replaced)."""
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with loop.ema_weights(net):   # written inside: without a dtype the state shares the weights
            state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in net.state_dict().items()}
            return write_controlnet(ControlNetFile(net.config, state, path, "", "marble"), path, "marble", meta)
    except FileExistsError:
        return None


def train_controlnet(cfg: TrainConfig, world: World, resume: bool = False) -> Path:
    if world.size > 1:
        raise ConfigError("marble train controlnet runs in one process; start it without torchrun")
    run_dir = Path(cfg.run_dir)
    out = run_dir / OUTPUT
    if out.exists() and not resume:
        raise ConfigError(f"{out} already exists; marble never overwrites a file (choose another run_dir)")
    if cfg.data.folder is not None or cfg.data.world != "shapes":
        raise ConfigError("a sketch ControlNet trains on the shapes world (data.world = \"shapes\", no data.folder): "
                          "its sketches are drawn from the scenes' truth")
    loaded = load_base(cfg)
    model = loaded.model.to(world.device).eval().requires_grad_(False)
    if cfg.data.size % model.latent_factor:
        raise ConfigError(f"data.size must be a multiple of {loaded.name}'s latent factor {model.latent_factor}, "
                          f"not {cfg.data.size}")
    net = initial_controlnet(model, cfg.seed).train()

    latents, states, rows = cached_training_set(cfg, world, model.vae, model.text_encoder, model.config.text)
    sketches = sketch_cache(run_dir / "cache" / "sketches.safetensors", digest(cfg.data.__dict__, "sketch-v1"), cfg.data)
    loop = TrainLoop(cfg, net, world, run_dir)
    if resume:
        loop.resume()
    flow = model.config.prediction == "flow"
    gamma = float(cfg.model.get("min_snr_gamma", 0.0))
    if flow and gamma > 0:
        raise ConfigError("min_snr_gamma weights discrete VP timesteps; a flow model samples its time logit-normal")
    T = model.schedule.num_timesteps
    dev = world.device
    regions = float(cfg.model.get("regions", 0.0))
    if regions and flow:
        raise ConfigError("model.regions scales λ by the discrete timestep; train it for an eps or v model")
    if regions:
        captions, text, blocks = load_captioned(cfg.data).captions, model.text_encoder, transformer_blocks([model.unet])

    def step_loss(controlnet, step, gen):
        # the same draws, in the same order, as train diffusion's step
        idx = torch.tensor(batch_indices(len(latents), cfg.batch, step, cfg.seed))
        t = logit_normal_t(torch.randn(cfg.batch, generator=gen)) if flow else torch.randint(0, T, (cfg.batch,), generator=gen)
        eps = torch.randn((cfg.batch, *latents.shape[1:]), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.data.caption_dropout
        context = states[torch.where(drop, torch.zeros_like(rows[idx]), rows[idx])].to(dev)
        network = controlled(model.unet, controlnet, hints(sketches[idx]).to(dev))
        if regions:   # drawn after the diffusion draws, so a run without regions draws as before
            strength = torch.rand(cfg.batch, generator=gen) * regions * ~drop
            rows_regions = [[] if d else phrase_regions(index_masks(sketches[i]), captions[i], text.count_tokens,
                                                        text.max_tokens) for i, d in zip(idx.tolist(), drop)]
            scale = time_law(t.float(), T - 1, strength, DECAY).to(dev)    # λ_t as sampling's
            network = with_regions(network, blocks, rows_regions, tuple(latents.shape[-2:]), scale)
        if flow:
            return flow_loss(network, latents[idx].to(dev), context, t.to(dev), eps.to(dev)), {}
        return diffusion_loss(network, model.schedule, model.config.prediction, latents[idx].to(dev), context,
                              t.to(dev), eps.to(dev), gamma), {}

    dtype = torch.float16 if cfg.model.get("export_dtype", "float16") == "float16" else None

    def on_sample(step: int) -> None:
        snapshot = run_dir / "snapshots" / f"step-{step:06d}.safetensors"
        write_file(loop, net, snapshot, dtype, controlnet_metadata(cfg, loaded, step))
        write_samples(loaded, snapshot, cfg.data.size, run_dir / "samples" / f"step-{step:06d}.png")

    loop.fit(step_loss, on_sample)
    write_file(loop, net, out, dtype, controlnet_metadata(cfg, loaded, loop.step))
    write_samples(loaded, out, cfg.data.size, run_dir / "samples" / "final.png")
    return out


def sample_scenes(n: int = SAMPLE_SCENES, size: int = 64):
    """Held-out scenes (never in training) and their captions, the same every run."""
    from marble.data.shapes import sample_scene
    return [sample_scene("heldout", 0, i, size) for i in range(n)]


@torch.inference_mode()
def write_samples(loaded: LoadedModel, controlnet_path: Path, size: int, path: Path) -> None:
    """A grid: the sketches of held-out scenes in the first row, then the controlled model's images
    with their captions, one row per seed (0, 1)."""
    from PIL import Image

    from marble.adapters.controlnet import ControlSpec
    from marble.data.sketch import sketch
    from marble.fileio import write_replace
    from marble.pipeline import Pipeline

    pipe = Pipeline(loaded)
    scenes = sample_scenes(size=size)
    controls = [sketch(scene, size) for scene, _ in scenes]
    images = list(controls)
    for seed in (0, 1):
        for control, (_, caption) in zip(controls, scenes):
            spec = ControlSpec(image=control, model=str(controlnet_path), is_path=True, resize="Just Resize")
            images.append(pipe.generate_image(caption, seed=seed, width=size, height=size, controls=(spec,)))
    cols = len(scenes)
    grid = Image.new("RGB", (size * cols, size * 3))
    for i, im in enumerate(images):
        grid.paste(im.resize((size, size)), ((i % cols) * size, (i // cols) * size))
    write_replace(path, lambda f: grid.save(f, format="PNG"))
