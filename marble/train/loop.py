"""The training loop shared by the VAE and the diffusion trainers.

Everything random in a step is drawn from a generator seeded by (seed, step), and the batch at a
step is a function of the step alone, so a checkpoint needs only the model, EMA, optimizer and
LR-schedule states plus the step: `--resume` then continues exactly where the run stopped.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from marble.config import config_from_json, config_to_dict, config_to_json
from marble.fileio import write_replace
from marble.train.checkpoint import load_checkpoint, save_checkpoint
from marble.train.config import ConfigError, TrainConfig
from marble.train.distributed import World, barrier
from marble.train.ema import EMA
from marble.train.plot import plot_losses

StepLoss = Callable[[nn.Module, int, torch.Generator], tuple[torch.Tensor, dict]]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The one source of randomness for a step: independent of how the run got there."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at the last step."""
    o = cfg.optim
    if step < o.warmup:
        return (step + 1) / o.warmup
    progress = (step - o.warmup) / max(1, cfg.steps - o.warmup)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainLoop:
    def __init__(self, cfg: TrainConfig, module: nn.Module, world: World, run_dir: Path,
                 schedule: Callable[[int], float] | None = None):
        """`schedule(step)`: the lr factor; default lr_factor's warm-up and cosine over cfg.steps."""
        self.cfg, self.world, self.run_dir = cfg, world, Path(run_dir)
        self.module = module.to(world.device)
        self.net = DistributedDataParallel(self.module) if world.distributed else self.module
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                     weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule or (lambda s: lr_factor(s, cfg)))
        self.ema = EMA(self.module, cfg.ema_decay)
        self.step = 0
        self.seconds_before, self._t0 = 0.0, None   # training wall time of earlier segments; this segment's start

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "loss.jsonl"

    def state(self) -> dict:
        return {"step": self.step, "model": self.module.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "config": config_to_json(self.cfg), "seconds": self.seconds()}

    def seconds(self) -> float:
        """Training wall time so far, summed over every resumed segment (up to the last checkpoint
        before a stop, then this process's time since its resume)."""
        return self.seconds_before + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def remove_stale_temp_files(self) -> None:
        """A process killed mid-write leaves its temp file (never the target, which is only ever
        replaced whole): clear them before writing again."""
        for tmp in self.run_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def resume(self) -> None:
        if not self.checkpoint_path.is_file():
            raise ConfigError(f"nothing to resume: no checkpoint at {self.checkpoint_path}")
        state = load_checkpoint(self.checkpoint_path)
        # resolved again, so that a checkpoint from before a config key existed compares at its default
        saved = config_to_dict(config_from_json(TrainConfig, state["config"], "the checkpoint's config"))
        current = config_to_dict(self.cfg)
        for key in ("kind", "batch", "seed", "model", "data", "lora"):
            if saved[key] != current[key]:
                raise ConfigError(f"the checkpoint was made with a different '{key}'; resume with the same config")
        self.module.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.seconds_before = float(state.get("seconds", 0.0))   # checkpoints before this key: 0
        if self.world.is_main:
            self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint: they will be written again."""
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        write_replace(self.log_path, "".join(line + "\n" for line in kept).encode())

    def save(self) -> None:
        if self.world.is_main:
            save_checkpoint(self.state(), self.checkpoint_path)
            plot_losses(self.log_path, self.run_dir / "loss.png")
        barrier(self.world)

    def fit(self, step_loss: StepLoss, on_sample: Callable[[int], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> None:
        """`on_sample(step)` every cfg.sample_every steps, `on_step(step)` after every step (main
        process only, after the checkpoint: what they write survives a resume)."""
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.remove_stale_temp_files()
        autocast = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        bar = None
        if world.is_main:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)
        log = open(self.log_path, "a") if world.is_main else None
        self._t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                self.net.train()
                with autocast:
                    loss, metrics = step_loss(self.net, self.step, step_generator(cfg.seed, self.step))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.grad_clip)
                self.opt.step()
                self.sched.step()
                self.ema.update(self.module)
                self.step += 1
                if world.is_main:
                    loss = loss.item()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        record = {"step": self.step, "loss": loss, "grad_norm": float(grad_norm),
                                  "lr": self.sched.get_last_lr()[0], "time": round(self.seconds(), 3),
                                  **metrics}
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    log and log.flush()
                    self.save()
                if on_sample and cfg.sample_every and self.step % cfg.sample_every == 0 and world.is_main:
                    on_sample(self.step)
                if on_step and world.is_main:
                    on_step(self.step)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()

    @contextmanager
    def ema_weights(self, module: nn.Module):
        """`module` carries the EMA weights inside the block and its training weights again after,
        exactly (whatever the block raises)."""
        live = {k: v.clone() for k, v in module.state_dict().items()}
        self.ema.copy_to(module)
        try:
            yield module
        finally:
            module.load_state_dict(live)

    def ema_module(self, make: Callable[[], nn.Module]) -> nn.Module:
        """A fresh copy of the module carrying the EMA weights."""
        copy = make()
        self.ema.copy_to(copy)
        return copy

