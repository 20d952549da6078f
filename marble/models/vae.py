"""The KL autoencoder (Rombach et al. 2022, §3) exposed as a codec.

`encode(pixels) -> latent` and `decode(latent) -> pixels`, pixels in [-1, 1]. The latent is
`(z - shift) * scale` where z is the posterior mean; scale and shift live in the config (SD1/SD2:
0.18215 and 0). Module paths follow the CompVis `AutoencoderKL` (`encoder.down.N.block.M`,
`decoder.up.N.upsample`, `quant_conv`, ...), so SD weights load under `first_stage_model.`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marble.models.layers import normalization
from marble.models.weight_cast import compute_dtype


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3                      # image channels
    out_channels: int = 3
    ch: int = 128                             # width of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)   # each level but the last halves the resolution: factor 2^(L-1)
    num_res_blocks: int = 2                   # per level in the encoder (decoder has one more)
    z_channels: int = 4                       # latent channels
    groups: int = 32                          # GroupNorm groups
    mid_attention: bool = True                # single-head attention in the middle block
    scaling_factor: float = 0.18215           # latent = (z - shift) * scale, so the latent has ~unit variance
    shift_factor: float = 0.0
    decode_fp32: bool = False                 # run in float32 when the model is fp16 (SDXL's VAE overflows in fp16; diffusers' force_upcast)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(),
    # SDXL's VAE: SD's architecture retrained, latent scale 0.13025
    "sdxl": VAEConfig(scaling_factor=0.13025, decode_fp32=True),
    "tiny": VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, groups=8),
}


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = normalization(in_channels, groups, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels, groups, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At 1024² one 128-channel map is 0.5 GB. Without autograd SiLU and the residual sum run in
        # place (same numbers: silu_ is silu, a + b is b + a), and conv1's output, norm2's argument
        # only, is freed as soon as norm2 has read it.
        inplace = not torch.is_grad_enabled()
        h = self.norm2(self.conv1(F.silu(self.norm1(x), inplace=inplace)))
        h = self.conv2(F.silu(h, inplace=inplace))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip) if inplace else skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1×1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = normalization(channels, groups, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 conv with ldm's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, c: VAEConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, c.groups)
    mid.attn_1 = AttnBlock(channels, c.groups) if c.mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, c.groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.ch
        for level, mult in enumerate(c.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, c.ch * mult, c.groups))
                block_in = c.ch * mult
            if level != len(c.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid(block_in, c)
        self.norm_out = normalization(block_in, c.groups, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, c)
        # ldm indexes `up` by level (0 = full resolution) but runs it from the deepest level.
        stages: list[nn.Module] = []
        for level in reversed(range(len(c.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, c.ch * c.ch_mult[level], c.groups))
                block_in = c.ch * c.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = normalization(block_in, c.groups, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class AutoencoderKL(nn.Module):
    """The codec. `encode` returns the scaled posterior mean (deterministic: a seed then fully fixes
    img2img); `posterior` gives mean and log-variance for training."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | pixels), unscaled; log-variance clamped as ldm does."""
        mean, logvar = self.quant_conv(self.encoder(pixels)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, _ = self.posterior(pixels.to(compute_dtype(self.quant_conv)))   # the VAE may run wider than the model (decode_fp32)
        return (mean - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.to(compute_dtype(self.post_quant_conv)) / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(self.post_quant_conv(z))

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: reconstruction of the posterior sample z = mean + std·eps (reparametrised),
        with the posterior's mean and log-variance for the KL term."""
        mean, logvar = self.posterior(pixels)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.decoder(self.post_quant_conv(z)), mean, logvar
