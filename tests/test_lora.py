"""LoRA: the module-name table, the kohya and PEFT readers, overlay and fuse (marble/adapters).

Parity: diffusers builds a tiny SD pipeline (tests/sd_fixtures.py) and saves it; marble reads the
same folder. A random kohya file (attention, LoCon convolutions, text encoder, per-layer ranks and
alphas ≠ rank, some alphas absent) and a random PEFT file made by peft itself (alpha_pattern,
lora_alpha ≠ r) are loaded by diffusers' load_lora_weights + fuse_lora and by marble; text-encoder
states and U-Net outputs agree within 1e-5 relative. The closed form W + m·(α/r)·up·down is
checked layer by layer, overlay against fuse, and the base weights bit for bit after an overlay
and after every failed load. A whole txt2img with a tag matches diffusers' image within 1/255.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch

from marble.adapters.lora import LoraUse, attach_trainable, fuse, overlay
from marble.adapters.lora_files import lora_hash, read_lora, save_kohya
from marble.errors import LoraError
from marble.adapters.lora_table import module_table
from marble.checkpoints.checkpoint import to_model
from marble.checkpoints.detect import open_checkpoint
from kohya_files import random_kohya, write_safetensors
from sd_fixtures import (clip_text_kwargs, diffusers_oracle, diffusers_unet_kwargs, diffusers_vae_kwargs,
                         oracle_tokenizer_folder, randomize_)

diffusers = diffusers_oracle()
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

PROMPTS = ["a red cat on a blue chair", ""]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def base(request, tmp_path_factory):
    """(family, pipeline folder written by diffusers): SD1 has 1×1-conv projections, SD2 linear ones
    and two transformer layers per block."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    pad = "<|endoftext|>" if family == "sd1" else "!"
    pipe = StableDiffusionPipeline(
        vae=randomize_(AutoencoderKL(**diffusers_vae_kwargs()), seed=2),
        text_encoder=randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_text_kwargs(family))), 3),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(oracle_tokenizer_folder(root / "vocab", pad)),
        unet=randomize_(UNet2DConditionModel(**diffusers_unet_kwargs(family)), seed=1),
        scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return family, root / "pipe"


def diffusers_pipe(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)


def marble_model(folder):
    return to_model(open_checkpoint(folder))


# --- parity with diffusers ---------------------------------------------------------------------------

def diffusers_fused(folder, lora_path, te: float, unet: float):
    pipe = diffusers_pipe(folder)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(components=["unet"], lora_scale=unet)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=te)
    pipe.unload_lora_weights()   # keeps the fused weights, drops the PEFT wrappers
    return pipe


@torch.no_grad()
def outputs(text_encoder_fn, unet_fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 321.5])
    context = torch.randn(2, 77, 32, generator=g)
    return text_encoder_fn(), unet_fn(x, t, context)


def diffusers_outputs(pipe):
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return outputs(lambda: pipe.text_encoder(ids)[0],
                   lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c).sample)


def marble_outputs(model):
    return outputs(lambda: model.text_encoder.encode(PROMPTS), lambda x, t, c: model.unet(x, t, c))


def close(got, want, rel):
    return (got - want).abs().max() <= rel * want.abs().max()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def kohya_file(base, tmp_path_factory):
    """α = 3 on every layer, ranks 4 and 2: scales 3/4 and 3/2."""
    family, folder = base
    tensors, meta = random_kohya(diffusers_pipe(folder), seed=11, alpha=3.0)
    path = write_safetensors(tmp_path_factory.mktemp("kohya") / "style.safetensors", tensors,
                             {"ss_network_module": "networks.lora"})
    return path, meta


@pytest.fixture(scope="module")
def kohya_mixed_file(base, tmp_path_factory):
    """A random α per layer, absent on every third (α = r)."""
    family, folder = base
    tensors, meta = random_kohya(diffusers_pipe(folder), seed=13)
    path = write_safetensors(tmp_path_factory.mktemp("kohya") / "mixed.safetensors", tensors)
    return path, meta


