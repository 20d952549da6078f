"""Block removal (BK-SDM): a pruned U-Net is the teacher's own modules minus the removed ones, run in
the teacher's order; checked against a forward written out here, over the teacher's modules."""
import pytest
import torch

from marble.errors import ConfigError
from marble.models.layers import SpatialTransformer, Upsample
from marble.models.unet import ResBlock, UNet, UNetConfig
from marble.train.block_removal import copy_kept, pruned_config, pruned_model

# three levels, one ResBlock each on the way down (two up), transformers everywhere: the built-in
# model's layout at test size
TEACHER = UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                     num_heads=2, context_dim=24, groups=8)


def by_hand(teacher: UNet, x, t, context, up_blocks: int, middle: bool, attention: set[int]):
    """The pruned network over the teacher's modules: skip transformers off `attention` (the middle
    block's stays), the middle block when not `middle`, and all but the first `up_blocks` decoder blocks of each level, whose
    upsampler (held by the teacher's last block of the level) still runs after the kept ones."""
    c = teacher.config
    x, emb, context = teacher.start(x, t, context, None, None, None)

    def run(layers, h, level, size=None):
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context) if level in attention or level == -1 else h
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h

    skips, h = [], x
    levels_down = [0]
    for level in range(len(c.channel_mult)):
        levels_down += [level] * (c.num_res_blocks + (level < len(c.channel_mult) - 1))
    for block, level in zip(teacher.input_blocks, levels_down):
        h = run(block, h, level)
        skips.append(h)
    if middle:
        h = run(teacher.middle_block, h, -1)     # the middle block keeps its transformer
    per_level = c.num_res_blocks + 1
    for i, level in enumerate(reversed(range(len(c.channel_mult)))):
        blocks = teacher.output_blocks[i * per_level:(i + 1) * per_level]
        for j in range(up_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            h = run([m for m in blocks[j] if not isinstance(m, Upsample)], h, level)
        del skips[len(skips) - (per_level - up_blocks):]
        if level:
            h = run([m for m in blocks[-1] if isinstance(m, Upsample)], h, level, skips[-1].shape[-2:])
    return teacher.out(h)


@pytest.mark.parametrize("spec", [
    {"decoder_blocks": 1},
    {"middle_block": False},
    {"attention_levels": [1, 2]},
    {"decoder_blocks": 1, "middle_block": False, "attention_levels": [1, 2]},
    {"decoder_blocks": 1, "attention_levels": []},
])
def test_a_pruned_unet_is_the_teachers_modules_without_the_removed_ones(spec):
    torch.manual_seed(0)
    teacher = UNet(TEACHER).eval()
    for p in teacher.parameters():    # zero-initialised output convs would hide a wrong copy
        torch.nn.init.normal_(p, std=0.1)
    student = UNet(pruned_config(TEACHER, spec)).eval()
    copy_kept(teacher, student)
    x, t, context = torch.randn(2, 4, 12, 12), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = by_hand(teacher, x, t, context, spec.get("decoder_blocks", 2), spec.get("middle_block", True),
                           set(spec.get("attention_levels", [0, 1, 2])))
        assert torch.equal(student(x, t, context), expected)
        assert not torch.equal(teacher(x, t, context), expected)
    assert student.config.pruned == ("decoder_blocks" in spec or "middle_block" in spec)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_removing_nothing_copies_the_whole_teacher():
    torch.manual_seed(1)
    teacher = UNet(TEACHER)
    student = UNet(pruned_config(TEACHER, {"decoder_blocks": 2, "middle_block": True}))
    copy_kept(teacher, student)
    assert not student.config.pruned and student.config == TEACHER
    a, b = teacher.state_dict(), student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_pruned_model_keeps_the_vae_and_text_encoder_and_round_trips_through_a_file(tmp_path):
    from marble.checkpoints.checkpoint import from_model
    from marble.checkpoints.marble_format import write_marble
    from marble.checkpoints.resolve import load_model, random_model
    model = random_model()
    cut = pruned_model(model, {"decoder_blocks": 1, "middle_block": False})
    assert cut.text_encoder is model.text_encoder
    assert all(torch.equal(a, b) for a, b in zip(cut.vae.state_dict().values(), model.vae.state_dict().values()))
    assert len(cut.unet.output_blocks) == 2 and len(cut.unet.middle_block) == 0
    path = write_marble(from_model(cut), tmp_path / "cut.safetensors")
    loaded = load_model(str(path)).model
    assert loaded.config.unet == cut.config.unet
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 4, model.config.unet.context_dim)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, context), cut.unet(x, t, context))


@pytest.mark.parametrize("spec, words", [
    ({}, "table of removals"),
    ({"decoders": 1}, "unknown keys in model.student: decoders"),
    ({"decoder_blocks": 0}, "from 1 to 2"),
    ({"decoder_blocks": 3}, "from 1 to 2"),
    ({"decoder_blocks": True}, "from 1 to 2"),
    ({"middle_block": "no"}, "true or false"),
    ({"attention_levels": [0, 3]}, "some of the teacher's [0, 1, 2]"),
    ({"attention_levels": 1}, "some of the teacher's"),
])
def test_bad_student_tables_name_the_key(spec, words):
    with pytest.raises(ConfigError) as e:
        pruned_config(TEACHER, spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_unet_config_refuses_decoder_blocks_it_cannot_build():
    with pytest.raises(ValueError, match="decoder_blocks must be 1 to 2"):
        UNetConfig(num_res_blocks=1, decoder_blocks=3)
    assert UNetConfig(num_res_blocks=1).up_blocks == 2 and not UNetConfig().pruned


def test_deepcache_and_diffusers_export_refuse_a_pruned_unet():
    from marble.checkpoints.diffusers_folder import unet_config_to_diffusers
    from marble.checkpoints.resolve import random_model
    from marble.models.deepcache import deepcache_denoiser
    cut = pruned_model(random_model(), {"decoder_blocks": 1})
    with pytest.raises(ValueError, match="DeepCache needs the U-Net's whole decoder"):
        deepcache_denoiser(cut, torch.tensor([1.0, 0.5]), 2)
    with pytest.raises(ValueError, match="pruned"):
        unet_config_to_diffusers(cut.config.unet, 8)


def test_a_request_for_deepcache_on_a_cut_model_is_refused_before_it_runs():
    from marble.checkpoints.resolve import LoadedModel, random_model
    from marble.pipeline import Pipeline
    from marble.request import GenerationRequest, RequestError, resolve
    whole = Pipeline(LoadedModel(random_model(), "whole", ""))
    cut = Pipeline(LoadedModel(pruned_model(random_model(), {"middle_block": False}), "cut", ""))
    assert whole.defaults.whole_decoder and not cut.defaults.whole_decoder
    assert resolve(GenerationRequest(prompt="a red square", deepcache=2), whole.defaults).deepcache == 2
    with pytest.raises(RequestError, match="DeepCache needs the U-Net's whole decoder"):
        resolve(GenerationRequest(prompt="a red square", deepcache=2), cut.defaults)
    assert resolve(GenerationRequest(prompt="a red square", tome=0.5), cut.defaults).tome == 0.5
