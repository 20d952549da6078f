"""Tiny Stable-Diffusion-shaped models for the SD tests: marble configs and the same shapes declared
the diffusers way, seeded random weights, and helpers that build diffusers/transformers objects offline."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from marble.models.latent_diffusion import LatentDiffusionConfig
from marble.models.stable_diffusion import SD_SCHEDULE
from marble.models.unet import UNetConfig
from marble.models.vae import VAEConfig

def diffusers_oracle():
    """diffusers, or skip. Its pipelines are imported once through marble's import_diffusers, so the
    transformers advice to install torchvision (which breaks this torch and diffusers) never shows,
    not even in a failing test's captured output."""
    diffusers = pytest.importorskip("diffusers")
    from marble.eval.sd_bench import import_diffusers
    import_diffusers()
    # the oracles' warnings and progress bars only bury a failing test's own output
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    return diffusers


# three levels, attention on the first two, two res blocks per level: every index pattern of SD's U-Net
SD1_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                      num_heads=2, context_dim=32, groups=8)
SD2_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                      head_dim=16, context_dim=32, linear_projection=True, transformer_depth=2, groups=8)
TINY_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, groups=8)
SD1_TEXT = {"preset": "clip-tiny"}
SD2_TEXT = {"preset": "clip-tiny", "activation": "gelu", "pad_id": 0}   # OpenCLIP-style: gelu, pad "!"


def tiny_sd(family: str = "sd1", in_channels: int = 4, prediction: str | None = None) -> LatentDiffusionConfig:
    unet = SD1_UNET if family == "sd1" else SD2_UNET
    if in_channels != 4:
        from dataclasses import replace
        unet = replace(unet, in_channels=in_channels)
    return LatentDiffusionConfig(
        name=f"tiny-{family}", unet=unet, vae=TINY_VAE, text=SD1_TEXT if family == "sd1" else SD2_TEXT,
        schedule=dict(SD_SCHEDULE), prediction=prediction or ("eps" if family == "sd1" else "v"),
        default_width=64, default_height=64, max_pixels=256 * 256, default_sampler="Euler")


def diffusers_unet_kwargs(family: str = "sd1", in_channels: int = 4) -> dict:
    """The shapes of SD1_UNET / SD2_UNET in diffusers' own terms (written independently)."""
    kw = dict(sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 64),
              layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
              norm_num_groups=8)
    if family == "sd1":
        kw.update(attention_head_dim=2)
    else:
        kw.update(attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=2)
    return kw


def diffusers_vae_kwargs() -> dict:
    return dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64)


def clip_text_kwargs(family: str = "sd1") -> dict:
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu" if family == "sd1" else "gelu",
                pad_token_id=49407 if family == "sd1" else 0)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights that exercise every path: variance-preserving normals for matrices, norms near 1,
    small random biases (frameworks zero-initialise some layers and set norms to (1, 0))."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def random_controlnet_file(path: Path, layout: str = "single-file", seed: int = 4) -> Path:
    """A seeded random ControlNet for the tiny-random model (non-zero zero-convs: it changes the
    image), written at `path` in `layout` (marble.checkpoints.controlnet_files)."""
    from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
    from marble.models.controlnet import ControlNet, controlnet_config
    from marble.models.latent_diffusion import tiny_config
    config = controlnet_config(tiny_config().unet, 2)
    net = randomize_(ControlNet(config), seed=seed)
    return write_controlnet(ControlNetFile(config, net.state_dict(), path.parent, "", "marble"), path, layout)


def oracle_tokenizer_folder(folder: Path, pad: str = "<|endoftext|>") -> Path:
    """vocab.json / merges.txt from the shipped gz by OpenAI's recipe, independently of marble's code."""
    from importlib.resources import files
    with (files("marble") / "assets" / "bpe_simple_vocab_16e6.txt.gz").open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": pad}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": pad}),
                                                  encoding="utf-8")
    return folder


# SDXL at test size: diffusers' own SDXL tests' shapes (marble presets sdxl-tiny, sdxl-tiny-text)
def tiny_sdxl(refiner: bool = False) -> LatentDiffusionConfig:
    from dataclasses import replace

    from marble.models.conditioning import VectorConditioning
    from marble.models.unet import UNET_PRESETS
    unet = UNET_PRESETS["sdxl-tiny"]
    vector = VectorConditioning(fourier_dim=8)
    text = {"preset": "sdxl-tiny-text"}
    if refiner:   # bigG-shaped tower alone (context 32), y = 32 pooled + 5 × 8
        unet = replace(unet, context_dim=32, adm_in_channels=72)
        vector = VectorConditioning(micro="aesthetic", fourier_dim=8, zero_empty_negative=False)
        text = {"preset": "sdxl-tiny-refiner-text"}
    return LatentDiffusionConfig(
        name="tiny-sdxl-refiner" if refiner else "tiny-sdxl", unet=unet,
        vae=replace(TINY_VAE, scaling_factor=0.13025, decode_fp32=True), text=text, schedule=dict(SD_SCHEDULE),
        prediction="eps", default_width=64, default_height=64, max_pixels=256 * 256, default_sampler="Euler",
        vector=vector)