@pytest.fixture(scope="module")
def peft_file(base, tmp_path_factory):
    """Made by peft and diffusers themselves: adapters on the U-Net (attention + ResNet convolutions)
    and the text encoder, random weights, lora_alpha ≠ r and an alpha_pattern, saved with
    save_lora_weights and its adapter metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    family, folder = base
    pipe = diffusers_pipe(folder)
    unet_config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                "conv1", "conv2", "ff.net.2"],
                             alpha_pattern={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 1.5},
                             init_lora_weights=False)
    te_config = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    torch.manual_seed(12)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(te_config, pipe.text_encoder)   # transformers' add_adapter wants a newer peft
    path = tmp_path_factory.mktemp("peft")
    StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict(),
        weight_name="peft.safetensors")
    return path / "peft.safetensors"


@pytest.mark.parametrize("te, unet", [(1.0, 1.0), (0.6, 1.3)])
def test_kohya_file_matches_diffusers(base, kohya_file, te, unet):
    """Unfused both ways: low-rank branches in forward hooks (copy_above=inf) and patched copies of
    the weights (copy_above=0); the default picks per layer by cost."""
    family, folder = base
    path, _ = kohya_file
    want = diffusers_outputs(diffusers_fused(folder, path, te, unet))
    model = marble_model(folder)
    plain = marble_outputs(model)
    lora = read_lora(path, module_table(model))
    assert lora.skipped == () and len(lora.layers) == len(kohya_file[1])
    with overlay(model, [LoraUse(lora, te=te, unet=unet)], copy_above=math.inf):
        hooked = marble_outputs(model)
    with overlay(model, [LoraUse(lora, te=te, unet=unet)], copy_above=0):
        copied = marble_outputs(model)
    fuse(model, [LoraUse(lora, te=te, unet=unet)])
    fused = marble_outputs(model)
    for got_hooked, got_copied, got_fused, theirs, before in zip(hooked, copied, fused, want, plain):
        assert not close(before, theirs, 1e-2)          # the LoRA changes the outputs visibly
        assert close(got_fused, theirs, 1e-5)
        assert close(got_hooked, theirs, 1e-5)
        assert close(got_hooked, got_fused, 1e-5)
        assert torch.equal(got_copied, got_fused)       # the same weights, computed the same way


def test_peft_file_matches_diffusers(base, peft_file):
    family, folder = base
    want = diffusers_outputs(diffusers_fused(folder, peft_file, 0.8, 1.0))
    model = marble_model(folder)
    plain = marble_outputs(model)
    lora = read_lora(peft_file, module_table(model))
    assert lora.skipped == ()
    # the metadata's alphas: 6/4 everywhere in the U-Net but the pattern's 1.5/4; text encoder 5/2
    q = "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert lora.layers[q].scale == 1.5 / 4
    assert lora.layers["unet.input_blocks.4.1.transformer_blocks.0.attn1.to_k"].scale == 6 / 4
    assert {layer.scale for n, layer in lora.layers.items() if n.startswith("text_encoder.")} == {5 / 2}
    with overlay(model, [LoraUse(lora, te=0.8)], copy_above=math.inf):
        unfused = marble_outputs(model)
    fuse(model, [LoraUse(lora, te=0.8)])
    fused = marble_outputs(model)
    for got_unfused, got_fused, theirs, before in zip(unfused, fused, want, plain):
        assert not close(before, theirs, 1e-2)
        assert close(got_fused, theirs, 1e-5) and close(got_unfused, theirs, 1e-5)


def test_images_match_diffusers_within_one_level(tmp_path):
    """Whole txt2img (Euler, 8 steps, CFG 7.5) on a pipeline marble wrote and diffusers loaded: the
    kohya LoRA fused by diffusers, and applied by marble as a prompt tag (unfused): every pixel
    within 1/255. The start noise is handed over as in tests/test_sd_parity.py."""
    from dataclasses import replace

    import numpy as np
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from marble.checkpoints.checkpoint import from_model
    from marble.checkpoints.diffusers_folder import write_diffusers
    from marble.checkpoints.resolve import LoadedModel, random_model
    from marble.pipeline import Pipeline
    from marble.request import GenerationRequest, resolve
    from sd_fixtures import tiny_sd
    model = random_model(lambda: tiny_sd("sd1"), seed=5)
    folder = write_diffusers(from_model(model), tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    tensors, _ = random_kohya(pipe, seed=21, alpha=3.0)
    write_safetensors(tmp_path / "loras" / "ink.safetensors", tensors)
    pipe.load_lora_weights(str(tmp_path / "loras" / "ink.safetensors"))
    pipe.fuse_lora(components=["unet"], lora_scale=0.9)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=0.6)

    seed, steps, size, prompt = 42, 8, 64, "a red cat on a blue chair"
    marble_pipe = Pipeline(LoadedModel(model, "m", "h"), lora_dir=tmp_path / "loras")
    request = GenerationRequest(prompt=f"{prompt} <lora:ink:0.6:0.9>", negative_prompt="blurry", seed=seed,
                                steps=steps, sampler="Euler", cfg=7.5, width=size, height=size)
    ours = np.asarray(marble_pipe.generate(resolve(request, marble_pipe.defaults)).images[0]).astype(int)
    plain = np.asarray(marble_pipe.generate(resolve(replace(request, prompt=prompt),
                                                    marble_pipe.defaults)).images[0]).astype(int)
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas[0])
    start = torch.randn((1, 4, size // 4, size // 4), generator=torch.Generator().manual_seed(seed))
    start = start * ((1 + sigma_max ** 2) ** 0.5 / pipe.scheduler.init_noise_sigma)
    theirs = pipe(prompt, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5, height=size,
                  width=size, latents=start).images[0]
    theirs = np.asarray(theirs).astype(int)
    assert np.abs(ours - plain).max() > 20        # the LoRA changes the image
    assert np.abs(ours - theirs).max() <= 1


# --- closed form, spellings, overlays -------------------------------------------------------------

def test_fuse_is_the_closed_form_layer_by_layer(base, kohya_mixed_file):
    """Each patched weight is W + m·(α/r)·up·down, with α = r where the file has none; for a 3×3
    LoCon layer ΔW[o, i] = Σ_r up[o, r] · down[r, i] (the 1×1 up mixes the down kernels)."""
    family, folder = base
    path, meta = kohya_mixed_file
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    model = marble_model(folder)
    table = module_table(model)
    before = snapshot(model)
    fuse(model, [LoraUse(read_lora(path, table), te=0.5, unet=2.0)], table)
    seen_kinds = set()
    for name, (_, alpha) in meta.items():
        target = table.find(name)
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        r = down.shape[0]
        m = 2.0 if name.startswith("lora_unet") else 0.5
        if down.ndim == 4:
            delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])
            seen_kinds.add(f"conv{down.shape[-1]}")
        else:
            delta = up @ down
            seen_kinds.add("linear")
        w0 = before[target.name + ".weight"]
        want = w0 + m * (alpha / r) * delta.reshape(w0.shape)
        assert close(target.module.weight, want, 1e-6), name
    assert seen_kinds >= {"linear", "conv3"} | ({"conv1"} if family == "sd1" else set())


def test_every_spelling_reaches_the_same_module(base, kohya_file, tmp_path):
    """The original-SD (ldm) kohya spelling, diffusers' kohya spelling and PEFT's name the same
    layers; pairs written out by hand for these shapes (3 levels, 2 res blocks, attention on 0, 1)."""
    family, folder = base
    model = marble_model(folder)
    table = module_table(model)
    pairs = {  # ldm kohya name: diffusers kohya name
        "lora_unet_input_blocks_1_1_proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_input_blocks_3_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_input_blocks_4_0_in_layers_2": "lora_unet_down_blocks_1_resnets_0_conv1",
        "lora_unet_input_blocks_4_0_skip_connection": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_k":
            "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_middle_block_1_proj_out": "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_middle_block_2_emb_layers_1": "lora_unet_mid_block_resnets_1_time_emb_proj",
        "lora_unet_output_blocks_2_1_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_output_blocks_5_2_conv": "lora_unet_up_blocks_1_upsamplers_0_conv",
        "lora_unet_output_blocks_8_1_transformer_blocks_0_ff_net_0_proj":
            "lora_unet_up_blocks_2_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_output_blocks_6_0_out_layers_3": "lora_unet_up_blocks_2_resnets_0_conv2",
        "lora_unet_time_embed_0": "lora_unet_time_embedding_linear_1",
        "lora_unet_out_2": "lora_unet_conv_out",
    }
    for ldm, theirs in pairs.items():
        target = table.find(ldm)
        assert target is not None and table.find(theirs) is target, ldm
        peft_name = "unet." + theirs[len("lora_unet_"):]
        # PEFT's dotted path is the kohya one with its dots back; found through the target's own record
        assert target.diffusers.replace(".", "_") == peft_name.replace(".", "_") and table.find(target.diffusers) is target
    te = table.find("lora_te_text_model_encoder_layers_1_mlp_fc2")
    assert te is table.find("text_encoder.text_model.encoder.layers.1.mlp.fc2") is not None
    assert te.module is model.text_encoder.text_model.encoder.layers[1].mlp.fc2
    # a whole file renamed to the ldm spelling loads to the same layers
    path, _ = kohya_file
    from safetensors.torch import load_file
    renamed = {}
    back = {v: k for k, v in pairs.items()}
    for key, tensor in load_file(str(path)).items():
        head, dot, rest = key.partition(".")
        renamed[back.get(head, head) + dot + rest] = tensor
    assert any(k.startswith("lora_unet_input_blocks") for k in renamed)
    a = read_lora(path, table)
    b = read_lora(write_safetensors(tmp_path / "ldm.safetensors", renamed), table)
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(a.layers[k].down, b.layers[k].down) and a.layers[k].alpha == b.layers[k].alpha
               for k in a.layers)


def test_overlays_switch_per_request_without_leaking(base, kohya_file, peft_file):
    """A (as weight copies), then B (as hooks), then A+B, then none: the base outputs come back bit
    for bit and the weights are never written; two LoRAs at once are the sum of their deltas."""
    family, folder = base
    model = marble_model(folder)
    table = module_table(model)
    before = snapshot(model)
    plain = marble_outputs(model)
    a, b = read_lora(kohya_file[0], table), read_lora(peft_file, table)
    with overlay(model, [LoraUse(a, 0.7, 0.9)], table, copy_above=0):
        out_a = marble_outputs(model)
    with overlay(model, [LoraUse(b)], table, copy_above=math.inf):
        out_b = marble_outputs(model)
    with overlay(model, [LoraUse(a, 0.7, 0.9), LoraUse(b)], table):
        out_ab = marble_outputs(model)
    after = marble_outputs(model)
    assert unchanged(model, before)
    assert all(torch.equal(x, y) for x, y in zip(after, plain))
    assert not close(out_a[1], out_b[1], 1e-2)
    fuse(model, [LoraUse(a, 0.7, 0.9), LoraUse(b)], table)
    assert all(close(x, y, 1e-5) for x, y in zip(out_ab, marble_outputs(model)))


def test_zero_multiplier_is_the_base_model(base, kohya_file):
    family, folder = base
    model = marble_model(folder)
    plain = marble_outputs(model)
    with overlay(model, [LoraUse(read_lora(kohya_file[0], module_table(model)), te=0.0, unet=0.0)]):
        assert all(torch.equal(x, y) for x, y in zip(marble_outputs(model), plain))
    with overlay(model, [LoraUse(read_lora(kohya_file[0], module_table(model)), te=0.0, unet=1.0)]):
        te, unet = marble_outputs(model)
    assert torch.equal(te, plain[0]) and not torch.equal(unet, plain[1])


def test_half_precision_files_and_models(base, kohya_file, tmp_path):
    """An fp16 file is kept as stored (half the memory) and means exactly its values; a bf16 model
    takes the overlay in its own dtype, close to the float32 result."""
    family, folder = base
    from safetensors.torch import load_file
    half = {k: v.half() for k, v in load_file(str(kohya_file[0])).items()}
    path16 = write_safetensors(tmp_path / "half.safetensors", half)
    path32 = write_safetensors(tmp_path / "widened.safetensors", {k: v.float() for k, v in half.items()})
    model = marble_model(folder)
    table = module_table(model)
    lora16, lora32 = read_lora(path16, table), read_lora(path32, table)
    assert all(layer.down.dtype == torch.float16 for layer in lora16.layers.values())
    with overlay(model, [LoraUse(lora16)], table):
        out16 = marble_outputs(model)
    with overlay(model, [LoraUse(lora32)], table):
        out32 = marble_outputs(model)
    assert all(torch.equal(x, y) for x, y in zip(out16, out32))
    model = model.to(torch.bfloat16)
    with overlay(model, [LoraUse(lora16)]):
        te, unet = marble_outputs(model)
    assert close(te.float(), out32[0], 0.05) and close(unet.float(), out32[1], 0.05)


# --- marble writes kohya files; training layers ---------------------------------------------------

def test_trainable_layers_save_as_a_kohya_file_diffusers_loads(base, tmp_path):
    """attach_trainable starts at the base model (up = 0); with random values in its parameters the
    hooked model equals the model fused with to_lora(), and save_kohya writes a file that diffusers'
    load_lora_weights reads to the same U-Net and text encoder."""
    family, folder = base
    model = marble_model(folder)
    plain = marble_outputs(model)
    trainable = attach_trainable(model, kinds=("attention", "conv", "text"), rank=3, alpha=5.0,
                                 generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(marble_outputs(model), plain))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for up in trainable.up:
            up.copy_(torch.randn(up.shape, generator=g) * 0.2)
    hooked = marble_outputs(model)
    trainable.detach()
    assert all(torch.equal(x, y) for x, y in zip(marble_outputs(model), plain))
    lora = trainable.to_lora("mine")
    path = save_kohya(tmp_path / "mine.safetensors", lora, module_table(model), {"ss_steps": "10"})
    with pytest.raises(FileExistsError):
        save_kohya(path, lora, module_table(model))
    fuse(model, [LoraUse(lora)])
    assert all(close(x, y, 1e-5) for x, y in zip(marble_outputs(model), hooked))
    theirs = diffusers_outputs(diffusers_fused(folder, path, 1.0, 1.0))
    assert all(close(x, y, 1e-5) for x, y in zip(hooked, theirs))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "3" and meta["ss_steps"] == "10"


def test_builtin_model_table_reaches_its_minilm_text_encoder():
    """The built-in model's U-Net uses SD's names; its text encoder is MiniLM (BERT), patched under
    `lora_te_` + transformers' BertModel paths."""
    from marble.checkpoints.resolve import builtin_path, load_model
    if not builtin_path().is_file():
        pytest.skip("no built-in model file")
    model = load_model("builtin").model
    table = module_table(model)
    q = table.find("lora_te_encoder_layer_0_attention_self_query")
    assert q is not None and q.module is model.text_encoder.encoder.layer[0].attention.self.query
    assert table.find("text_encoder.encoder.layer.5.output.dense") is not None
    assert {t.kind for t in table.targets.values()} == {"attention", "conv", "text", "other"}
    assert table.find("lora_unet_mid_block_attentions_0_proj_in") is not None


