"""Token grounding (TokenCompose): caption words and masks of every group, the two losses on
exact cases, the cross-attention hook, and a training run with it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from marble.data.captions import COLOR_SYNONYMS
from marble.data.grounding import MAX_GROUP_TOKENS, group_masks, group_spans, grounding_targets, noun_forms
from marble.data.scene import Obj, Scene
from marble.data.shapes import sample_scene
from marble.models.bert import minilm_folder
from marble.models.layers import SpatialTransformer
from marble.models.tokenizer import WordPieceTokenizer
from marble.models.unet import UNet, UNET_PRESETS
from marble.train.attention_maps import attention_probabilities, cross_attention_maps
from marble.train.grounding_loss import grounding_loss, pool_masks

TOKENIZER = WordPieceTokenizer.from_folder(minilm_folder()).tokenizer


def offsets(text):
    return TOKENIZER.encode(text).offsets


# ---- data: which tokens name which group, and where the group is

@pytest.mark.parametrize("split", ["train", "heldout", "concept"])
def test_every_named_group_gets_its_noun_and_colour_tokens(split):
    kinds_seen = set()
    for i in range(250):
        scene, caption = sample_scene(split, 7, i)
        masks, tokens = grounding_targets(scene, caption, offsets, 16, 32)
        encoding = TOKENIZER.encode(caption)
        spans = group_spans(scene, caption)
        generic = not any(spans)
        for g, group in enumerate(scene.groups):
            obj = scene.objects[group[0]]
            row = [int(t) for t in tokens[g] if t >= 0]
            assert masks[g].any()
            if generic:      # "a shape", "a colourful picture": nothing to ground
                assert row == []
                continue
            kinds_seen.add(scene.kind)
            # the tokens spell the group's noun (any synonym, plural when the group has several),
            # preceded by its colour word when the caption states it
            text = " ".join(caption[a:b] for a, b in spans[g])
            pieces = "".join(encoding.tokens[t].removeprefix("##") for t in row)
            assert pieces == "".join(caption[a:b] for a, b in sorted(spans[g]))
            nouns = {" ".join(f) for f in noun_forms(obj.shape, len(group))}
            colours = COLOR_SYNONYMS.get(obj.color, (obj.color,))
            assert text in nouns or any(text == f"{n} {c}" for n in nouns for c in colours), (caption, text)
            assert 0 < len(row) <= MAX_GROUP_TOKENS and all(0 < t < 31 for t in row)
            # two / relation captions always state both colours; single / count ones state it
            # unless they leave it out, and a background's "pale blue" is not the shape's colour
            words = caption.split()
            stated = any(w in colours and (j == 0 or words[j - 1] != "pale") for j, w in enumerate(words))
            found = text not in nouns
            assert found == stated, (caption, text)
            if scene.kind in ("two", "relation"):
                assert stated
        assert (tokens[len(scene.groups):] == -1).all() and not masks[len(scene.groups):].any()
    assert kinds_seen == {"single", "count", "two", "relation"}


def test_colour_words_count_only_in_front_of_their_noun():
    blue = Obj("blue", "cross", "small", (16.0, 16.0), (9.0, 9.0, 23.0, 23.0))
    scene = Scene((blue,), "pale blue", "single", 64, ((0,),))
    for caption, words in [("a plus sign on a pale blue background", ["plus", "sign"]),
                           ("a blue plus sign on a pale blue background", ["plus", "sign", "blue"]),
                           ("a small blue cross", ["cross", "blue"]), ("a shape", [])]:
        spans = group_spans(scene, caption)[0]
        assert [caption[a:b] for a, b in spans] == words


def test_group_masks_pool_the_silhouettes_by_any_pixel():
    # a 14-px square with its box at x 8..22, y 40..54 of a 64-px image: 4-px cells 2..5 x 10..13
    sq = Obj("red", "square", "small", (15.0, 47.0), (8.0, 40.0, 22.0, 54.0))
    scene = Scene((sq,), "white", "single", 64, ((0,),))
    m = group_masks(scene, 16)[0]
    assert set(zip(*np.nonzero(m))) == {(y, x) for y in range(10, 14) for x in range(2, 6)}
    assert (pool_masks(torch.from_numpy(m)[None, None], 8)[0, 0].numpy() == group_masks(scene, 8)[0]).all()


# ---- the losses, on exact cases

def _probs(token_in, token_out, n=16, t=4, heads=2, batch=1):
    """Logits whose softmax gives token 1 all of the attention at the pixels of token_in and none
    at token_out (other tokens share the rest)."""
    logits = torch.zeros(batch, heads, n, t)
    logits[:, :, token_out, 1] = -float("inf")
    logits[:, :, token_in, 0] = -float("inf")
    logits[:, :, token_in, 2:] = -float("inf")
    return logits.softmax(-1)


def test_token_loss_is_zero_inside_and_one_outside_the_mask():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2] = True                                  # pixels 0..7
    tokens = torch.tensor([[[1, -1, -1]]])
    inside = _probs(list(range(8)), list(range(8, 16)))
    outside = _probs(list(range(8, 16)), list(range(8)))
    token, pixel = grounding_loss([inside], mask, tokens)
    assert token.item() == 0.0 and pixel.item() == 0.0    # the map is the mask itself
    token, _ = grounding_loss([outside], mask, tokens)
    assert token.item() == 1.0
    # three quarters of the token's attention mass inside: (1 - 3/4)^2
    probs = torch.full((1, 1, 16, 4), 0.3)
    probs[0, 0, :, 1] = torch.tensor([0.3] * 8 + [0.1] * 8)
    token, _ = grounding_loss([probs], mask, tokens)
    assert token.item() == pytest.approx((1 - 2.4 / 3.2) ** 2, abs=1e-7)


def test_unnamed_groups_and_layers_average_as_documented():
    torch.manual_seed(0)
    probs = [torch.randn(2, 2, 16, 5).softmax(-1) for _ in range(2)]
    masks = torch.rand(2, 2, 4, 4) > 0.5
    tokens = torch.tensor([[[1, 2], [3, -1]], [[4, -1], [-1, -1]]])
    token, pixel = grounding_loss(probs, masks, tokens)
    # by hand: per (sample, group) the mean over its tokens of (1 - mean over heads of the share)^2,
    # mean over layers; the pixel BCE of the summed token maps averaged over heads and layers
    terms, bces = [], []
    for b, g in [(0, 0), (0, 1), (1, 0)]:
        m = masks[b, g].reshape(-1).float()
        toks = [t for t in tokens[b, g].tolist() if t >= 0]
        per_layer = [np.mean([(1 - (p[b, :, :, t] * m).sum(-1).div(p[b, :, :, t].sum(-1)).mean()).item() ** 2
                              for t in toks]) for p in probs]
        terms.append(np.mean(per_layer))
        avg = sum(p[b].mean(0) for p in probs) / len(probs)
        q = avg[:, toks].sum(-1)
        bces.append(-(m * q.log() + (1 - m) * (1 - q).log()).mean().item())
    assert token.item() == pytest.approx(np.mean(terms), rel=1e-6)
    assert pixel.item() == pytest.approx(np.mean(bces), rel=1e-6)
    none = grounding_loss(probs, masks, torch.full_like(tokens, -1))
    assert none[0].item() == 0.0 and none[1].item() == 0.0


def test_gradients_reach_the_attention_logits():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 16, 6, dtype=torch.double, requires_grad=True)
    masks = torch.rand(2, 2, 4, 4) > 0.5
    tokens = torch.tensor([[[1, 2], [3, -1]], [[4, -1], [5, 2]]])
    token, pixel = grounding_loss([logits.softmax(-1)], masks, tokens)
    (token + pixel).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
    assert torch.autograd.gradcheck(lambda z: grounding_loss([z.softmax(-1)], masks, tokens), (logits.detach().requires_grad_(),))


# ---- the hook: the U-Net's own probabilities, only inside the context

def _unet():
    torch.manual_seed(0)
    return UNet(UNET_PRESETS["tiny"])


def test_hook_records_the_probabilities_sdpa_used_and_changes_nothing():
    unet = _unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 7, 32)
    plain = unet(x, t, ctx)
    with cross_attention_maps(unet, {(4, 4)}) as maps:
        hooked = unet(x, t, ctx)
    assert torch.equal(plain, hooked)
    assert len(maps[(4, 4)]) == 4 and maps[(4, 4)][0].shape == (2, 2, 16, 7)   # down, middle, two up
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    # the recorded probabilities reproduce each attention's output through its values
    block = next(m for m in unet.modules() if isinstance(m, SpatialTransformer)).transformer_blocks[0]
    seen = {}
    handle = block.attn2.register_forward_hook(lambda m, a, out: seen.update(x=a[0], ctx=a[1], out=out))
    unet(x, t, ctx)
    handle.remove()
    attn = block.attn2
    p = attention_probabilities(attn, seen["x"], seen["ctx"])
    v = attn.to_v(seen["ctx"]).reshape(2, 7, attn.heads, -1).transpose(1, 2)
    out = attn.to_out((p @ v).transpose(1, 2).reshape(2, 16, -1))
    assert torch.allclose(out, seen["out"], atol=1e-6)


def test_grounding_gradients_reach_the_cross_attention_weights():
    unet = _unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 7, 32)
    with cross_attention_maps(unet, {(4, 4)}) as maps:
        unet(x, t, ctx)
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[:, 0, :2, :2] = True
    token, pixel = grounding_loss(maps[(4, 4)], masks, torch.tensor([[[2, 3]], [[1, -1]]]))
    (token + pixel).backward()
    last = [m for m in unet.modules() if isinstance(m, SpatialTransformer)][-1].transformer_blocks[0].attn2
    assert last.to_q.weight.grad.abs().sum() > 0 and last.to_k.weight.grad.abs().sum() > 0
    assert last.to_v.weight.grad is None      # the last map does not depend on its own values ...
    earlier = unet.output_blocks[0][1].transformer_blocks[0].attn2
    assert earlier.to_v.weight.grad.abs().sum() > 0   # ... but the later maps read the earlier layers' outputs


# ---- configuration

def test_grounding_config_is_checked_before_training():
    from marble.errors import ConfigError
    from marble.train.grounding import grounding_config, grounding_term
    assert not grounding_config({}).on and grounding_config({"pixel_weight": 0.5}).on
    for bad in ({"token_weight": -1}, {"token_weight": True}, {"levels": []}, {"levels": [-1]}, {"level": [0]}, 3):
        with pytest.raises(ConfigError):
            grounding_config(bad)
    masks, tokens = torch.zeros(4, 2, 8, 8, dtype=torch.bool), torch.full((4, 2, 6), -1)
    grounding_term(grounding_config({"token_weight": 1, "levels": [1]}), _unet(), masks, tokens)
    for levels in ([0], [4]):     # tiny: cross-attention at level 1 only; level 4 is finer than a cell
        with pytest.raises(ConfigError):
            grounding_term(grounding_config({"token_weight": 1, "levels": levels}), _unet(), masks, tokens)
    from marble.train.config import DataConfig, TrainConfig
    from marble.train.grounding import cached_grounding
    with pytest.raises(ConfigError, match="shapes world"):     # an image folder has no masks
        cached_grounding(TrainConfig(data=DataConfig(world=None, folder="photos")), None, None, {}, 8)


# ---- training with it

CONFIG = """
kind = "diffusion"
run_dir = "{run_dir}"
steps = 2
batch = 4
seed = 3
checkpoint_every = 10
log_every = 1
threads = 1

