"""TAESD, the tiny autoencoder (Bohan Ollin Boer, madebyollin/taesd; diffusers' AutoencoderTiny).

A distilled stand-in for SD's VAE with the same latent space (the sampler's, already scaled: its
own scaling factor is 1): about 1 M parameters a side, plain 3×3 convolutions and ReLUs, no
attention, no normalisation. Users bring it (taesd for SD1.x/2.x, taesdxl for SDXL) as a fast
preview decoder or a fast final decoder. Module names follow diffusers (`encoder.layers.N`,
`decoder.layers.N`), so a diffusers file loads by key copy; the original repository's
`taesd_decoder` / `taesd_encoder` files number the same Sequential, the decoder one higher (its
index 0 is the clamp, which diffusers applies in forward): `taesd_keys` translates them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    latent_channels: int = 4
    channels: int = 64                                  # every block's width
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)      # blocks after the input conv and each stride-2 conv
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)      # blocks before each 2× upsample and the output
    latent_magnitude: float = 3.0                       # the decoder soft-clamps latents to ±3 (tanh)


class Block(nn.Module):
    """ReLU(conv-relu-conv-relu-conv(x) + x) (diffusers' AutoencoderTinyBlock at equal widths)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


class Encoder(nn.Module):
    def __init__(self, c: TinyAutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, n in enumerate(c.encoder_blocks):
            layers.append(nn.Conv2d(3, c.channels, 3, padding=1) if i == 0
                          else nn.Conv2d(c.channels, c.channels, 3, padding=1, stride=2, bias=False))
            layers += [Block(c.channels) for _ in range(n)]
        layers.append(nn.Conv2d(c.channels, c.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels.add(1).div(2))        # TAESD reads images in [0, 1]


class Decoder(nn.Module):
    def __init__(self, c: TinyAutoencoderConfig):
        super().__init__()
        self.magnitude = c.latent_magnitude
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, c.channels, 3, padding=1), nn.ReLU()]
        for i, n in enumerate(c.decoder_blocks):
            last = i == len(c.decoder_blocks) - 1
            layers += [Block(c.channels) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(c.channels, 3 if last else c.channels, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latent / self.magnitude) * self.magnitude
        return self.layers(x).mul(2).sub(1)             # [0, 1] -> marble's [-1, 1]


class TinyAutoencoder(nn.Module):
    """The codec contract (encode/decode, pixels in [-1, 1]) over the sampler's latents. Either half
    may be absent (a decoder-only file): `encoder` or `decoder` is then None."""

    def __init__(self, config: TinyAutoencoderConfig = TinyAutoencoderConfig(), encoder: bool = True,
                 decoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config) if encoder else None
        self.decoder = Decoder(config) if decoder else None

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.encoder_blocks) - 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("this TAESD file has no encoder")
        return self.encoder(pixels.to(self._dtype()))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError("this TAESD file has no decoder")
        return self.decoder(latent.to(self._dtype()))

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


_ORIGINAL = re.compile(r"(\d+)\.(.+)")


def taesd_keys(keys, part: str | None = None) -> dict[str, str]:
    """File key -> module key. diffusers' keys (`encoder.layers.N.*`, `decoder.layers.N.*`) map to
    themselves; the original repository's (`N.*`, one file a half, `part` = "encoder" | "decoder")
    are numbered as diffusers' Sequential, the decoder's one higher. Other keys are left out (the
    caller refuses a file whose keys do not cover the module)."""
    out = {}
    for key in keys:
        if key.startswith(("encoder.layers.", "decoder.layers.")):
            out[key] = key
        elif part is not None and (m := _ORIGINAL.fullmatch(key)):
            index = int(m.group(1)) - (1 if part == "decoder" else 0)
            out[key] = f"{part}.layers.{index}.{m.group(2)}"
    return out


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> TinyAutoencoderConfig:
    """The widths a file's weights imply (module keys): latent channels and block width. The
    block counts are TAESD's own; a file with others fails the key check."""
    if "decoder.layers.0.weight" in shapes:
        channels, latent = shapes["decoder.layers.0.weight"][:2]
    else:
        channels = shapes["encoder.layers.0.weight"][0]
        last = max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
        latent = shapes[f"encoder.layers.{last}.weight"][0]
    return TinyAutoencoderConfig(latent_channels=int(latent), channels=int(channels))
