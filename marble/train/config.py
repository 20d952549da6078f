"""Typed training configs, read from TOML; the resolved config is saved next to the run."""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from marble.config import config_from_dict, config_to_dict
from marble.errors import ConfigError

__all__ = ["ConfigError", "DataConfig", "LoraConfig", "OptimConfig", "TrainConfig", "load_config"]


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
class LoraConfig:
    """`kind = "lora"` only (marble/train/lora.py)."""
    rank: int = 8
    alpha: float | None = None        # ΔW = (alpha / rank) · up · down; None = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["attention"])   # attention, conv, text
    name: str = ""                    # the output file's stem and ss_output_name; "" = "lora"
    min_snr_gamma: float = 0.0        # > 0: Min-SNR-γ timestep weighting, as model.min_snr_gamma
    snapshot_every: int = 0           # > 0: also write run_dir/snapshots/step-NNNNNN.safetensors (EMA)
    sample_prompts: list[str] = field(default_factory=list)   # grids; [] = the first distinct captions


LORA_TARGETS = ("attention", "conv", "text")
KINDS = ("diffusion", "vae", "lora", "lcm", "controlnet")


@dataclass
class TrainConfig:
    kind: str = "diffusion"           # diffusion | vae | lora | lcm | controlnet
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
    model: dict = field(default_factory=dict)   # kind-specific: see marble/train/diffusion.py, vae.py, lora.py, lcm.py, controlnet.py
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

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
    if cfg.kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(map(repr, KINDS))}, not {cfg.kind!r}")
    if cfg.steps < 1 or cfg.batch < 1:
        raise ConfigError("steps and batch must be positive")
    if cfg.kind == "lora":
        check_lora(cfg.lora)
    elif "lora" in data:
        raise ConfigError(f"a [lora] table only applies to kind = \"lora\", not {cfg.kind!r}")
    return cfg


def check_lora(lora: LoraConfig) -> None:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (isinstance(lora.rank, int) and not isinstance(lora.rank, bool)) or not number(lora.snapshot_every) \
            or not number(lora.min_snr_gamma) or not (lora.alpha is None or number(lora.alpha)):
        raise ConfigError("lora.rank and lora.snapshot_every must be integers, lora.alpha and lora.min_snr_gamma numbers")
    if not isinstance(lora.targets, list) or not all(isinstance(t, str) for t in lora.targets) \
            or not isinstance(lora.name, str) or not isinstance(lora.sample_prompts, list):
        raise ConfigError("lora.targets and lora.sample_prompts must be lists of strings, lora.name a string")
    if lora.rank < 1:
        raise ConfigError(f"lora.rank must be at least 1, not {lora.rank}")
    if lora.alpha is not None and not (lora.alpha > 0 and math.isfinite(lora.alpha)):
        raise ConfigError(f"lora.alpha must be a positive number, not {lora.alpha}")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown or not lora.targets or len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"lora.targets must be distinct kinds from {', '.join(LORA_TARGETS)}, got {lora.targets}")
    if lora.snapshot_every < 0 or lora.min_snr_gamma < 0:
        raise ConfigError("lora.snapshot_every and lora.min_snr_gamma must be >= 0")
    if lora.name and (Path(lora.name).name != lora.name or lora.name.startswith(".")):
        raise ConfigError(f"lora.name must be a plain file stem, not {lora.name!r}")
