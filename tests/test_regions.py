"""Regions (marble.adapters.regions): colour phrases and their tokens, the sketch's colour masks,
Dense Diffusion's modulation against its formula, the biased attention against SDPA, and
`--regions` through the request, the record and the CLI."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from marble.adapters.regions import (Region, color_masks, color_phrases, level_grid, modulation, phrase_tokens,
                                     region_attention, sketch_regions, transformer_blocks)
from marble.cli import app
from marble.data.grounding import group_spans, token_indices
from marble.data.shapes import COLORS, sample_scene
from marble.data.sketch import sketch
from marble.models.latent_diffusion import tiny_config
from marble.models.layers import CrossAttention
from marble.png import read_record
from marble.record import GenerationRecord
from sd_fixtures import random_controlnet_file

runner = CliRunner()


def phrases(prompt):
    return [(color, prompt[a:b]) for color, (a, b) in color_phrases(prompt)]


def test_colour_phrases_run_from_the_colour_word_to_its_noun():
    assert phrases("a red circle above a blue square") == [("red", "red circle"), ("blue", "blue square")]
    assert phrases("two small violet plus signs to the left of a pink star") == [
        ("purple", "violet plus signs"), ("pink", "pink star")]
    assert phrases("a red circle on a blue background") == [("red", "red circle")]   # a background is no region
    assert phrases("Red, then green") == [("red", "Red,"), ("green", "green")]
    assert phrases("a teal circle") == []


def test_phrase_tokens_are_the_tokenizers_own_positions():
    """Oracle: the WordPiece offsets the grounding trainer uses (marble.data.grounding), for the
    colour + noun of every group of 200 shapes-world captions, with the built-in text encoder."""
    from marble.checkpoints.resolve import load_model
    text = load_model("builtin").model.text_encoder
    tokenizer = text.tokenizer.tokenizer
    checked = 0
    for i in range(200):
        scene, caption = sample_scene("train", 0, i, 64)
        starts = {span[0]: (color, span) for color, span in color_phrases(caption)}
        for group, words in zip(scene.groups, group_spans(scene, caption)):
            if len(words) < 2:                   # no colour word in front of this noun (its span comes last)
                continue
            color, span = starts[words[-1][0]]
            assert color == scene.objects[group[0]].color
            want = token_indices(words, tokenizer.encode(caption).offsets, text.max_tokens)
            assert list(phrase_tokens(text.count_tokens, caption, span, text.max_tokens)) == want, caption
            checked += 1
    assert checked > 100


def test_phrase_tokens_with_clips_tokenizer():
    """With CLIP's BPE (SD models): the ids at the phrase's positions in the whole prompt's tokens are
    the phrase's own ids, and its positions follow [BOS] and the prefix's tokens."""
    from marble.checkpoints.resolve import load_model
    text = load_model("tiny-random").model.text_encoder
    prompt = "a red circle above two violet plus signs and a yellowish star"
    ids = text.tokenizer.encode(prompt)
    found = {}
    for color, span in color_phrases(prompt):
        positions = phrase_tokens(text.count_tokens, prompt, span, text.max_tokens)
        assert [ids[i] for i in positions] == text.tokenizer.encode(prompt[span[0]:span[1]])[1:-1]
        found[prompt[span[0]:span[1]]] = positions
    assert found == {"red circle": (2, 3), "violet plus signs": (6, 7, 8)}   # "yellowish" is no colour word


def test_colour_masks_take_the_nearest_palette_colour_within_tolerance():
    im = Image.new("RGB", (4, 2), (255, 255, 255))
    im.putpixel((0, 0), COLORS["red"])
    im.putpixel((1, 0), tuple(c + 12 for c in COLORS["blue"]))       # anti-aliased edge: still blue
    im.putpixel((2, 0), (128, 128, 128))                              # far from every colour: none
    masks = color_masks(im)
    assert set(masks) == {"red", "blue"}
    assert masks["red"].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]] and masks["blue"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]


def test_level_grid():
    assert level_grid((16, 16), 256) == (16, 16) and level_grid((16, 16), 16) == (4, 4)
    assert level_grid((9, 13), 35) == (5, 7) and level_grid((9, 13), 12) == (3, 4)   # halved by ceil
    with pytest.raises(ValueError):
        level_grid((16, 16), 50)


def by_hand(scores, push, pull):
    """Dense Diffusion's modulation of scores (heads, N, T) by loops: pull(n, j) is 1 (raise toward the
    row's max), 0 (lower toward its min) or None (untouched); push = λ (1 − a)."""
    want = scores.clone()
    for h in range(scores.shape[0]):
        for n in range(scores.shape[1]):
            s = scores[h, n]
            for j in range(scores.shape[2]):
                m = pull(n, j)
                if m is not None:
                    want[h, n, j] = s[j] + push * (m * (s.max() - s[j]) - (1 - m) * (s[j] - s.min()))
    return want