[model]
name = "test"
unet = {{preset = "tiny"}}
vae = {{preset = "tiny", seed = 0}}
text = {{preset = "minilm-l6", pretrained = false, layers = 1, width = 32, heads = 2, mlp_dim = 64, max_tokens = 16}}
prediction = "v"
{grounding}
"""

DATA_AND_OPTIM = """
[data]
world = "shapes"
n = 8
size = 16
caption_dropout = 0.25

[optim]
lr = 1e-3
warmup = 1
"""
CONFIG += DATA_AND_OPTIM


def _run(kind: str, config: Path) -> Path:
    out = subprocess.run([sys.executable, "-m", "marble", "train", kind, str(config)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return config.with_suffix("")


def _train(tmp: Path, name: str, grounding: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(run_dir=tmp / name, grounding=grounding))
    return _run("diffusion", path)


def test_training_with_grounding_logs_its_terms_and_moves_the_weights(tmp_path):
    off = _train(tmp_path, "off", "")
    zero = _train(tmp_path, "zero", "grounding = {token_weight = 0, pixel_weight = 0, levels = [1]}")
    on = _train(tmp_path, "on", "grounding = {token_weight = 1.0, pixel_weight = 0.1, levels = [1]}")
    a, z, b = (load_file(d / "model.safetensors") for d in (off, zero, on))
    assert all(torch.equal(a[k], z[k]) for k in a)            # weights 0 is the plain recipe
    assert not (off / "cache" / "grounding.safetensors").exists() and not (zero / "cache" / "grounding.safetensors").exists()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet."))
    log = [json.loads(line) for line in (on / "loss.jsonl").read_text().splitlines()]
    assert all(r["token"] > 0 and r["pixel"] > 0 and r["loss"] > r["denoise"] for r in log)
    with safe_open(on / "cache" / "grounding.safetensors", "pt") as f:
        meta = f.metadata()
        assert "key" in meta and meta["format"].startswith("grounding targets v1")
        assert f.get_tensor("masks").shape == (8, 2, 8, 8) and f.get_tensor("tokens").shape == (8, 2, MAX_GROUP_TOKENS)


LCM = """
kind = "lcm"
run_dir = "{run_dir}"
steps = 2
batch = 4
seed = 5
checkpoint_every = 10
log_every = 1
threads = 1
ema_decay = 0.95

