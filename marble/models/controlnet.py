"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of a U-Net's encoder and middle block that reads a control image.

The hint encoder (`input_hint_block`, the paper's E(·): 3×3 convolutions with SiLU, each width
step a stride-2 convolution) brings the control image down to the latent's size; its output is
added after the copy's first convolution. Each input block's output, and the middle block's, goes
through a zero-initialised 1×1 convolution (`zero_convs.i`, `middle_block_out`): one residual per
skip connection of the U-Net, plus one for its middle block (marble.models.unet.UNet's `control`).
At initialisation every residual is zero, so the U-Net's output is unchanged.

Module names are lllyasviel's (cldm/cldm.py `ControlNet`), so ControlNet 1.0/1.1 files load by key
copy under `control_model.`. One module serves every U-Net marble builds: it is built from the
same UNetConfig (SD1.x, SD2.x, SDXL with its `label_emb`, the built-in model).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from marble.models.layers import coordinate_channels, zero_module
from marble.models.unet import TimestepEmbedSequential, UNetConfig, UNetEncoder
from marble.models.weight_cast import compute_dtype

HINT_BLOCK = (16, 32, 96, 256)   # the paper's and every released SD ControlNet's hint-encoder widths


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig                            # the U-Net whose encoder it copies; its in_channels are the ControlNet's own input
    hint_channels: int = 3                      # channels of the control image (RGB)
    hint_block: tuple[int, ...] = HINT_BLOCK    # hint-encoder widths; each step halves the side, so 2^(len − 1) = the VAE's factor

    def __post_init__(self):
        if len(self.hint_block) < 1:
            raise ValueError("hint_block needs at least one width")

    @property
    def hint_factor(self) -> int:
        """Pixels per latent cell the hint encoder assumes (8 for SD's VAE)."""
        return 2 ** (len(self.hint_block) - 1)


def controlnet_config(unet: UNetConfig, latent_factor: int, latent_channels: int | None = None) -> ControlNetConfig:
    """The ControlNet a U-Net takes: its encoder's shape, a hint encoder that downsamples by the VAE's
    factor (SD: 8, the released widths), and the latent alone as input (no inpainting channels)."""
    levels = latent_factor.bit_length() - 1
    if 2 ** levels != latent_factor:
        raise ValueError(f"the latent factor {latent_factor} is not a power of 2")
    widths = HINT_BLOCK if levels == 3 else tuple(16 * 2 ** i for i in range(levels + 1))
    return ControlNetConfig(replace(unet, in_channels=latent_channels or unet.out_channels), 3, widths)


def hint_block(config: ControlNetConfig) -> TimestepEmbedSequential:
    """lllyasviel's input_hint_block: conv, then per width step conv + stride-2 conv, SiLU between,
    and a zero-initialised conv out to the model width (indices 0, 2, 4, ... are the convolutions)."""
    w = config.hint_block
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, w[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(w, w[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_module(nn.Conv2d(w[-1], config.unet.model_channels, 3, padding=1)))
    return TimestepEmbedSequential(layers)


def zero_conv(channels: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential([zero_module(nn.Conv2d(channels, channels, 1))])


class ControlNet(UNetEncoder):
    """controlnet(x, t, context, hint, y=None) -> residuals: a list of len(input_blocks) + 1 tensors,
    the last for the U-Net's middle block. x (B, C, h, w) is the U-Net's (scaled) input, t (B,) its
    timesteps, hint (B, hint_channels, h·f, w·f) the control image in [0, 1] (f = hint_factor)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        skip_channels = self._build_encoder(config.unet)
        self.input_hint_block = hint_block(config)
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in skip_channels)
        self.middle_block_out = zero_conv(skip_channels[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        dtype = compute_dtype(self.time_embed[0])
        x = x.to(dtype)
        if self.encoder_config.coord_channels:   # its input conv is the U-Net's: x, y coordinates joined
            x = torch.cat([x, coordinate_channels(x)], dim=1)
        emb = self._embedding(t, y, x.shape[0])
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype), emb, context)
        outs = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided   # the hint joins after the first convolution (cldm; diffusers' conv_in + cond embedding)
            outs.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