def test_the_modulation_is_dense_diffusions_formula():
    """A 2x2 grid, 4 tokens; a region over the top row bound to tokens 1 and 2. By hand: S' = S +
    λ (1 − a) [m (max S − S) − (1 − m)(S − min S)] on tokens 1, 2; tokens 0, 3 and λ = 0 rows unchanged."""
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    modulate = modulation([Region("red", mask, (1, 2))], (2, 2))
    scores = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = modulate(scores, torch.tensor([0.0, 0.7]))
    assert torch.equal(out[0], scores[0])
    want = by_hand(scores[1], 0.7 * 0.5, lambda n, j: (1.0 if n < 2 else 0.0) if j in (1, 2) else None)
    assert torch.allclose(out[1], want, atol=1e-6)
    # the phrase's share of each query's attention: up inside the region, down outside it
    share, before = out[1].softmax(-1)[..., 1:3].sum(-1), scores[1].softmax(-1)[..., 1:3].sum(-1)
    assert (share[:, :2] > before[:, :2]).all() and (share[:, 2:] < before[:, 2:]).all()


def test_the_self_attention_modulation_is_dense_diffusions_formula():
    """A 2x2 grid: one region over the top row (share 1/2), the background the bottom row. Cells of
    one segment pull each other (M = 1), cells of different segments push apart; λ = 0 rows unchanged."""
    from marble.adapters.regions import self_modulation
    modulate = self_modulation([Region("red", torch.tensor([[1.0, 1.0], [0.0, 0.0]]), (1,))], (2, 2))
    scores = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    out = modulate(scores, torch.tensor([0.0, 0.4]))
    assert torch.equal(out[0], scores[0])
    want = by_hand(scores[1], 0.4 * 0.5, lambda i, j: 1.0 if (i < 2) == (j < 2) else 0.0)
    assert torch.allclose(out[1], want, atol=1e-6)


def test_biased_attention_with_no_bias_is_sdpa():
    torch.manual_seed(0)
    layer = CrossAttention(16, 8, heads=2, head_dim=8)
    x, context = torch.randn(2, 9, 16), torch.randn(2, 5, 8)
    plain = layer(x, context)
    layer.score_bias = lambda s: s
    assert torch.allclose(layer(x, context), plain, atol=1e-6)
    layer.score_bias = lambda s: s + torch.tensor([0, 0, 0, 0, 50.0])   # all mass on the last token
    assert torch.allclose(layer(x, context), layer.to_out(layer.to_v(context)[:, 4:].expand(2, 9, -1)), atol=1e-5)


def test_region_attention_hooks_only_inside_the_context():
    from marble.models.latent_diffusion import tiny_config as cfg
    from marble.models.unet import UNet
    unet = UNet(cfg().unet)
    bias = lambda s: s  # noqa: E731
    with region_attention(transformer_blocks([unet]), bias):
        layers = [m for m in unet.modules() if isinstance(m, CrossAttention) and m.score_bias is bias]
        assert layers
    assert all(m.score_bias is None for m in unet.modules() if isinstance(m, CrossAttention))