# --- bad input --------------------------------------------------------------------------------------

def one_line_error(path, table, match):
    with pytest.raises(LoraError, match=match) as info:
        read_lora(path, table)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_files_fail_with_one_line_and_leave_the_model_untouched(base, kohya_file, tmp_path):
    family, folder = base
    model = marble_model(folder)
    table = module_table(model)
    before = snapshot(model)
    path, meta = kohya_file
    from safetensors.torch import load_file
    good = load_file(str(path))
    name = next(iter(meta))

    one_line_error(tmp_path / "missing.safetensors", table, "no such file")
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(300))
    one_line_error(tmp_path / "noise.safetensors", table, "not a valid safetensors")
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    one_line_error(tmp_path / "cut.safetensors", table, "truncated or corrupt")
    torch.save(good, tmp_path / "pickled.safetensors")
    one_line_error(tmp_path / "pickled.safetensors", table, "pickle")

    unknown = dict(good, **{"lora_unet_nowhere_proj.lora_down.weight": torch.zeros(2, 4),
                            "lora_unet_nowhere_proj.lora_up.weight": torch.zeros(4, 2)})
    one_line_error(write_safetensors(tmp_path / "unknown.safetensors", unknown), table, "lora_unet_nowhere_proj")
    hada = dict(good, **{f"{name}.hada_w1_a": torch.zeros(2, 2)})
    one_line_error(write_safetensors(tmp_path / "hada.safetensors", hada), table, "hada_w1_a")
    no_up = {k: v for k, v in good.items() if k != f"{name}.lora_up.weight"}
    one_line_error(write_safetensors(tmp_path / "no_up.safetensors", no_up), table, f"{name} has no up")
    # another architecture: a text encoder 24 wide instead of 32 (its down matrices do not fit)
    wrong = {k: (v[:, :24] if k.startswith("lora_te") and k.endswith("lora_down.weight") else v)
             for k, v in good.items()}
    message = one_line_error(write_safetensors(tmp_path / "wrong.safetensors", wrong), table, "another model")
    assert "lora_te_text_model_encoder_layers_0" in message
    nan = dict(good, **{f"{name}.lora_up.weight": good[f"{name}.lora_up.weight"] * float("nan")})
    one_line_error(write_safetensors(tmp_path / "nan.safetensors", nan), table, "NaN")
    one_line_error(write_safetensors(tmp_path / "empty.safetensors", {"other": torch.zeros(1)}), table, "other")
    assert unchanged(model, before)

    # lenient: the unknown layer is skipped and listed, the rest applies exactly as without it
    lenient = read_lora(tmp_path / "unknown.safetensors", table, lenient=True)
    assert len(lenient.skipped) == 1 and "lora_unet_nowhere_proj" in lenient.skipped[0]
    assert lenient.layers.keys() == read_lora(path, table).layers.keys()
    wrong_lenient = read_lora(tmp_path / "wrong.safetensors", table, lenient=True)
    assert not any(n.startswith("text_encoder.") for n in wrong_lenient.layers)
    assert any(n.startswith("unet.") for n in wrong_lenient.layers)


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    """sha256 of the bytes after the header: unchanged by metadata, 12 hex digits in the record."""
    import hashlib
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(6.0).reshape(2, 3)}
    a = write_safetensors(tmp_path / "a.safetensors", tensors, {"ss_output_name": "a"})
    b = write_safetensors(tmp_path / "b.safetensors", tensors, {"ss_output_name": "a much longer name"})
    assert lora_hash(a) == lora_hash(b) != hashlib.sha256(a.read_bytes()).hexdigest()[:12]
    raw = a.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert lora_hash(a) == hashlib.sha256(raw[8 + n:]).hexdigest()[:12]
