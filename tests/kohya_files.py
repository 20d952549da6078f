"""Random kohya LoRA files for the LoRA tests, written from diffusers' own module names (what
kohya's sd-scripts patches), independently of marble's module-name table."""
import math

import torch

from marble.fileio import write_new
from marble.tensor_file import safetensors_writer


def write_safetensors(path, tensors, metadata=None):
    write_new(path, safetensors_writer({k: v.contiguous() for k, v in tensors.items()}, metadata))
    return path



def kohya_targets(pipe) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, _, module in kohya_paths(pipe)]


def kohya_paths(pipe) -> list[tuple[str, str, torch.nn.Module]]:
    """(kohya name, module) for what kohya's sd-scripts patches with conv_dim set (LoCon): Linear and
    Conv2d layers in Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D, and the text
    encoder's CLIPAttention / CLIPMLP linears."""
    out = []
    for prefix, root, owners in (("lora_unet", pipe.unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D",
                                                             "Upsample2D")),
                                 ("lora_te", pipe.text_encoder, ("CLIPAttention", "CLIPMLP"))):
        for owner_name, owner in root.named_modules():
            if type(owner).__name__ in owners:
                if prefix == "lora_te" and not owner_name.startswith("text_model."):
                    owner_name = f"text_model.{owner_name}"   # as files from transformers < 5 name it
                for child_name, child in owner.named_modules():
                    if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and child_name:
                        path = f"{owner_name}.{child_name}"
                        out.append((f"{prefix}_{path}".replace(".", "_"), f"{prefix}.{path}", child))
    return out


def random_kohya(pipe, seed: int, alpha: float | None = None, ranks=(4, 2)) -> tuple[dict, dict]:
    """Tensors of a kohya LoCon file: 3×3 down + 1×1 up on 3×3 convolutions; ranks alternate.
    `alpha`: one α for every layer (≠ every rank), as kohya's network_alpha; None: a random α per
    layer, absent on every third one (then α = r). Also returns name -> (module, α).
    diffusers' kohya converter reads only the first kind right: its alpha_pattern keys keep the old
    `processor.to_q_lora` names, which peft ignores (with a warning), so per-layer alphas are checked
    against the closed form instead."""
    g = torch.Generator().manual_seed(seed)
    tensors, meta = {}, {}
    for i, (name, module) in enumerate(kohya_targets(pipe)):
        r = ranks[i % len(ranks)]
        w = module.weight
        down_shape = (r, *w.shape[1:]) if w.ndim == 4 else (r, w.shape[1])
        up_shape = (w.shape[0], r, 1, 1) if w.ndim == 4 else (w.shape[0], r)
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) / math.prod(down_shape[1:]) ** 0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.3 / r ** 0.5
        layer_alpha = alpha
        if alpha is None and i % 3:
            layer_alpha = float(torch.empty(()).uniform_(0.5, 3 * r, generator=g))
        if layer_alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(layer_alpha)
        meta[name] = (module, layer_alpha if layer_alpha is not None else float(r))
    return tensors, meta