@pytest.mark.parametrize("decay", [0.0, 2.0, -1.0])
def test_the_denoiser_scales_the_conditional_half_by_the_time_law(decay):
    """λ = strength · (t/T)^decay at the call's σ (a negative decay: strength · (1 − t/T)^|decay|) on
    the rows marked conditional, 0 on the others; the hook is gone after the call."""
    from marble.adapters.regions import region_denoiser
    from marble.diffusion.schedule import make_schedule
    from marble.models.unet import UNet
    unet = UNet(tiny_config().unet)
    schedule = make_schedule("scaled_linear")
    region = Region("red", torch.tensor([[1.0, 0.0], [0.0, 0.0]]), (1,))
    scores = torch.randn(4, 1, 4, 3, generator=torch.Generator().manual_seed(1))
    seen = {}

    def network(x, sigma, cond_mark=None, **cond):
        layer = next(m for m in unet.modules() if isinstance(m, CrossAttention) and m.score_bias is not None)
        seen["out"] = layer.score_bias(scores.clone())
        return x

    t = 600
    sigma = schedule.sigmas[t].float().expand(4)
    denoise = region_denoiser(network, [unet], [region], (2, 2), schedule, 1.5, decay)
    denoise(torch.zeros(4, 4, 2, 2), sigma, cond_mark=torch.tensor([0.0, 1.0]))   # [uncond; cond], 2 rows each
    lam = 1.5 * ((t / 999) ** decay if decay >= 0 else (1 - t / 999) ** -decay)
    want = modulation([region], (2, 2))(scores, torch.tensor([0.0, 0.0, lam, lam]))
    assert torch.equal(seen["out"][:2], scores[:2]) and torch.allclose(seen["out"], want, atol=1e-5)
    assert not torch.allclose(seen["out"][2:], scores[2:])
    assert all(m.score_bias is None for m in unet.modules() if isinstance(m, CrossAttention))
    assert region_denoiser(network, [unet], [region], (2, 2), schedule, 0.0) is network


# --- through the request, the record and the CLI ------------------------------------------------

