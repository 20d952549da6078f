"""`marble train lcm`: a few-step student by latent consistency distillation (Luo et al. 2023) of a
shipped teacher, on the data of `marble train diffusion` (marble/train/consistency.py has the math).

The student is the teacher's whole U-Net, initialised from it and trained in full; the output is a
plain marble model file (the teacher's VAE and text encoder, the student's U-Net) whose settings
say LCM sampler, 4 steps, CFG 1, so it needs nothing new to load, generate or evaluate.

model table:
  init          the teacher: `builtin`, a registered name or a model file marble loads
  name          the student's name in PNG records (default: the teacher's name + "-lcm")
  guidance      the CFG scale of the teacher's ODE, folded into the student (default: the teacher's
                default_cfg). One fixed scale, no w-embedding: the U-Net keeps the teacher's shape
  solver_steps  the teacher's DDIM grid, a divisor of T: skipping step k = T / solver_steps (default 50)
  huber_c       the pseudo-Huber constant c (default 0.001, as LCM-SD; 0 = L1)
  phases        PCM's phases (Wang et al. 2024; default 1 = plain LCD): the student learns each phase's
                map to its lower edge, the LCM spacing's timesteps at `phases` steps, and samples
                deterministically edge to edge (default sampler Euler; needs solver_steps = 50)
  export_dtype  float16 (default) | float32 for the shipped file
  default_steps / default_sampler / default_cfg   written into the student (default 4 / LCM / 1), also
                as its few-step card (`few_step`: 1-4 steps, or phases/2 to 2·phases, CFG 1, the `lcm` spacing of its grid)
  grounding     {token_weight, pixel_weight, levels}: TokenCompose's losses on the student's
                cross-attention maps, as in `marble train diffusion` (marble/train/grounding.py); absent = off.
                Only the student's forward is recorded: the teacher's step and the EMA target run first
  student       a smaller student cut from the teacher (BK-SDM block removal, marble/train/block_removal.py):
                {decoder_blocks, middle_block, attention_levels}; absent = the teacher's whole U-Net
  heal_steps    the first N steps train the cut student on the teacher's own prediction (BK-SDM's output
                distillation: MSE between the networks' outputs at uniform t, captions dropped as in
                training) before consistency distillation starts (default 0)
  heal_lr       the heal's peak learning rate (default optim.lr); each stage has its own warm-up and cosine
ema_decay is μ of the target network f_θ⁻ (LCM: 0.95); the shipped weights are that EMA.
Output: run_dir/model.safetensors; every sample_every steps a grid in run_dir/samples/ and the EMA
student as run_dir/snapshots/step-NNNNNN.safetensors (to evaluate a run while it continues).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch.func import functional_call

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.marble_format import write_marble
from marble.checkpoints.resolve import load_model
from marble.diffusion.denoiser import add_noise_vp, discrete_denoiser
from marble.diffusion.few_step import FewStepSettings
from marble.diffusion.guidance import guided_denoiser
from marble.train.block_removal import pruned_model
from marble.train.config import ConfigError, TrainConfig
from marble.train.consistency import edge_sigmas, huber, lcd_target, phase_edges, phased, skipping_grid
from marble.train.data import batch_indices
from marble.train.diffusion import cached_training_set, write_samples
from marble.train.distributed import World
from marble.train.grounding import grounding_closure, grounding_config
from marble.train.loop import TrainLoop, lr_factor

STUDENT_DEFAULTS = {"default_steps": 4, "default_sampler": "LCM", "default_cfg": 1.0}
MODEL_KEYS = {"init", "name", "guidance", "solver_steps", "huber_c", "phases", "export_dtype", "grounding",
              "student", "heal_steps", "heal_lr", *STUDENT_DEFAULTS}


def check_model_table(m: dict) -> None:
    unknown = set(m) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in model: {', '.join(sorted(unknown))} (an LCM run takes {', '.join(sorted(MODEL_KEYS))})")
    if not isinstance(m.get("init"), str) or not m["init"]:
        raise ConfigError("model.init must name the teacher: builtin, a registered name or a model path")
    for key in ("guidance", "huber_c"):
        if key in m and not (isinstance(m[key], (int, float)) and not isinstance(m[key], bool) and m[key] >= 0):
            raise ConfigError(f"model.{key} must be a number >= 0, not {m[key]!r}")
    phases = m.get("phases", 1)
    if isinstance(phases, bool) or not isinstance(phases, int) or phases < 1:
        raise ConfigError(f"model.phases must be an integer >= 1, not {phases!r}")
    if phases > 1 and m.get("solver_steps", 50) != 50:
        raise ConfigError("model.phases > 1 needs solver_steps = 50: its edges are the LCM spacing's timesteps")
    heal = m.get("heal_steps", 0)
    if isinstance(heal, bool) or not isinstance(heal, int) or heal < 0:
        raise ConfigError(f"model.heal_steps must be an integer >= 0, not {heal!r}")
    if heal and "student" not in m:
        raise ConfigError("model.heal_steps heals a cut student: set model.student too")
    if "heal_lr" in m and not (isinstance(m["heal_lr"], (int, float)) and not isinstance(m["heal_lr"], bool)
                               and m["heal_lr"] > 0):
        raise ConfigError(f"model.heal_lr must be a number > 0, not {m['heal_lr']!r}")
    if m.get("export_dtype", "float16") not in ("float16", "float32"):
        raise ConfigError(f"model.export_dtype must be float16 or float32, not {m['export_dtype']!r}")
    grounding_config(m.get("grounding", {}))     # checked before the teacher loads


def student_config(m: dict, teacher_config, solver_steps: int):
    """The teacher's config under the student's name, with the student's sampler settings, also as
    its few-step card (defaults, and warnings outside 1-4 steps, phases/2 to 2·phases for a phased
    student, and CFG 1). Its spacing is `lcm`, the grid it was trained on, when that grid is LCM's 50 steps,
    else `trailing`. A phased student samples with Euler (deterministic DDIM) by default."""
    name = m.get("name") or f"{teacher_config.name}-lcm"
    phases = m.get("phases", 1)
    defaults = dict(STUDENT_DEFAULTS, default_sampler="Euler" if phases > 1 else "LCM")
    settings = {k: m.get(k, v) for k, v in defaults.items()}
    # a phased student steps edge to edge: half as many steps skip edges (measured: 4 phases, 2 steps
    # 0.63 seen, 1 step 0.10; docs/few-step.md), twice as many split each phase
    least = max(1, phases // 2)
    most = max(4, settings["default_steps"], 2 * phases if phases > 1 else 0)
    card = FewStepSettings(f"{name} (marble train lcm)", settings["default_sampler"],
                           "lcm" if solver_steps == 50 else "trailing", (min(least, settings["default_steps"]), most),
                           (1.0, max(1.0, float(settings["default_cfg"]))), settings["default_steps"],
                           float(settings["default_cfg"]))
    return teacher_config.replace(name=name, few_step=card, **settings)


def staged_lr(step: int, cfg: TrainConfig, heal_steps: int, heal_ratio: float) -> float:
    """The lr factor when a heal comes first: each stage its own warm-up and cosine (the heal scaled
    by heal_lr / lr). Without a heal, lr_factor itself."""
    if step < heal_steps:
        return heal_ratio * lr_factor(step, replace(cfg, steps=heal_steps))
    return lr_factor(step - heal_steps, replace(cfg, steps=cfg.steps - heal_steps))


def train_lcm(cfg: TrainConfig, world: World, resume: bool = False) -> Path:
    if world.size > 1:
        raise ConfigError("marble train lcm runs in one process; start it without torchrun")
    m = cfg.model
    check_model_table(m)
    heal_steps = m.get("heal_steps", 0)
    if heal_steps >= cfg.steps:
        raise ConfigError(f"model.heal_steps ({heal_steps}) must be fewer than steps ({cfg.steps})")
    if "heal_lr" in m and not cfg.optim.lr:
        raise ConfigError("model.heal_lr is relative to optim.lr, which is 0")
    run_dir = Path(cfg.run_dir)
    loaded = load_model(m["init"])
    model = loaded.model.to(world.device).eval().requires_grad_(False)
    guidance = float(m.get("guidance", model.config.default_cfg))
    try:
        grid = skipping_grid(model.schedule.num_timesteps, int(m.get("solver_steps", 50)))
        model.config = student_config(m, model.config, len(grid))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    k = model.schedule.num_timesteps // len(grid)
    phases = m.get("phases", 1)     # one: plain LCD (no edge σ at all)
    edge_table = edge_sigmas(model.schedule.sigmas, phase_edges(model.schedule.num_timesteps, len(grid), phases))
    if "student" in m:      # a cut student is a new network: the teacher's stays as it is
        teacher_unet, model = model.unet, pruned_model(model, m["student"]).eval().requires_grad_(False)
    else:
        teacher_unet = copy.deepcopy(model.unet)
    teacher = discrete_denoiser(teacher_unet, model.schedule, model.config.prediction)
    model.unet.requires_grad_(True)

    latents, states, rows = cached_training_set(cfg, world, model.vae, model.text_encoder, model.config.text)
    ground = grounding_closure(grounding_config(m.get("grounding", {})), cfg, world, model.unet,
                               model.text_encoder, model.config.text, latents.shape[-1])
    heal_ratio = m["heal_lr"] / cfg.optim.lr if "heal_lr" in m else 1.0
    loop = TrainLoop(cfg, model.unet, world, run_dir,
                     (lambda step: staged_lr(step, cfg, heal_steps, heal_ratio)) if heal_steps else None)
    if resume:
        loop.resume()
    sigmas = model.schedule.sigmas.to(world.device)
    huber_c = float(m.get("huber_c", 0.001))
    ema_unet = lambda x, t, **cond: functional_call(model.unet, loop.ema.shadow, (x, t), cond)  # noqa: E731
    target = discrete_denoiser(ema_unet, model.schedule, model.config.prediction)
    dev = world.device

    every_t = torch.arange(model.schedule.num_timesteps)

    def draw(step, gen, timesteps):
        """A step's rows, their timesteps (from `timesteps`), noise and dropped captions, in one order
        of draws for both stages; and the rows' contexts."""
        idx = torch.tensor(batch_indices(len(latents), cfg.batch, step, cfg.seed))
        t = timesteps[torch.randint(0, len(timesteps), (cfg.batch,), generator=gen)]
        eps = torch.randn((cfg.batch, *latents.shape[1:]), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.data.caption_dropout
        context = states[torch.where(drop, torch.zeros_like(rows[idx]), rows[idx])].to(dev)
        return idx, t, eps, drop, context

    def grounded(distance, idx, drop):
        return (distance(), {}) if ground is None else ground(distance, idx, drop)

    def heal_loss(net, step, gen):
        """BK-SDM's output distillation: the cut student's prediction onto the whole teacher's."""
        idx, t, eps, drop, context = draw(step, gen, every_t)
        t = t.to(dev)
        z = add_noise_vp(latents[idx].to(dev), sigmas[t], eps.to(dev))
        with torch.no_grad():
            wanted = teacher_unet(z, t.float(), context=context)

        def distance():
            return torch.mean((net(z, t.float(), context=context).float() - wanted.float()) ** 2)
        return grounded(distance, idx, drop)

    def step_loss(net, step, gen):
        if step < heal_steps:
            return heal_loss(net, step, gen)
        idx, t, eps, drop, context = draw(step, gen, grid)
        cond, uncond = {"context": context}, {"context": states[:1].expand_as(context).to(dev)}
        student = discrete_denoiser(net, model.schedule, model.config.prediction)
        sigma_edge = edge_table[t].to(dev) if phases > 1 else None
        x_t, sigma_t, y = lcd_target(lambda x, sigma: target(x, sigma, **cond),
                                     guided_denoiser(teacher, cond, uncond, guidance),
                                     latents[idx].to(dev), eps.to(dev), t.to(dev), (t - k).clamp(min=0).to(dev), sigmas,
                                     sigma_edge)

        def distance():     # LCD eq. 11 (PCM's phased form); the target ran above, outside any attention hooks
            return huber(phased(lambda x, sigma: student(x, sigma, **cond), x_t, sigma_t, t.to(dev), sigma_edge),
                         y, huber_c).mean()
        return grounded(distance, idx, drop)

    def write_student(path: Path) -> None:
        """The EMA student as a marble model file (never over an existing one)."""
        if path.exists():
            return
        with loop.ema_weights(model.unet):
            dtype = torch.float16 if m.get("export_dtype", "float16") == "float16" else None
            path.parent.mkdir(parents=True, exist_ok=True)
            write_marble(from_model(model, dtype=dtype), path)

    def on_sample(step: int) -> None:
        write_samples(loop, model, run_dir / "samples" / f"step-{step:06d}.png")
        write_student(run_dir / "snapshots" / f"step-{step:06d}.safetensors")

    loop.fit(step_loss, on_sample)
    out = run_dir / "model.safetensors"
    write_student(out)
    loop.ema.copy_to(model.unet)
    write_samples(loop, model, run_dir / "samples" / "final.png", ema_loaded=True)
    return out
