"""Typed training configs, read from TOML; the resolved config is saved next to the run."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from marble.config import config_from_dict, config_to_dict
from marble.errors import ConfigError

__all__ = ["ConfigError", "DataConfig", "OptimConfig", "TrainConfig", "load_config"]


@dataclass
class DataConfig:
    world: str | None = "shapes"      # a procedural world by name ...
    folder: str | None = None         # ... or an image folder with metadata.jsonl (file_name, text)
    n: int = 20000                    # images drawn from the world
    split: str = "train"              # the world's split: train (held-out compositions excluded)
    seed: int = 0
    size: int = 64                    # training resolution, square, pixels
    caption_dropout: float = 0.1      # fraction of captions replaced by "" so CFG has an unconditional model
    kinds: dict | None = None         # shapes world: scene-kind weights, e.g. {relation = 2, single = 1}; None = its own mix


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: int = 200                 # linear LR warm-up steps
    min_lr_ratio: float = 0.1         # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0            # max global gradient norm


@dataclass
class TrainConfig:
    kind: str = "diffusion"           # diffusion | vae
    run_dir: str = "runs/default"
    steps: int = 1000
    batch: int = 32                   # global batch (split across DDP ranks)
    seed: int = 0
    bf16: bool = False                # bf16 autocast for the forward/backward (CPU or GPU)
    ema_decay: float = 0.999
    log_every: int = 10
    checkpoint_every: int = 200
    sample_every: int = 0             # 0: only at the end
    threads: int = 0                  # torch intra-op threads; 0 = torch's default
    model: dict = field(default_factory=dict)   # kind-specific: see marble/train/diffusion.py and vae.py
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(config_to_dict(self), indent=2, sort_keys=True))


def load_config(path: Path, overrides: dict | None = None) -> TrainConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        data[key] = value
    cfg = config_from_dict(TrainConfig, data)   # keys added since a file was written take their defaults
    if cfg.kind not in ("diffusion", "vae"):
        raise ConfigError(f"kind must be 'diffusion' or 'vae', not {cfg.kind!r}")
    if cfg.steps < 1 or cfg.batch < 1:
        raise ConfigError("steps and batch must be positive")
    return cfg
