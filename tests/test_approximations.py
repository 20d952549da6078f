"""The opt-in approximations (DeepCache, ToMe, dynamic int8): exact when off, the exact network
on DeepCache's cache steps, reproducible for a seed when on, stated in the record, refused when
malformed, and above the quality floor docs/bench.md states for each on the built-in model. Their
quality cost and time are measured by benchmarks/approximations.py."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from marble.adapters.controlnet import ControlSpec
from marble.adapters.lora_loader import LoraSpec
from marble.checkpoints.checkpoint import state_hash
from marble.checkpoints.resolve import LoadedModel, random_model
from marble.cli import app
from marble.diffusion.schedule import spacing
from marble.eval.sd_bench import psnr
from marble.errors import LoraError, ModelLoadError
from marble.models.deepcache import DeepCache, deepcache_denoiser
from marble.models.quantize import is_quantized
from marble.models.tome import bipartite_merge, highest_resolution_transformers, token_merging
from marble.models.unet import UNET_PRESETS, UNet
from marble.pipeline import Pipeline
from marble.png import read_record
from marble.record import GenerationRecord
from marble.request import GenerationRequest, RequestError, resolve

pytestmark = pytest.mark.unit

BASE = dict(prompt="two red circles above a blue square", steps=6, sampler="Euler", cfg=5.0, width=32, height=32)


def gen(pipe, **kw):
    return pipe.generate(resolve(GenerationRequest(**{**BASE, **kw}), pipe.defaults))


def arrays(result):
    return [np.asarray(im) for im in result.images]


def random_unet(preset: str, seed: int = 0) -> UNet:
    """A U-Net with every weight random (none of the zero-initialised outputs), so each block matters."""
    torch.manual_seed(seed)
    unet = UNet(UNET_PRESETS[preset]).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return unet


def unet_inputs(unet: UNet, batch: int = 2, side: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, side, side, generator=g)
    t = torch.full((batch,), 400.0)
    context = torch.randn(batch, 5, c.context_dim, generator=g)
    y = torch.randn(batch, c.adm_in_channels, generator=g) if c.adm_in_channels else None
    return x, t, context, y


# ---- DeepCache ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "sdxl-tiny"])   # sdxl-tiny: the vector conditioning y
@pytest.mark.parametrize("branch", [1, 2])
def test_deepcache_full_pass_is_the_unet_and_shallow_pass_on_the_same_input_too(preset, branch):
    unet = random_unet(preset)
    x, t, context, y = unet_inputs(unet)
    with torch.no_grad():
        exact = unet(x, t, context, y=y)
        cache = DeepCache(unet, branch)
        assert torch.equal(cache.full(x, t, context, y=y), exact)
        # the shallow pass recomputes the kept blocks around the cached features: on the input the
        # cache was made from, it must rebuild the full output bit for bit (wrong skips or block ranges do not)
        assert torch.equal(cache.shallow(x, t, context, y=y), exact)
        moved = cache.shallow(x + 0.5, t, context, y=y)
        assert not torch.equal(moved, unet(x + 0.5, t, context, y=y))
        assert moved.shape == exact.shape


def test_deepcache_denoiser_runs_the_exact_network_on_cache_steps_and_reuses_between(tiny_loaded):
    model = tiny_loaded.model
    sigmas = spacing("karras", model.schedule, 6)
    x, _, context, _ = unet_inputs(model.unet, batch=1)
    context = context[:, :, :model.unet.config.context_dim]
    d = deepcache_denoiser(model, sigmas, 3)
    with torch.no_grad():
        for step in range(6):
            sigma = sigmas[step:step + 1]
            got, exact = d(x, sigma, context=context), model.denoiser(x, sigma, context=context)
            assert torch.equal(got, exact) == (step % 3 == 0), step


def test_deepcache_refuses_a_transformer_denoiser():
    class NotUNet:
        unet = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="U-Net"):
        deepcache_denoiser(NotUNet(), torch.tensor([1.0, 0.0]), 2)


# ---- ToMe -----------------------------------------------------------------------------------

def test_bipartite_merge_with_nothing_to_merge_is_the_identity():
    x = torch.randn(2, 8 * 6, 5)
    merge, unmerge = bipartite_merge(x, 8, 6, 0, torch.Generator().manual_seed(0))
    assert torch.equal(unmerge(merge(x)), x)


@pytest.mark.parametrize("h,w", [(8, 8), (5, 7)])   # odd sides: the leftover row and column stay sources
def test_bipartite_merge_merges_r_tokens_into_their_most_similar_destination(h, w):
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(2, (h + 1) // 2, (w + 1) // 2, 6, generator=g)   # one random vector per 2x2 cell
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :h, :w].reshape(2, h * w, 6)
    r = (h // 2) * (w // 2) * 3   # every source inside a full cell has an identical destination
    merge, unmerge = bipartite_merge(x, h, w, r, g)
    merged = merge(x)
    assert merged.shape == (2, h * w - r, 6)
    # sources merged only into identical tokens: averaging changes nothing, unmerging restores them
    torch.testing.assert_close(unmerge(merged), x, rtol=0, atol=1e-6)
    # a different token gets through merging and unmerging as the mean of its group
    noisy = x + 0.01 * torch.randn(x.shape, generator=g)
    assert not torch.equal(unmerge(merge(noisy)), noisy)


def test_tome_acts_on_the_highest_resolution_transformers_only_and_off_is_exact():
    unet = random_unet("tiny")   # attention at level 1 only, the deepest: its blocks and the middle block's
    targets = highest_resolution_transformers(unet)
    assert targets == [unet.input_blocks[3][1], unet.output_blocks[0][1], unet.output_blocks[1][1],
                       unet.middle_block[1]]
    with torch.device("meta"):   # the shape alone
        sd = highest_resolution_transformers(UNet(UNET_PRESETS["sd15"]))
    assert len(sd) == 5 and all(st.proj_in.in_channels == 320 for st in sd)   # level 0: 2 down, 3 up
    x, t, context, _ = unet_inputs(unet)
    with torch.no_grad():
        exact = unet(x, t, context)
        with token_merging(unet, 0.0, 1):
            assert torch.equal(unet(x, t, context), exact)
        with token_merging(unet, 0.5, 1):
            a = unet(x, t, context)
        with token_merging(unet, 0.5, 1):
            b = unet(x, t, context)
        with token_merging(unet, 0.5, 2):
            c = unet(x, t, context)
        assert torch.equal(unet(x, t, context), exact)   # gone after the block
    assert torch.equal(a, b) and not torch.equal(a, exact) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="ratio"):
        with token_merging(unet, 0.8, 1):
            pass


# ---- the pipeline ---------------------------------------------------------------------------

def test_off_is_bit_identical_to_no_flag_and_the_record_stays_quiet(tiny_pipe):
    plain = gen(tiny_pipe, seed=4, n=2)
    off = gen(tiny_pipe, seed=4, n=2, deepcache=1, tome=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(plain), arrays(off)))
    r = off.records[0]
    assert (r.deepcache, r.tome, r.quantize) == (1, 0.0, None)
    text = r.to_parameters()
    assert "DeepCache" not in text and "ToMe" not in text and "Quantize" not in text


@pytest.mark.parametrize("flags", [dict(deepcache=3), dict(tome=0.5), dict(deepcache=2, tome=0.75)])
def test_on_changes_the_image_reproducibly_and_batch_images_equal_single_runs(tiny_pipe, flags):
    exact = arrays(gen(tiny_pipe, seed=9, n=2, sampler="Euler a"))
    on = gen(tiny_pipe, seed=9, n=2, sampler="Euler a", **flags)
    assert not np.array_equal(arrays(on)[0], exact[0])
    again = arrays(gen(tiny_pipe, seed=10, sampler="Euler a", **flags))[0]
    assert np.array_equal(arrays(on)[1], again)   # image 1 of the batch is the single run with seed + 1
    r = on.records[0]
    assert (r.deepcache, r.tome) == (flags.get("deepcache", 1), flags.get("tome", 0.0))


def test_deepcache_with_one_step_is_only_a_cache_step(tiny_pipe):
    assert np.array_equal(arrays(gen(tiny_pipe, seed=2, steps=1))[0],
                          arrays(gen(tiny_pipe, seed=2, steps=1, deepcache=4))[0])


def test_deepcache_and_tome_run_through_img2img_and_hires(tiny_pipe):
    init = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    a = gen(tiny_pipe, seed=3, init_image=init, strength=0.6, deepcache=2, tome=0.5)
    b = gen(tiny_pipe, seed=3, init_image=init, strength=0.6, deepcache=2, tome=0.5)
    assert np.array_equal(arrays(a)[0], arrays(b)[0])
    from marble.hires import HiresFix
    h = gen(tiny_pipe, seed=3, width=16, height=16, hires=HiresFix(scale=2.0, denoise=0.5), deepcache=2, tome=0.5)
    assert h.images[0].size == (32, 32)


@pytest.mark.parametrize("field,value", [("deepcache", 0), ("deepcache", 101), ("deepcache", 2.5),
                                         ("deepcache", True), ("tome", -0.1), ("tome", 0.8),
                                         ("tome", float("nan")), ("tome", "0.5")])
def test_bad_values_are_refused_in_one_line(tiny_pipe, field, value):
    with pytest.raises(RequestError) as e:
        resolve(GenerationRequest(**{**BASE, field: value}), tiny_pipe.defaults)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_deepcache_with_controlnet_is_refused(tiny_pipe):
    unit = ControlSpec(image=Image.new("RGB", (32, 32)), model="any")
    with pytest.raises(RequestError, match="ControlNet"):
        resolve(GenerationRequest(**BASE, deepcache=2, controls=(unit,)), tiny_pipe.defaults)
    resolve(GenerationRequest(**BASE, tome=0.5, controls=(unit,)), tiny_pipe.defaults)   # ToMe combines


# ---- int8 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_pipe():
    model = random_model()   # its own copy: quantisation rewrites the model in place
    return Pipeline(LoadedModel(model, "tiny-random", state_hash(model)), quantize="int8")


def test_int8_quantises_the_transformers_and_is_recorded(int8_pipe, tiny_pipe):
    assert is_quantized(int8_pipe.model.unet) and not is_quantized(tiny_pipe.model.unet)
    a, b = gen(int8_pipe, seed=5), gen(int8_pipe, seed=5)
    assert np.array_equal(arrays(a)[0], arrays(b)[0])
    assert a.records[0].quantize == "int8" and "Quantize: int8" in a.records[0].to_parameters()
    # close to the float network: the U-Net output differs by a small fraction of its size
    x, t, context, _ = unet_inputs(tiny_pipe.model.unet, batch=1)
    context = context[:, :, :32]
    with torch.no_grad():
        exact, q = tiny_pipe.model.unet(x, t, context), int8_pipe.model.unet(x, t, context)
    assert not torch.equal(exact, q)
    assert (q - exact).norm() < 0.1 * exact.norm()


def test_int8_refuses_loras_unknown_names_and_narrow_models(int8_pipe, tiny_loaded):
    with pytest.raises(LoraError, match="quantised"):
        int8_pipe.lora_uses(resolve(GenerationRequest(**BASE, loras=(LoraSpec("x.safetensors", 1, 1, True),)),
                                    int8_pipe.defaults))
    with pytest.raises(ModelLoadError, match="int4"):
        Pipeline(tiny_loaded, quantize="int4")
    half = random_model().to(torch.bfloat16)
    with pytest.raises(ModelLoadError, match="float32"):
        Pipeline(LoadedModel(half, "half", "0"), quantize="int8")


# ---- the record, the CLI ----------------------------------------------------------------------

def test_record_round_trip_through_json_and_a1111_text():
    r = GenerationRecord(prompt="a", negative_prompt="", seed=1, steps=2, sampler="Euler", cfg=3.0, width=32,
                         height=32, model_name="m", model_hash="h", deepcache=3, tome=0.5, quantize="int8")
    text = r.to_parameters()
    assert "DeepCache: 3, ToMe: 0.5, Quantize: int8" in text
    assert GenerationRecord.from_json(r.to_json()) == r
    back = GenerationRecord.from_parameters(text)
    assert (back.deepcache, back.tome, back.quantize) == (3, 0.5, "int8")


def test_cli_flags_record_and_replay_with_from(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--seed", "7", "--out", str(out), "--model", "tiny-random", "--steps", "4",
            "--size", "32x32", "--deepcache", "2", "--tome", "0.5", "--quantize", "int8"]   # int8: fp32 even on AMX
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    first = sorted(out.glob("*.png"))[0]
    record = read_record(first)
    assert (record.deepcache, record.tome, record.quantize) == (2, 0.5, "int8")
    again = runner.invoke(app, ["generate", "--from", str(first), "--out", str(out)])
    assert again.exit_code == 0, again.output
    second = sorted(out.glob("*.png"))[1]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert read_record(second) == record


@pytest.mark.parametrize("flag,value,message", [("--tome", "0.9", "tome"), ("--deepcache", "0", "deepcache"),
                                                ("--quantize", "int4", "quantization")])
def test_cli_bad_values_exit_2_with_one_line(tmp_path, flag, value, message):
    r = CliRunner().invoke(app, ["generate", "x", "--model", "tiny-random", "--out", str(tmp_path), flag, value])
    assert r.exit_code == 2 and message in r.output and not list(tmp_path.glob("*.png")), r.output


def test_a1111_api_takes_the_fields_records_them_and_refuses_bad_values(tiny_pipe, tmp_path):
    from fastapi.testclient import TestClient
    from marble.server.app import create_app
    from marble.server.state import ServerConfig
    body = {"prompt": BASE["prompt"], "steps": 3, "width": 32, "height": 32, "seed": 5, "sampler_name": "Euler"}
    with TestClient(create_app([tiny_pipe], ServerConfig(outputs=tmp_path, max_queue=2)),
                    raise_server_exceptions=False) as client:
        r = client.post("/sdapi/v1/txt2img", json={**body, "deepcache": 2, "tome": 0.5})
        assert r.status_code == 200, r.text
        assert "DeepCache: 2, ToMe: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
        direct = tiny_pipe.generate(resolve(GenerationRequest(
            prompt=BASE["prompt"], steps=3, width=32, height=32, seed=5, sampler="Euler", deepcache=2, tome=0.5),
            tiny_pipe.defaults))
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(served, arrays(direct)[0])
        bad = client.post("/sdapi/v1/txt2img", json={**body, "tome": 0.9})
        assert bad.status_code == 400 and "tome" in bad.text


# ---- quality floors on the built-in model --------------------------------------------------

# docs/bench.md ("Quality floors") states these for the built-in model at its defaults (64², DPM++ 2M
# Karras, 15 steps, CFG 4): each approximation's mean PSNR against the exact image of the same seed,
# over FLOOR_PROMPTS. benchmarks/approximations.py measures the same quantity over 16 prompts.
FLOOR_PROMPTS = ("a red circle above a blue square", "two blue squares", "a purple star below an orange circle",
                 "a small green circle to the right of a large red triangle")
FLOORS = {"DeepCache 2": ({"deepcache": 2}, False, 20.0), "DeepCache 3": ({"deepcache": 3}, False, 17.0),
          "ToMe 0.5": ({"tome": 0.5}, False, 20.0), "int8": ({}, True, 30.0)}


def builtin_images(pipe, **fields) -> list[np.ndarray]:
    return [np.asarray(pipe.generate(resolve(GenerationRequest(prompt=p, seed=1000 + i, **fields),
                                             pipe.defaults)).images[0]) for i, p in enumerate(FLOOR_PROMPTS)]


@pytest.fixture(scope="module")
def builtin_pipes():
    """The exact and the int8 pipeline, and the exact images every floor is measured against (made once)."""
    from marble.pipeline import load_pipeline
    exact = load_pipeline("builtin")
    return {False: exact, True: load_pipeline("builtin", quantize="int8")}, builtin_images(exact)


@pytest.mark.parametrize("name", list(FLOORS))
def test_each_approximation_keeps_its_stated_quality_floor_on_the_builtin_model(builtin_pipes, name):
    fields, quantized, floor = FLOORS[name]
    pipes, exact = builtin_pipes
    approx = builtin_images(pipes[quantized], **fields)
    scores = [psnr(a, b) for a, b in zip(approx, exact)]
    assert all(np.isfinite(scores)), f"{name} left an image unchanged: is it applied?"
    assert np.mean(scores) >= floor, f"{name}: mean PSNR {np.mean(scores):.1f} dB below its floor {floor} dB"
