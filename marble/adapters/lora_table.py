"""The module-name table: every module a LoRA can patch in a loaded model, under every name users have.

A LoRA file names the layers it patches in one of several spellings, all derived from module paths:
- kohya / A1111: `lora_unet_` + the module path with "." -> "_", written either from diffusers' U-Net
  paths (`lora_unet_down_blocks_0_attentions_0_proj_in`, what kohya's sd-scripts writes for SD1/2)
  or from the original SD paths (`lora_unet_input_blocks_1_1_proj_in`); text encoders `lora_te_`
  (SDXL: `lora_te1_`, `lora_te2_`) + the transformers path (`text_model.encoder.layers.0.self_attn.q_proj`);
- diffusers / PEFT: `unet.` + the diffusers path, `text_encoder.` (`text_encoder_2.`) + the
  transformers path.
CLIP paths are accepted with and without `text_model.`: transformers 5 flattened CLIPTextModel,
so files written through it (and kohya names derived from it) lack the prefix older files have.
The table is built forward, from the model's own modules: each path is translated to diffusers'
with marble.checkpoints.diffusers_keys and then written in each spelling, exactly as the tools that
make the files write them. Reading a file is then a dictionary lookup; nothing parses underscores.

A target's canonical name is its path inside the LatentDiffusion model (`unet.input_blocks.1.1.proj_in`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`), so `model.get_submodule(name)` finds it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from marble.checkpoints.diffusers_keys import rename, unet_table
from marble.models.layers import Downsample, SpatialTransformer, Upsample
from marble.models.unet import ResBlock, UNetConfig

# kinds of target, for choosing what to train: kohya's default LoRA patches the transformer blocks
# ("attention"); LoCon adds the ResNet and down/upsample layers ("conv"); "text" is the text encoders;
# "other" (time embedding, conv_in, conv_out) only PEFT files name
KINDS = ("attention", "conv", "text", "other")
_CLIP_ROOT = "text_model."


@dataclass(frozen=True)
class Target:
    name: str              # canonical: the module's path in the model
    module: nn.Module      # an nn.Linear or nn.Conv2d
    component: str         # "unet", "text_encoder" or "text_encoder_2": which multiplier applies
    kind: str              # one of KINDS
    kohya: str             # the name kohya's sd-scripts writes for it (what marble writes)
    diffusers: str         # the name diffusers / PEFT write for it


@dataclass(frozen=True)
class ModuleTable:
    targets: dict[str, Target]       # canonical name -> target
    spellings: dict[str, str]        # any name a file may use -> canonical name

    def find(self, name: str) -> Target | None:
        canonical = self.spellings.get(name)
        return None if canonical is None else self.targets[canonical]

    def select(self, kinds: tuple[str, ...] | list[str]) -> list[Target]:
        """The targets of the given kinds, in model order (for training)."""
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown LoRA target kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        return [t for t in self.targets.values() if t.kind in kinds]


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _unet_kinds(unet: nn.Module) -> dict[str, str]:
    """Module path -> kind, from the block each layer sits in."""
    kinds = {}
    for owner_path, owner in unet.named_modules():
        kind = "attention" if isinstance(owner, SpatialTransformer) else \
            "conv" if isinstance(owner, (ResBlock, Downsample, Upsample)) else None
        if kind:
            for path, _ in owner.named_modules(prefix=owner_path):
                kinds[path] = kind
    return kinds


def _text_components(model: nn.Module) -> list[tuple[str, str]]:
    """(attribute, kohya prefix) per text encoder: one is `lora_te`, two (SDXL) are `lora_te1`/`lora_te2`."""
    names = [n for n in ("text_encoder", "text_encoder_2") if getattr(model, n, None) is not None]
    if len(names) == 1:
        return [(names[0], "lora_te")]
    return [(n, f"lora_te{i + 1}") for i, n in enumerate(names)]


def module_table(model: nn.Module) -> ModuleTable:
    """The table of a LatentDiffusion model (`.unet`, `.text_encoder`, later `.text_encoder_2`):
    every nn.Linear and nn.Conv2d of the U-Net and the text encoders."""
    targets: dict[str, Target] = {}
    spellings: dict[str, str] = {}

    def add(target: Target, names: list[str]) -> None:
        targets[target.name] = target
        for name in names:
            if spellings.setdefault(name, target.name) != target.name:   # a real ambiguity, not a user error
                raise RuntimeError(f"LoRA name {name!r} would mean both {spellings[name]} and {target.name}")

    # a transformer denoiser (MMDiT) has no diffusers U-Net spelling: its LoRA names are marble's and kohya's
    to_diffusers = unet_table(model.unet.config) if isinstance(model.unet.config, UNetConfig) else {}
    kinds = _unet_kinds(model.unet)
    for path, module in model.unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        theirs = rename(f"{path}.weight", to_diffusers)
        theirs = path if theirs is None else theirs[:-len(".weight")]
        target = Target(f"unet.{path}", module, "unet", kinds.get(path, "other"),
                        kohya=_kohya("lora_unet", theirs), diffusers=f"unet.{theirs}")
        add(target, [target.name, target.kohya, target.diffusers, _kohya("lora_unet", path)])

    for attribute, prefix in _text_components(model):
        for path, module in getattr(model, attribute).named_modules():
            if isinstance(module, nn.Linear):
                target = Target(f"{attribute}.{path}", module, attribute, "text",
                                kohya=_kohya(prefix, path), diffusers=f"{attribute}.{path}")
                names = [target.name, target.kohya]
                if path.startswith(_CLIP_ROOT):   # transformers >= 5 dropped CLIPTextModel's `text_model.`
                    names += [_kohya(prefix, path[len(_CLIP_ROOT):]), f"{attribute}.{path[len(_CLIP_ROOT):]}"]
                add(target, names)
    return ModuleTable(targets, spellings)
