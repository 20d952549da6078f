"""The denoising U-Net with spatial transformers (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"; the CompVis `UNetModel`).

Module paths match the original Stable Diffusion files (`input_blocks`, `middle_block`,
`output_blocks`, `time_embed`, `out`), so SD weights load as a key copy under
`model.diffusion_model.`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from marble.models.layers import (Downsample, SpatialTransformer, Upsample, coordinate_channels,
                                  normalization, timestep_embedding, zero_module)
from marble.models.weight_cast import compute_dtype


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                       # latent channels (9 for SD inpainting: latent + mask + masked latent)
    out_channels: int = 4                      # eps / v / x0 prediction channels
    model_channels: int = 320                  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level; each level but the last halves the resolution
    num_res_blocks: int = 2                    # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels that carry spatial transformers (ldm: attention_resolutions 4,2,1)
    num_heads: int = 8                         # heads per transformer when head_dim is 0 (SD1)
    head_dim: int = 0                          # fixed channels per head, overriding num_heads (SD2: 64)
    context_dim: int = 768                     # width of the text context
    transformer_depth: int = 1                 # transformer blocks per spatial transformer
    level_depths: tuple[int, ...] = ()         # per-level transformer blocks overriding transformer_depth (SDXL base: 0, 2, 10); the middle block takes the last level's
    adm_in_channels: int = 0                   # width of the extra vector `y` added to the time embedding (ldm's label_emb; SDXL: pooled text + size Fourier features); 0 = none
    linear_projection: bool = False            # SD2 projects in/out of transformers with Linear, SD1 with 1x1 conv
    groups: int = 32                           # GroupNorm groups
    dropout: float = 0.0
    coord_channels: bool = False               # join x, y coordinate channels to the input (CoordConv); the input conv takes 2 more
    attention_position: bool = False           # add a 2-D sin-cos position embedding to every spatial transformer's tokens
    decoder_blocks: int = 0                    # ResBlocks per level on the way up; 0 = num_res_blocks + 1 (all skips used)
    middle_block: bool = True                  # False: no middle block (BK-SDM's pruned U-Nets; Kim et al. 2023)

    def __post_init__(self):
        if self.level_depths and len(self.level_depths) != len(self.channel_mult):
            raise ValueError(f"level_depths {self.level_depths} needs one depth per level ({len(self.channel_mult)})")
        if not 0 <= self.decoder_blocks <= self.num_res_blocks + 1:
            raise ValueError(f"decoder_blocks must be 1 to {self.num_res_blocks + 1} (or 0 for all), "
                             f"not {self.decoder_blocks}")

    @property
    def up_blocks(self) -> int:
        """ResBlocks per level on the way up. Fewer than num_res_blocks + 1 leaves each level's
        shallower skips unused (BK-SDM removes decoder blocks with their skips)."""
        return self.decoder_blocks or self.num_res_blocks + 1

    @property
    def pruned(self) -> bool:
        return self.up_blocks != self.num_res_blocks + 1 or not self.middle_block

    def depth(self, level: int) -> int:
        """Transformer blocks in the spatial transformers of `level`; -1 is the middle block."""
        return self.level_depths[level] if self.level_depths else self.transformer_depth

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        if self.head_dim:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads


UNET_PRESETS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    "sd15-inpaint": UNetConfig(in_channels=9),
    "sd21": UNetConfig(head_dim=64, context_dim=1024, linear_projection=True),
    "sd2-inpaint": UNetConfig(in_channels=9, head_dim=64, context_dim=1024, linear_projection=True),
    # SDXL (Podell et al. 2023; sgm's configs): no attention at the first level, 64-channel heads,
    # context = CLIP-L + OpenCLIP bigG penultimate states; y = pooled bigG + 256-wide Fourier features
    # of (original h, w, crop top, left, target h, w), or for the refiner (..., aesthetic score)
    "sdxl-base": UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_levels=(1, 2), head_dim=64,
                            context_dim=2048, level_depths=(0, 2, 10), linear_projection=True,
                            adm_in_channels=2816),
    "sdxl-refiner": UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), head_dim=64,
                               context_dim=1280, transformer_depth=4, linear_projection=True,
                               adm_in_channels=2560),
    # SDXL's shape at test size, as diffusers' own SDXL tests build it: (DownBlock2D, CrossAttnDownBlock2D),
    # transformer depths (1, 2), context 32 + 32, y = 32 pooled + 6 × 8 Fourier features
    "sdxl-tiny": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), head_dim=16,
                            context_dim=64, transformer_depth=2, linear_projection=True, adm_in_channels=80,
                            groups=8),
    # tiny shapes for tests: two levels, one transformer level, small groups
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       num_heads=2, context_dim=32, groups=8),
}


class ResBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm/SiLU and the timestep embedding added between them."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in_layers then out_layers, written out so that without autograd SiLU and the sums run in
        # place and the first conv's output dies once the second norm has read it (SDXL at 1024²:
        # one 960-channel map fewer, 126 MB); the numbers are the same (silu_ is silu, a + b is b + a)
        inplace = not torch.is_grad_enabled()
        norm1, _, conv1 = self.in_layers
        norm2, _, dropout, conv2 = self.out_layers
        h = conv1(F.silu(norm1(x), inplace=inplace))
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = norm2(h.add_(e) if inplace else h + e)
        h = conv2(dropout(F.silu(h, inplace=inplace)))
        skip = self.skip_connection(x)
        return h.add_(skip) if inplace else skip + h


class TimestepEmbedSequential(nn.ModuleList):
    """A sequence of layers, each given what it needs: ResBlocks the embedding, transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """The U-Net's way down: time embedding, ldm's `label_emb` (SDXL's y), input blocks and middle
    block. The U-Net adds the way up; a ControlNet (marble.models.controlnet) is a trainable copy of
    exactly this part, so both build it here, under the same module names."""

    def _build_encoder(self, c: UNetConfig) -> list[int]:
        """Create the encoder's modules in the U-Net's order; returns the skip channels (one per input block)."""
        self.encoder_config = c
        ch = c.model_channels
        emb_dim = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        if c.adm_in_channels:
            # ldm's label_emb for adm_in_channels: Sequential(Sequential(Linear, SiLU, Linear))
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        conv_in = nn.Conv2d(c.in_channels + 2 * c.coord_channels, ch, 3, padding=1)   # + x, y coordinates (CoordConv)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([conv_in])])
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * c.model_channels, c.groups, c.dropout)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(transformer(c, ch, level))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        # without a middle block this is an empty sequence: the identity
        self.middle_block = TimestepEmbedSequential([
            ResBlock(ch, emb_dim, ch, c.groups, c.dropout), transformer(c, ch, -1),
            ResBlock(ch, emb_dim, ch, c.groups, c.dropout)] if c.middle_block else [])
        return skip_channels

    def _embedding(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The time embedding of t (B,) or a single t, plus label_emb(y) for models with vector conditioning."""
        dtype = compute_dtype(self.time_embed[0])
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        c = self.encoder_config
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(dtype))
        if (y is None) != (not c.adm_in_channels):
            raise ValueError(f"this U-Net takes a vector y of width {c.adm_in_channels}"
                             if y is None else "this U-Net takes no vector conditioning y")
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb


def transformer(c: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    heads, dim = c.heads_and_dim(channels)
    return SpatialTransformer(channels, heads, dim, c.context_dim, c.depth(level),
                              c.linear_projection, c.groups, c.dropout, c.attention_position)


class UNet(UNetEncoder):
    """network(x, t, context, concat=None, y=None, control=None) -> prediction; x (B, C, h, w), t (B,)
    timesteps (fractional allowed), context (B, T, context_dim). `concat` holds extra input channels
    joined to x after the denoiser's input scaling (ldm's c_concat: mask + masked-image latent for
    9-channel inpainting U-Nets); `y` (B, adm_in_channels) is ldm's vector conditioning, embedded by
    `label_emb` and added to the time embedding (SDXL's pooled text and size conditioning).
    `control` (ControlNet, Zhang et al. 2023): one residual per input block, then one for the middle
    block, added to the skip connections and to the middle block's output (cldm's ControlledUnetModel)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = c.model_channels * 4
        skip_channels = self._build_encoder(c)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        self.unused_skips: list[int] = []       # after each output block's skip: the skips it leaves unused
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.up_blocks):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * c.model_channels, c.groups, c.dropout)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(transformer(c, ch, level))
                last = i == c.up_blocks - 1
                if level and last:
                    layers.append(Upsample(ch))
                unused = c.num_res_blocks + 1 - c.up_blocks if last else 0
                del skip_channels[len(skip_channels) - unused:]
                self.unused_skips.append(unused)
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(normalization(ch, c.groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1)))

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def start(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, concat: torch.Tensor | None,
              y: torch.Tensor | None, control: list[torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every block reads: the input with its extra channels, the embedding and the context,
        in the network's dtype (also the start of DeepCache's shallow pass, marble.models.deepcache)."""
        x = x.to(compute_dtype(self.time_embed[0]))   # samplers keep float32 state; the network runs in its own dtype
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if self.config.coord_channels:
            x = torch.cat([x, coordinate_channels(x)], dim=1)
        emb = self._embedding(t, y, x.shape[0])
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control takes {len(self.input_blocks) + 1} residuals, got {len(control)}")
        return x, emb, context.to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                concat: torch.Tensor | None = None, y: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        x, emb, context = self.start(x, t, context, concat, y, control)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            skips = [s + r.to(s.dtype) for s, r in zip(skips, control)]
            h = h + control[-1].to(h.dtype)
        for block, unused in zip(self.output_blocks, self.unused_skips):
            h = torch.cat([h, skips.pop()], dim=1)
            del skips[len(skips) - unused:]
            # upsample to the next skip's size, so latent sides need not be multiples of 2^levels
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