FAST = ["--model", "tiny-random", "--steps", "3", "--size", "32x32", "--seed", "5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    model = random_controlnet_file(root / "cn.safetensors")
    im = Image.new("RGB", (32, 32), "white")
    im.paste(COLORS["red"], (2, 2, 14, 14))
    im.paste(COLORS["blue"], (18, 18, 30, 30))
    im.save(root / "sketch.png")
    return root / "sketch.png", model


def generate(*args):
    r = runner.invoke(app, ["generate", *map(str, args)])
    return r.exit_code, r.output, [Path(line) for line in r.stdout.split() if line.endswith(".png")]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_regions_change_the_image_are_recorded_and_0_is_the_plain_unit(files, tmp_path):
    image, model = files
    unit = ["--control", image, "--control-model", model]
    prompt = "a red circle above a blue square"
    results = {}
    for name, extra in [("plain", []), ("zero", ["--regions", "0"]), ("on", ["--regions", "3"])]:
        code, out, (path,) = generate(prompt, *FAST, *unit, *extra, "--out", tmp_path / name)
        assert code == 0, out
        results[name] = path
    assert (pixels(results["zero"]) == pixels(results["plain"])).all()
    assert np.abs(pixels(results["on"]) - pixels(results["plain"])).max() > 0
    record = read_record(results["on"])
    assert record.regions == 3.0 and "Regions: 3" in record.to_parameters()
    assert GenerationRecord.from_parameters(record.to_parameters()).regions == 3.0
    code, out, (again,) = generate("--from", results["on"], "--control", image, "--out", tmp_path / "again")
    assert code == 0, out
    assert (pixels(again) == pixels(results["on"])).all()


def test_regions_act_in_both_passes_of_the_hires_fix_and_in_img2img(files, tmp_path):
    """The second pass fits the sketch to its own size and latent grid; img2img keeps the init image's."""
    image, model = files
    unit = ["--control", image, "--control-model", model]
    for name, extra in [("hires", ["--hires-scale", "1.5"]), ("i2i", ["--init-image", image, "--strength", "0.7"])]:
        out = {}
        for w in ("0", "3"):
            code, text, (path,) = generate("a red circle above a blue square", *FAST, *unit, *extra, "--regions", w,
                                           "--out", tmp_path / f"{name}-{w}")
            assert code == 0, text
            out[w] = pixels(path)
        assert out["0"].shape == out["3"].shape and np.abs(out["3"] - out["0"]).max() > 0


@pytest.mark.parametrize("args, message", [
    (["--regions", "2"], "needs a control image"),
    (["--regions", "11", "--control", "SKETCH", "--control-model", "MODEL"], "regions must be a number in [0, 10]"),
    (["--regions", "-1", "--control", "SKETCH", "--control-model", "MODEL"], "regions must be a number in [0, 10]"),
])
def test_bad_regions_are_one_line_exit_2_and_write_nothing(files, tmp_path, args, message):
    image, model = files
    args = [str(image) if a == "SKETCH" else str(model) if a == "MODEL" else a for a in args]
    code, out, paths = generate("a red circle", *FAST, *args, "--out", tmp_path / "bad")
    assert code == 2 and message in out and "Traceback" not in out and not paths
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_sketch_regions_of_a_shapes_world_scene_bind_each_named_colour():
    from marble.checkpoints.resolve import load_model
    text = load_model("builtin").model.text_encoder
    scene, _ = sample_scene("train", 0, 3, 64)
    prompt = " and ".join(f"a {scene.objects[g[0]].color} {scene.objects[g[0]].shape}" for g in scene.groups)
    regions = sketch_regions(sketch(scene), prompt, text.count_tokens, text.max_tokens)
    assert [r.color for r in regions] == [scene.objects[g[0]].color for g in scene.groups]
    for r in regions:
        assert r.mask.sum() > 0 and len(r.tokens) >= 2


@pytest.mark.parametrize("mode", ["Balanced", "ControlNet is more important"])
def test_the_controlnets_attention_too_when_asked(files, monkeypatch, mode):
    """regions.CONTROLNETS also routes the ControlNet's cross-attention through the modulation, in
    both halves of CFG or on the conditional rows alone (the mode where the ControlNet runs there)."""
    from marble.adapters import regions
    from marble.adapters.controlnet import ControlSpec
    from marble.checkpoints.resolve import load_model
    from marble.pipeline import Pipeline
    image, model = files
    pipe = Pipeline(load_model("tiny-random"))
    spec = ControlSpec(image=Image.open(image).convert("RGB"), model=str(model), is_path=True, mode=mode)
    options = dict(seed=5, steps=3, width=32, height=32, controls=(spec,), regions=3.0)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(regions, "CONTROLNETS", on)
        out[on] = np.asarray(pipe.generate_image("a red circle above a blue square", **options), dtype=int)
    assert np.abs(out[True] - out[False]).max() > 0


def test_components_are_the_8_connected_blobs():
    from marble.adapters.regions import components
    mask = torch.zeros(9, 9)
    mask[0:2, 0:2] = 1
    mask[2, 2] = 1                 # touches the first blob by a corner: the same blob
    mask[4:9, 5:8] = 1
    mask[0, 8] = 1                 # one pixel alone
    got = sorted((int(c.sum()), tuple(c.nonzero()[0].tolist())) for c in components(mask))
    assert got == [(1, (0, 8)), (5, (0, 0)), (15, (4, 5))]
    assert torch.equal(sum(components(mask)), mask) and components(torch.zeros(4, 4)) == []


# held-out position prompts of two shapes of one colour, in each phrasing of the relation
SAME_COLOUR = [("a red diamond below a red square", "below"), ("a red square above a red diamond", "above"),
               ("a green circle below a green star", "below"), ("a pink diamond to the left of a pink cross", "left of"),
               ("a pink cross on the right of a pink diamond", "right of"), ("a blue star over a blue circle", "above")]


@pytest.mark.parametrize("prompt, relation", SAME_COLOUR)
def test_two_phrases_of_one_colour_bind_the_silhouette_their_relation_names(prompt, relation):
    """Oracle: each object's own silhouette, sketched alone, from a scene the world composes with
    that relation (the first phrase's shape `relation` the second's)."""
    from dataclasses import replace

    from marble.checkpoints.resolve import load_model
    from marble.data.sketch import sketch_indices
    from marble.eval.prompts import Need, Requirement, truth_scene
    text = load_model("builtin").model.text_encoder
    (c1, s1), (c2, s2) = [(color, prompt[a:b].split()[-1]) for color, (a, b) in color_phrases(prompt)]
    need = Requirement("position", (Need(s1, c1), Need(s2, c2)), relation)
    for seed in range(3):
        scene = truth_scene(need, seed)
        regions = sketch_regions(sketch(scene), prompt, text.count_tokens, text.max_tokens)
        assert [r.color for r in regions] == [c1, c2]
        for region, shape in zip(regions, (s1, s2)):
            obj = next(o for o in scene.objects if o.shape == shape)
            alone = torch.from_numpy((sketch_indices(replace(scene, objects=(obj,))) > 0).astype(np.float32))
            assert torch.equal(region.mask, alone), (prompt, seed, shape)


@pytest.mark.parametrize("prompt", ["a red diamond and a red square", "a red diamond below a blue square",
                                    "two red diamonds below two red squares", "a red diamond below a red square"])
def test_without_a_relation_or_two_silhouettes_both_phrases_bind_the_whole_colour(prompt):
    from marble.adapters.regions import phrase_regions
    masks = {"red": torch.zeros(16, 16), "blue": torch.zeros(16, 16)}
    masks["red"][1:4, 2:5] = 1
    masks["red"][10:13, 2:5] = 1
    masks["red"][10:13, 9:12] = 1 if "two" in prompt or "below a red" in prompt else 0   # three red blobs: counts 4 or 2
    masks["blue"][10:13, 9:12] = 1 if "blue" in prompt else 0
    regions = phrase_regions(masks, prompt, lambda s: len(s.split()) + 2, 32)
    assert [(r.color, torch.equal(r.mask, masks[r.color])) for r in regions] == [(c, True) for c, _ in color_phrases(prompt)]


@pytest.mark.parametrize("prompt, first, second", [
    ("two red circles above a red square", "AB", "C"),
    ("a red square below two red circles", "C", "AB"),
    ("2 red circles over a red square", "AB", "C"),
    ("three red stars above a red square", "ABD", "C"),
    ("a red square above two red circles", None, None),     # the two top blobs tie on the axis: no order
    ("two red circles above two red squares", None, None),  # four counted, three drawn
])
def test_counted_phrases_of_one_colour_take_as_many_silhouettes_as_they_count(prompt, first, second):
    from marble.adapters.regions import phrase_regions
    blobs = {"A": (slice(1, 4), slice(2, 5)), "B": (slice(1, 4), slice(9, 12)), "C": (slice(10, 13), slice(5, 8)),
             "D": (slice(2, 5), slice(13, 15))}
    red = torch.zeros(16, 16)
    for name, (rows, cols) in blobs.items():
        if name != "D" or "three" in prompt:
            red[rows, cols] = 1

    def only(names):
        mask = torch.zeros(16, 16)
        for name in names:
            mask[blobs[name]] = 1
        return mask
    regions = phrase_regions({"red": red}, prompt, lambda s: len(s.split()) + 2, 32)
    assert len(regions) == 2
    want = [red, red] if first is None else [only(first), only(second)]
    assert all(torch.equal(r.mask, m) for r, m in zip(regions, want)), prompt


def test_phrase_count_reads_the_number_before_a_phrase():
    from marble.adapters.regions import phrase_count
    prompt = "two red circles above 3 blue stars and the green square beside four pink crosses"
    starts = [prompt.index(w) for w in ("red", "blue", "green", "pink")]
    assert [phrase_count(prompt, s) for s in starts] == [2, 3, 1, 4] and phrase_count("red", 0) == 1
