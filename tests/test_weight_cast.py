"""Storage dtype (marble.models.weight_cast): weights kept in fp16/bf16 and computed in float32 give
exactly the outputs of a float32 model whose weights were rounded to that dtype, at half the
weight memory; through the networks, the pipeline, load_model and `marble generate --weights`."""
import numpy as np
import pytest
import torch

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.resolve import LoadedModel, load_model, random_model
from marble.checkpoints.sd_single_file import write_single_file
from marble.models.weight_cast import compute_dtype, store_weights, storage_dtype
from marble.pipeline import Pipeline
from marble.request import GenerationRequest, resolve
from sd_fixtures import tiny_sd, tiny_sdxl


def rounded(model, dtype):
    """The float32 model with every weight rounded to `dtype` and back: the oracle. (Rounded in
    place: a deepcopy of a LatentDiffusion would keep its denoiser closure on the original U-Net.)"""
    for p in model.parameters():
        p.data = p.data.to(dtype).float()
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def image(model, **kw) -> np.ndarray:
    pipe = Pipeline(LoadedModel(model, "m", "h"))
    request = GenerationRequest(prompt="a red cat", negative_prompt="blurry", seed=3, steps=3, sampler="Euler",
                                width=32, height=32, **kw)
    return np.asarray(pipe.generate(resolve(request, pipe.defaults)).images[0])


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", [tiny_sd, tiny_sdxl], ids=["sd1", "sdxl"])
@torch.no_grad()
def test_stored_weights_compute_exactly_as_rounded_float32_weights(config, storage):
    model = random_model(config, seed=2)
    oracle = rounded(random_model(config, seed=2), storage)
    stored = store_weights(random_model(config, seed=2), storage)
    assert {p.dtype for p in stored.parameters()} == {storage}
    assert weight_bytes(stored) * 2 == weight_bytes(model)
    assert compute_dtype(stored.unet) == stored.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 250.5])
    encoder = stored.text_encoder
    cond = {"context": torch.randn(2, 77, stored.config.unet.context_dim, generator=g)}
    if stored.config.vector is not None:
        cond["y"] = torch.randn(2, stored.config.unet.adm_in_channels, generator=g)
        got_text, want_text = encoder.encode_pooled(["a cat", ""]), oracle.text_encoder.encode_pooled(["a cat", ""])
        assert all(torch.equal(a, b) for a, b in zip(got_text, want_text))
    else:
        assert torch.equal(encoder.encode(["a cat", ""]), oracle.text_encoder.encode(["a cat", ""]))
    got, want = stored.unet(x, t, **cond), oracle.unet(x, t, **cond)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert not torch.equal(want, model.unet(x, t, **cond))   # the rounding is visible: the test can fail
    assert torch.equal(stored.vae.decode(x[:1]), oracle.vae.decode(x[:1]))
    pixels = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(stored.vae.encode(pixels), oracle.vae.encode(pixels))
    init = image(oracle)
    from PIL import Image
    assert np.array_equal(image(stored), init)
    assert np.array_equal(image(stored, init_image=Image.fromarray(init), strength=0.5),
                          image(oracle, init_image=Image.fromarray(init), strength=0.5))


def test_load_model_and_generate_take_a_storage_dtype(tmp_path):
    """load_model(storage=fp16) reads straight into fp16 and computes in float32; `marble generate
    --weights fp16` gives the rounded float32 model's image; a bad name is one line, exit 2."""
    from PIL import Image
    from typer.testing import CliRunner

    from marble.cli import app
    model = random_model(tiny_sdxl, seed=4)
    path = write_single_file(from_model(model), tmp_path / "xl.safetensors")
    loaded = load_model(str(path), storage=torch.float16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16} and loaded.model.dtype == torch.float32
    want = image(rounded(model, torch.float16))   # after writing the file: rounds `model` in place
    assert np.array_equal(image(loaded.model), want)
    args = ["generate", "a red cat", "--negative", "blurry", "--model", str(path), "--seed", "3", "--steps", "3",
            "--sampler", "Euler", "--size", "32x32"]
    result = CliRunner().invoke(app, [*args, "--weights", "fp16", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (png,) = (tmp_path / "out").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), want)
    result = CliRunner().invoke(app, [*args, "--weights", "fp8", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "--weights must be one of fp32, fp16, bf16, not 'fp8'" in result.output
    with pytest.raises(ValueError, match="weights must be one of"):
        storage_dtype("int8")


@pytest.mark.parametrize("copy_above", [float("inf"), 0.0], ids=["hooked", "copied"])
@torch.no_grad()
def test_a_lora_overlay_on_stored_weights_is_the_rounded_models(copy_above):
    """An unfused LoRA on fp16-stored weights: low-rank branches (hooks) computed in float32 give
    the rounded float32 model's output exactly; patched copies are stored in fp16 like the weights."""
    from marble.adapters.lora import LoraUse, overlay
    from marble.adapters.lora_files import Lora, LoraLayer
    from marble.adapters.lora_table import module_table
    oracle = rounded(random_model(tiny_sd, seed=2), torch.float16)
    stored = store_weights(random_model(tiny_sd, seed=2), torch.float16)
    g = torch.Generator().manual_seed(5)
    layers = {}
    for name, target in module_table(stored).targets.items():
        w = target.module.weight
        if w.ndim == 2 and sum(n.split(".")[0] == name.split(".")[0] for n in layers) < 3:   # 3 per component
            layers[name] = LoraLayer(torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g), 2.0)
    assert {n.split(".")[0] for n in layers} == {"unet", "text_encoder"}
    use = [LoraUse(Lora("l", layers))]
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0])
    context = torch.randn(1, 77, stored.config.unet.context_dim, generator=g)
    rows = stored.text_encoder.tokenize(["a red cat"])
    with overlay(stored, use, copy_above=copy_above):
        got = stored.unet(x, t, context), stored.text_encoder(rows)
    with overlay(oracle, use, copy_above=copy_above):
        want = oracle.unet(x, t, context), oracle.text_encoder(rows)
    plain = oracle.unet(x, t, context), oracle.text_encoder(rows)
    assert not any(torch.equal(a, b) for a, b in zip(want, plain))   # the LoRA acts on both
    if copy_above == float("inf"):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    else:   # W + ΔW rounded to the storage dtype: close, not equal
        assert all((a - b).abs().max() < 1e-2 * b.abs().max() for a, b in zip(got, want))
    assert {p.dtype for p in stored.parameters()} == {torch.float16}
