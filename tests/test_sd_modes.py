"""Every core mode with SD checkpoints (txt2img, img2img, inpaint, negative prompt, CFG, every
sampler, PNG records with A1111's model hash), the 9-channel inpainting U-Net's extra input, and
`marble convert` / `marble generate` on SD files from the command line."""
import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.detect import open_checkpoint
from marble.checkpoints.resolve import LoadedModel, load_model, random_model
from marble.checkpoints.sd_single_file import write_single_file
from marble.cli import app
from marble.diffusion.samplers import SAMPLERS
from marble.pipeline import Pipeline, inpaint_concat, pil_to_pixels
from marble.png import read_text_chunks
from marble.request import GenerationRequest, resolve
from sd_fixtures import tiny_sd

SIZE = 32


def sha10(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:10]


def init_and_mask():
    g = np.random.default_rng(0)
    init = Image.fromarray(g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    return init, Image.fromarray(mask)


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    """A tiny SD1-layout single file stored in fp16 (as released SD files are), and the model it came from."""
    root = tmp_path_factory.mktemp("sd")
    model = random_model(lambda: tiny_sd("sd1"), seed=11).half()
    path = write_single_file(from_model(model), root / "tiny-sd1.safetensors")
    return path, model


def requests():
    init, mask = init_and_mask()
    base = dict(prompt="a red cat", seed=5, steps=3, width=SIZE, height=SIZE)   # 2 steps would make 2M = Euler
    yield "txt2img", GenerationRequest(**base, cfg=7.5, sampler="Euler")
    yield "negative", GenerationRequest(**base, negative_prompt="blurry", cfg=7.5, sampler="Euler")
    yield "no-cfg", GenerationRequest(**base, cfg=1.0, sampler="Euler")
    yield "img2img", GenerationRequest(**base, cfg=5.0, sampler="Euler", init_image=init, strength=0.6)
    yield "inpaint", GenerationRequest(**base, cfg=5.0, sampler="Euler", init_image=init, mask=mask, strength=1.0)
    for name in SAMPLERS:
        yield f"sampler {name}", GenerationRequest(**base, cfg=3.0, sampler=name)


def test_every_mode_and_sampler_runs_on_a_single_file_exactly_as_on_its_weights(sd_files):
    """The fp16 SD file, loaded into fp32, generates in every mode exactly what the same weights
    (cast the same way) generate, and records the file's A1111 hash and name."""
    path, model = sd_files
    loaded = load_model(str(path))
    assert loaded.hash == sha10(path) and loaded.name == "tiny-sd1"
    assert loaded.model.dtype == torch.float32
    reference = Pipeline(LoadedModel(model.float(), "ref", "0"))
    ours = Pipeline(loaded)
    seen = {}
    for label, request in requests():
        result = ours.generate(resolve(request, ours.defaults))
        want = reference.generate(resolve(request, reference.defaults)).images[0]
        got = result.images[0]
        assert np.array_equal(np.asarray(got), np.asarray(want)), label
        seen.setdefault(np.asarray(got).tobytes(), []).append(label)
        record = result.records[0]
        assert (record.model_hash, record.model_name) == (loaded.hash, "tiny-sd1")
        assert f"Model hash: {loaded.hash}" in record.to_parameters()
    # modes and samplers give different images, except the pairs that are the same method
    # (samplers.py: DDIM with eta 0 is Euler in σ; Euler a with eta 1 is the DDPM posterior step)
    same = sorted(sorted(labels) for labels in seen.values() if len(labels) > 1)
    assert same == [["sampler DDIM", "sampler Euler"], ["sampler DDPM", "sampler Euler a"]]
    init, mask = init_and_mask()
    inpaint = next(r for l, r in requests() if l == "inpaint")
    inpainted = np.asarray(ours.generate(resolve(inpaint, ours.defaults)).images[0])
    keep = np.asarray(mask) == 0
    assert np.array_equal(inpainted[keep], np.asarray(init)[keep])   # unmasked pixels are the init's


def test_nine_channel_unet_gets_mask_and_masked_image_latent(tmp_path):
    """ldm's c_concat: [mask (binarised, nearest-resized to the latent), VAE latent of the init image
    with the repainted region blanked], in both CFG halves; txt2img repaints everything from a blank."""
    model = random_model(lambda: tiny_sd("sd1", in_channels=9), seed=2)
    path = write_single_file(from_model(model), tmp_path / "inpaint.safetensors")
    loaded = load_model(str(path))
    assert loaded.model.config.unet.in_channels == 9
    seen = []
    unet = loaded.model.unet
    forward = unet.forward
    unet.forward = lambda x, t, context, concat=None: (seen.append(concat), forward(x, t, context, concat))[1]
    init, mask = init_and_mask()
    pipe = Pipeline(loaded)
    pipe.generate(resolve(GenerationRequest(prompt="a cat", seed=1, steps=2, cfg=4.0, sampler="Euler", width=SIZE,
                                            height=SIZE, init_image=init, mask=mask, strength=1.0), pipe.defaults))
    pixels = pil_to_pixels(init, SIZE, SIZE)
    m = torch.from_numpy(np.asarray(mask) >= 128).float()[None, None]
    with torch.no_grad():
        want = torch.cat([F.interpolate(m, size=(SIZE // 4, SIZE // 4)), loaded.model.vae.encode(pixels * (1 - m))], 1)
    assert len(seen) == 2 and all(c.shape == (2, 5, SIZE // 4, SIZE // 4) for c in seen)
    assert torch.equal(seen[0][0], want[0]) and torch.equal(seen[0][1], want[0])
    assert torch.equal(inpaint_concat(loaded.model.vae, pixels, None, SIZE, SIZE)[:, :1], torch.ones(1, 1, 8, 8))
    seen.clear()
    pipe.generate(resolve(GenerationRequest(prompt="a cat", seed=1, steps=1, cfg=1.0, sampler="Euler", width=SIZE,
                                            height=SIZE), pipe.defaults))
    with torch.no_grad():
        blank = loaded.model.vae.encode(torch.zeros(1, 3, SIZE, SIZE))
    assert torch.equal(seen[0][:, :1], torch.ones(1, 1, 8, 8)) and torch.equal(seen[0][:, 1:], blank)


# --- command line ----------------------------------------------------------------------------------

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_convert_cli_round_trip_and_one_line_errors(sd_files, tmp_path):
    path, _ = sd_files
    r = run("convert", path, tmp_path / "pipe", "--to", "diffusers")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "pipe")
    r = run("convert", tmp_path / "pipe", tmp_path / "back.safetensors", "--to", "single-file")
    assert r.exit_code == 0, r.output
    a, b = load_file(str(path)), load_file(str(tmp_path / "back.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    r = run("convert", path, tmp_path / "m.safetensors", "--to", "marble", "--dtype", "bf16", "--prediction", "v")
    assert r.exit_code == 0, r.output
    converted = open_checkpoint(tmp_path / "m.safetensors")
    assert converted.config.prediction == "v" and converted.state["unet.out.2.weight"].dtype == torch.bfloat16

    before = (tmp_path / "back.safetensors").read_bytes()
    cases = [
        (("convert", path, tmp_path / "back.safetensors", "--to", "marble"), "exists"),
        (("convert", tmp_path / "nothing.safetensors", tmp_path / "x", "--to", "marble"), "no model"),
        (("convert", path, tmp_path / "y", "--to", "onnx"), ""),
    ]
    torch.save(load_file(str(path)), tmp_path / "m.ckpt")
    cases.append((("convert", tmp_path / "m.ckpt", tmp_path / "z", "--to", "marble"), "--allow-pickle"))
    for args, words in cases:
        r = run(*args)
        assert r.exit_code == 2, r.output
        if words:
            assert words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (tmp_path / "back.safetensors").read_bytes() == before
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def test_generate_cli_on_an_sd_file_records_the_a1111_hash(sd_files, tmp_path):
    path, _ = sd_files
    r = run("generate", "a red cat", "--model", path, "--seed", 3, "--steps", 2, "--size", f"{SIZE}x{SIZE}",
            "--cfg", 7.5, "--negative", "blurry", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    png = r.stdout.strip().splitlines()[-1]
    parameters = read_text_chunks(png)["parameters"]
    assert f"Model hash: {sha10(path)}" in parameters and "Model: tiny-sd1" in parameters
    assert "Negative prompt: blurry" in parameters
    r = run("generate", "a red cat", "--model", path, "--prediction", "q", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "--prediction" in r.output
