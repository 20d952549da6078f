"""Module names: CompVis (marble's, the original SD checkpoints') <-> diffusers', for U-Net and VAE.

Both layouts hold the same tensors; only the paths differ, plus one shape: the VAE's mid-block
attention projections are 1×1 convolutions in CompVis (C, C, 1, 1) and linear layers in diffusers
(C, C). The tables are built from the config, module by module, and a key is renamed by its
longest matching prefix; a key no prefix matches is unknown. The text encoder needs no table: SD1
single files, diffusers folders and marble all use transformers' CLIPTextModel names.
"""
from __future__ import annotations

import torch

from marble.models.unet import UNetConfig
from marble.models.vae import VAEConfig

# ResBlock internals: ldm's Sequential indices -> diffusers' ResnetBlock2D names
_UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# VAE mid-block attention: CompVis AttnBlock -> diffusers Attention
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# names older diffusers versions saved for the same attention (read only)
_VAE_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _res(table: dict[str, str], ours: str, theirs: str) -> None:
    for a, b in _UNET_RES.items():
        table[f"{ours}.{a}"] = f"{theirs}.{b}"


def unet_table(c: UNetConfig) -> dict[str, str]:
    """marble (ldm) module path -> diffusers UNet2DConditionModel module path."""
    t = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if c.adm_in_channels:   # SDXL's vector conditioning: ldm's label_emb is diffusers' add_embedding
        t.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    levels, r = len(c.channel_mult), c.num_res_blocks
    block = 1
    for level in range(levels):
        for j in range(r):
            _res(t, f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if level in c.attention_levels:
                t[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level != levels - 1:
            t[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    _res(t, "middle_block.0", "mid_block.resnets.0")
    t["middle_block.1"] = "mid_block.attentions.0"
    _res(t, "middle_block.2", "mid_block.resnets.1")
    block = 0
    for up, level in enumerate(reversed(range(levels))):   # diffusers numbers up blocks from the bottom
        for j in range(r + 1):
            _res(t, f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}")
            index = 1
            if level in c.attention_levels:
                t[f"output_blocks.{block}.1"] = f"up_blocks.{up}.attentions.{j}"
                index = 2
            if level and j == r:
                t[f"output_blocks.{block}.{index}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            block += 1
    return t


def vae_table(c: VAEConfig) -> dict[str, str]:
    """marble (CompVis) module path -> diffusers AutoencoderKL module path."""
    t = {k: k for k in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                        "quant_conv", "post_quant_conv")}
    levels = len(c.ch_mult)
    for part in ("encoder", "decoder"):
        t[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        t[f"{part}.mid.block_1"] = f"{part}.mid_block.resnets.0"
        t[f"{part}.mid.block_2"] = f"{part}.mid_block.resnets.1"
        for a, b in _VAE_ATTN.items():
            t[f"{part}.mid.attn_1.{a}"] = f"{part}.mid_block.attentions.0.{b}"
    for level in range(levels):
        for j in range(c.num_res_blocks):
            t[f"encoder.down.{level}.block.{j}"] = f"encoder.down_blocks.{level}.resnets.{j}"
        t[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = levels - 1 - level   # CompVis indexes decoder stages by resolution, diffusers by order of use
        for j in range(c.num_res_blocks + 1):
            t[f"decoder.up.{level}.block.{j}"] = f"decoder.up_blocks.{up}.resnets.{j}"
        t[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    for ours in [k for k in t if ".block." in k or ".block_" in k]:
        t[f"{ours}.nin_shortcut"] = f"{t[ours]}.conv_shortcut"
    return t


def rename(key: str, table: dict[str, str]) -> str | None:
    """Replace the longest module-path prefix of `key` found in `table`; None when none matches."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def inverse(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _is_vae_attn_weight(marble_key: str) -> bool:
    parts = marble_key.split(".")
    return len(parts) == 5 and parts[1:3] == ["mid", "attn_1"] and parts[3] in ("q", "k", "v", "proj_out") \
        and parts[4] == "weight"


def vae_to_diffusers_tensor(marble_key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[:2]) if _is_vae_attn_weight(marble_key) and tensor.ndim == 4 else tensor


def vae_from_diffusers_tensor(marble_key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(*tensor.shape, 1, 1) if _is_vae_attn_weight(marble_key) and tensor.ndim == 2 else tensor


def vae_reverse_table(c: VAEConfig) -> dict[str, str]:
    """diffusers path -> marble path, accepting the legacy attention names too."""
    t = inverse(vae_table(c))
    for part in ("encoder", "decoder"):
        for old, ours in _VAE_ATTN_LEGACY.items():
            t[f"{part}.mid_block.attentions.0.{old}"] = f"{part}.mid.attn_1.{ours}"
    return t


def controlnet_table(c: UNetConfig, hint_convs: int) -> dict[str, str]:
    """marble (lllyasviel's cldm) ControlNet module path -> diffusers ControlNetModel module path.
    The copied encoder keeps the U-Net's names; `hint_convs` counts input_hint_block's convolutions."""
    t = {k: v for k, v in unet_table(c).items() if not k.startswith(("out.", "output_blocks."))}
    t["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
    for k in range(hint_convs - 2):
        t[f"input_hint_block.{2 * k + 2}"] = f"controlnet_cond_embedding.blocks.{k}"
    t[f"input_hint_block.{2 * hint_convs - 2}"] = "controlnet_cond_embedding.conv_out"
    blocks = 1 + len(c.channel_mult) * c.num_res_blocks + len(c.channel_mult) - 1
    for i in range(blocks):
        t[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
    t["middle_block_out.0"] = "controlnet_mid_block"
    return t
