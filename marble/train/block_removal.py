"""A smaller U-Net cut from a trained one: block removal (BK-SDM; Kim et al. 2023, "BK-SDM: A
Lightweight, Fast, and Cheap Version of Stable Diffusion", §3.1).

The pruned network keeps the teacher's input blocks, and optionally drops its middle block, one or
more decoder blocks per level (each with the shallower skip it would have read), and the spatial
transformers of chosen levels. Every module it keeps starts from the teacher's weights at the same
place; distillation (`marble train lcm`, `student`) then heals what the removal broke.

student table (all optional; absent keys keep the teacher's):
  decoder_blocks    ResBlocks per level on the way up, 1 to num_res_blocks + 1
  middle_block      false: no middle block (BK-SDM-Small)
  attention_levels  the levels that keep their transformers: a subset of the teacher's
"""
from __future__ import annotations

from torch import nn

from marble.config import config_from_dict, config_to_dict
from marble.errors import ConfigError
from marble.models.latent_diffusion import LatentDiffusion
from marble.models.layers import SpatialTransformer, Upsample
from marble.models.unet import UNet, UNetConfig

STUDENT_KEYS = {"decoder_blocks", "middle_block", "attention_levels"}


def pruned_config(teacher: UNetConfig, spec: dict) -> UNetConfig:
    """The teacher's config with the student table's removals (ConfigError for anything else)."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("model.student must be a table of removals: "
                          f"{', '.join(sorted(STUDENT_KEYS))}")
    unknown = set(spec) - STUDENT_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in model.student: {', '.join(sorted(unknown))} "
                          f"(it takes {', '.join(sorted(STUDENT_KEYS))})")
    if not isinstance(teacher, UNetConfig):
        raise ConfigError("model.student removes U-Net blocks; this teacher's denoiser is not a U-Net")
    blocks = spec.get("decoder_blocks", teacher.up_blocks)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= teacher.up_blocks:
        raise ConfigError(f"model.student.decoder_blocks must be an integer from 1 to {teacher.up_blocks}, not {blocks!r}")
    middle = spec.get("middle_block", teacher.middle_block)
    if not isinstance(middle, bool) or (middle and not teacher.middle_block):
        raise ConfigError(f"model.student.middle_block must be true or false (and false if the teacher has none), "
                          f"not {middle!r}")
    levels = spec.get("attention_levels", list(teacher.attention_levels))
    if not isinstance(levels, list) or not set(levels) <= set(teacher.attention_levels) \
            or any(isinstance(v, bool) or not isinstance(v, int) for v in levels):
        raise ConfigError(f"model.student.attention_levels must list some of the teacher's "
                          f"{list(teacher.attention_levels)}, not {levels!r}")
    blocks = 0 if blocks == teacher.num_res_blocks + 1 else blocks      # 0: the whole decoder, as the teacher writes it
    return config_from_dict(UNetConfig, {**config_to_dict(teacher), "decoder_blocks": blocks,
                                         "middle_block": middle, "attention_levels": sorted(levels)},
                            "model.student")


def _copy_by_kind(sources: list[nn.Module], block: nn.Module) -> None:
    """Each layer of `block` loads the next unused source layer of its own kind."""
    for layer in block:
        kind = type(layer)
        source = next(i for i, s in enumerate(sources) if type(s) is kind)
        layer.load_state_dict(sources.pop(source).state_dict())


def copy_kept(teacher: UNet, student: UNet) -> None:
    """Load into `student` (a pruned_config of the teacher's) the teacher's weights of every module it
    keeps. The j-th decoder block of a level is the teacher's j-th there; the level's upsampler,
    which the teacher holds in its last block, moves to the student's last."""
    t, s = teacher.config, student.config
    kept = dict(teacher.named_children())
    for name in ("time_embed", "label_emb", "out"):
        if name in kept:
            getattr(student, name).load_state_dict(kept[name].state_dict())
    for mine, theirs in zip(student.input_blocks, teacher.input_blocks, strict=True):
        _copy_by_kind([layer for layer in theirs if _kept_layer(layer, mine)], mine)
    if s.middle_block:
        student.middle_block.load_state_dict(teacher.middle_block.state_dict())
    for level in range(len(t.channel_mult)):
        theirs = teacher.output_blocks[level * t.up_blocks:(level + 1) * t.up_blocks]
        mine = student.output_blocks[level * s.up_blocks:(level + 1) * s.up_blocks]
        upsamplers = [layer for block in theirs for layer in block if isinstance(layer, Upsample)]
        for j, block in enumerate(mine):
            sources = [layer for layer in theirs[j] if not isinstance(layer, Upsample)]
            if j == len(mine) - 1:
                sources += upsamplers
            _copy_by_kind([layer for layer in sources if _kept_layer(layer, block)], block)


def _kept_layer(layer: nn.Module, block: nn.Module) -> bool:
    """Transformers are kept only where the student's block has one."""
    return not isinstance(layer, SpatialTransformer) or any(isinstance(m, SpatialTransformer) for m in block)


def pruned_model(model: LatentDiffusion, spec: dict) -> LatentDiffusion:
    """The model with a pruned U-Net started from its own (copy_kept), sharing its text encoder and
    a copy of its VAE."""
    config = model.config.replace(unet=pruned_config(model.config.unet, spec))
    student = LatentDiffusion(config, text_encoder=model.text_encoder).to(model.device)
    student.vae.load_state_dict(model.vae.state_dict())
    copy_kept(model.unet, student.unet)
    return student
