"""From what the user typed (`--model NAME|PATH`) to a loaded model with its name and hash."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from marble.checkpoints.checkpoint import state_hash, to_model
from marble.checkpoints.detect import open_checkpoint
from marble.errors import ModelLoadError
from marble.models.latent_diffusion import LatentDiffusion, tiny_config
from marble.models.weight_cast import store_weights

DEFAULT_MODEL = "builtin"


def models_dir() -> Path:
    """Where named models live: $MARBLE_MODELS, else the repository's `models/` folder."""
    env = os.environ.get("MARBLE_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


def builtin_path() -> Path:
    return models_dir() / "builtin.safetensors"


# models shipped in models/ by name: the built-in model and its few-step student (docs/few-step.md)
SHIPPED = ("builtin", "builtin-lcm")


def random_model(config_fn=tiny_config, seed: int = 0) -> LatentDiffusion:
    """A model with seeded random weights everywhere (zero-initialised layers included, so every
    path through the network matters): for tests and for demos without trained weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LatentDiffusion(config_fn())
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                    torch.nn.init.normal_(p, mean=1.0, std=0.1)   # norms keep the signal's scale
                elif p.ndim > 1:
                    torch.nn.init.normal_(p, std=1.0 / max(1, p[0].numel()) ** 0.5)  # variance-preserving
                else:
                    torch.nn.init.normal_(p, std=0.1)
    return model.eval().requires_grad_(False)


NAMED = {
    "tiny-random": lambda: random_model(tiny_config, seed=0),
}


@dataclass
class LoadedModel:
    model: LatentDiffusion
    name: str     # what the record calls it: the file stem or the registered name
    hash: str     # A1111 "Model hash": first 10 hex of the file's sha256
    source: str = ""   # where it was loaded from (an absolute path, or the registered name): for --from


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, *, prediction: str | None = None,
               allow_pickle: bool = False, storage: torch.dtype | None = None, mapped: bool = False) -> LoadedModel:
    """A registered name or a path: a marble file, a diffusers folder, an SD single file (.safetensors;
    .ckpt/.pt only with allow_pickle). `prediction` overrides the model's eps/v/x0. `storage`: keep
    the weights in this dtype (read straight into it) and compute in `dtype` (marble.models.weight_cast).
    `mapped` (`--low-memory`): the weights a file stores in that dtype stay read-only views of the
    file's memory map, whose pages the pipeline releases between stages (tensor_file.release)."""
    storage = None if storage == dtype else storage
    spec = spec or DEFAULT_MODEL
    if spec in NAMED:
        model = NAMED[spec]().to(storage or dtype)
        hash = state_hash(model)   # of the weights as held
        return LoadedModel(store_weights(model, storage, compute=dtype) if storage else model, spec, hash, spec)
    shipped = spec in SHIPPED
    path = models_dir() / f"{spec}.safetensors" if shipped else Path(spec).expanduser()
    if shipped and not path.is_file():
        what = "built-in" if spec == "builtin" else spec
        raise ModelLoadError(f"the {what} model is missing ({path}); pass --model tiny-random or a model file")
    if not path.exists():
        names = ", ".join([*SHIPPED, *NAMED])
        raise ModelLoadError(f"no model named {spec!r} and no file there (names: {names})")
    ckpt = open_checkpoint(path, dtype=storage or dtype, allow_pickle=allow_pickle, prediction=prediction,
                           mapped=mapped)
    return LoadedModel(to_model(ckpt, dtype, storage), spec if shipped else ckpt.name, ckpt.hash,
                       spec if shipped else str(path.resolve()))