[model]
init = "{init}"
guidance = 3.0
{grounding}
"""
LCM += DATA_AND_OPTIM


def test_lcm_distillation_with_grounding_logs_its_terms_and_zero_weights_change_nothing(tmp_path):
    teacher = _train(tmp_path, "teacher", "") / "model.safetensors"

    def distil(name, grounding):
        path = tmp_path / f"{name}.toml"
        path.write_text(LCM.format(run_dir=tmp_path / name, init=teacher, grounding=grounding))
        return _run("lcm", path)
    off = distil("off", "")
    zero = distil("zero", "grounding = {token_weight = 0, pixel_weight = 0, levels = [1]}")
    on = distil("on", "grounding = {token_weight = 1.0, pixel_weight = 0.1, levels = [1]}")
    a, z, b = (load_file(d / "model.safetensors") for d in (off, zero, on))
    assert all(torch.equal(a[k], z[k]) for k in a)
    assert not (zero / "cache" / "grounding.safetensors").exists()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet."))
    log = [json.loads(line) for line in (on / "loss.jsonl").read_text().splitlines()]
    assert all(r["token"] > 0 and r["pixel"] > 0 and r["loss"] > r["denoise"] for r in log)
    # the first step starts from the teacher's weights in both runs, so its distillation term is the plain run's loss
    plain = [json.loads(line) for line in (off / "loss.jsonl").read_text().splitlines()]
    assert log[0]["denoise"] == pytest.approx(plain[0]["loss"], rel=1e-6)
    bad = tmp_path / "bad.toml"
    bad.write_text(LCM.format(run_dir=tmp_path / "bad", init=teacher, grounding="grounding = {token_weight = -1}"))
    out = subprocess.run([sys.executable, "-m", "marble", "train", "lcm", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "token_weight" in out.stderr and "Traceback" not in out.stderr
