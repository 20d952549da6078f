"""SDXL's options and modes against diffusers on identical random weights: size/crop
micro-conditioning and the refiner's aesthetic scores, img2img (StableDiffusionXLImg2ImgPipeline),
inpainting through the same path, the CLI flags, the record and --from, and bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.resolve import LoadedModel, random_model
from marble.checkpoints.sd_single_file import write_single_file
from marble.models.conditioning import MicroConditioning
from marble.pipeline import Pipeline
from marble.request import GenerationRequest, RequestError, resolve
from sd_fixtures import tiny_sd, tiny_sdxl
from sdxl_oracle import PROMPTS, diffusers_pipeline_of, euler_start

MICRO = MicroConditioning(original_size=(80, 96), crop_top_left=(8, 16), target_size=(40, 56),
                          negative_original_size=(32, 24), negative_crop_top_left=(4, 0),
                          negative_target_size=(72, 64))


def _image(pipe: Pipeline, **kw) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPTS[0], seed=42, steps=8, sampler="Euler", cfg=5.0, **kw)
    return np.asarray(pipe.generate(resolve(request, pipe.defaults)).images[0]).astype(int)


def _init_image(width: int, height: int) -> Image.Image:
    g = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1) + g.integers(0, 30, (height, width, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_size_and_crop_micro_conditioning_matches_stable_diffusion_xl_pipeline(tmp_path):
    """Non-default original size, crop and target size, and different ones for the negative prompt
    (diffusers' negative_*), within 1/255 of StableDiffusionXLPipeline; and they change the image."""
    model = random_model(tiny_sdxl, seed=5)
    theirs_pipe = diffusers_pipeline_of(model, tmp_path)
    width, height = 64, 48
    ours = Pipeline(LoadedModel(model, "m", "h"))
    got = _image(ours, negative_prompt="blurry", width=width, height=height, micro=MICRO)
    plain = _image(ours, negative_prompt="blurry", width=width, height=height)
    start = euler_start(theirs_pipe, 42, 8, (1, 4, height // 4, width // 4))
    hw = lambda size: size[::-1]   # noqa: E731  marble takes (width, height), diffusers (height, width)
    theirs = theirs_pipe(PROMPTS[0], negative_prompt="blurry", num_inference_steps=8, guidance_scale=5.0,
                         height=height, width=width, latents=start, original_size=hw(MICRO.original_size),
                         crops_coords_top_left=MICRO.crop_top_left, target_size=hw(MICRO.target_size),
                         negative_original_size=hw(MICRO.negative_original_size),
                         negative_crops_coords_top_left=MICRO.negative_crop_top_left,
                         negative_target_size=hw(MICRO.negative_target_size)).images[0]
    theirs = np.asarray(theirs).astype(int)
    assert got.std() > 20 and np.abs(got - plain).max() > 10
    assert np.abs(got - theirs).max() <= 1


@torch.no_grad()
def test_refiner_aesthetic_scores_and_sizes_match_the_img2img_pipeline_time_ids(tmp_path):
    """The refiner's y with non-default scores, size and crop: diffusers' pooled text and
    _get_add_time_ids (requires_aesthetics_score) through add_time_proj, for both branches."""
    refiner = random_model(lambda: tiny_sdxl(True), seed=6)
    theirs = diffusers_pipeline_of(refiner, tmp_path, refiner=True)
    pipe = Pipeline(LoadedModel(refiner, "r", "h"))
    micro = MicroConditioning(original_size=(80, 96), crop_top_left=(8, 16), negative_original_size=(32, 24),
                              negative_crop_top_left=(4, 0), aesthetic_score=7.5, negative_aesthetic_score=1.0)
    req = resolve(GenerationRequest(prompt=PROMPTS[0], negative_prompt="blurry", seed=1, steps=2, width=48, height=64,
                                    micro=micro), pipe.defaults)
    cond, uncond, zero = pipe.vector_conditioning(refiner, pipe.conditioning(req), req, 48, 64)
    _, _, pooled, negative_pooled = theirs.encode_prompt(PROMPTS[0], negative_prompt="blurry",
                                                         do_classifier_free_guidance=True)
    ids, negative_ids = theirs._get_add_time_ids((96, 80), (8, 16), (64, 48), 7.5, 1.0, (24, 32), (4, 0), (64, 48),
                                                 torch.float32, text_encoder_projection_dim=32)
    for y, p, i in ((cond["y"], pooled, ids), (uncond["y"], negative_pooled, negative_ids)):
        want = torch.cat([p, theirs.unet.add_time_proj(i.flatten()).reshape(1, -1)], dim=1)
        assert (y - want).abs().max() < 1e-5
    assert not zero
    default = resolve(GenerationRequest(prompt=PROMPTS[0], seed=1, steps=2, width=48, height=64), pipe.defaults)
    y = pipe.vector_conditioning(refiner, pipe.conditioning(default), default, 48, 64)
    ids, negative_ids = theirs._get_add_time_ids((64, 48), (0, 0), (64, 48), 6.0, 2.5, (64, 48), (0, 0), (64, 48),
                                                 torch.float32, text_encoder_projection_dim=32)
    for got, i in ((y[0]["y"], ids), (y[1]["y"], negative_ids)):   # diffusers' defaults 6.0 / 2.5
        assert (got[:, 32:] - theirs.unet.add_time_proj(i.flatten()).reshape(1, -1)).abs().max() < 1e-6


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_stable_diffusion_xl_img2img_pipeline(tmp_path, strength):
    """img2img within 1/255 of StableDiffusionXLImg2ImgPipeline. marble encodes the init image to
    its posterior mean; diffusers samples the posterior by default, so the oracle is asked for the
    mean (retrieve_latents' sample_mode="argmax"), which leaves the generator to draw the noise."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module
    from diffusers import StableDiffusionXLImg2ImgPipeline
    model = random_model(tiny_sdxl, seed=5)
    base = diffusers_pipeline_of(model, tmp_path)
    theirs_pipe = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False,
                                                   force_zeros_for_empty_prompt=True)
    theirs_pipe.set_progress_bar_config(disable=True)
    init = _init_image(48, 64)
    ours = _image(Pipeline(LoadedModel(model, "m", "h")), negative_prompt="blurry", init_image=init, strength=strength)
    original = module.retrieve_latents
    module.retrieve_latents = lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax")
    try:
        theirs = theirs_pipe(PROMPTS[0], image=init, negative_prompt="blurry", strength=strength, num_inference_steps=8,
                             guidance_scale=5.0, generator=torch.Generator().manual_seed(42)).images[0]
    finally:
        module.retrieve_latents = original
    theirs = np.asarray(theirs).astype(int)
    assert ours.shape == (64, 48, 3) and ours.std() > 20
    assert np.abs(ours - np.asarray(init).astype(int)).max() > 10
    assert np.abs(ours - theirs).max() <= 1


def test_sdxl_inpainting_runs_through_the_img2img_path_and_keeps_the_unmasked_pixels():
    model = random_model(tiny_sdxl, seed=5)
    pipe = Pipeline(LoadedModel(model, "m", "h"))
    init = _init_image(48, 64)
    mask = np.zeros((64, 48), np.uint8)
    mask[16:48, 8:40] = 255
    got = _image(pipe, init_image=init, mask=Image.fromarray(mask), strength=0.8)
    keep = mask == 0
    assert np.array_equal(got[keep], np.asarray(init).astype(int)[keep])
    assert np.abs(got[~keep] - np.asarray(init).astype(int)[~keep]).max() > 10


def test_micro_conditioning_is_checked_in_the_request():
    sdxl = Pipeline(LoadedModel(random_model(tiny_sdxl, seed=5), "m", "h"))
    sd = Pipeline(LoadedModel(random_model(tiny_sd, seed=5), "m", "h"))
    cases = [(sd, MicroConditioning(original_size=(64, 64)), "original_size applies to SDXL models only"),
             (sdxl, MicroConditioning(aesthetic_score=6.0), "aesthetic_score applies to an SDXL refiner only"),
             (sdxl, MicroConditioning(target_size=(0, 64)), r"target_size must be two integers in \[1, 16384\]"),
             (sdxl, MicroConditioning(crop_top_left=(-1, 0)), r"crop_top_left must be two integers in \[0, 16384\]"),
             (sdxl, MicroConditioning(original_size=(64,)), "original_size must be two integers")]
    for pipe, micro, message in cases:
        with pytest.raises(RequestError, match=message):
            resolve(GenerationRequest(prompt="x", micro=micro), pipe.defaults)
    both = Pipeline(LoadedModel(random_model(tiny_sdxl, seed=5), "m", "h"),
                    refiner=LoadedModel(random_model(lambda: tiny_sdxl(True), seed=6), "r", "h"))
    with pytest.raises(RequestError, match=r"negative_aesthetic_score must be a number in \[0, 10\]"):
        resolve(GenerationRequest(prompt="x", micro=MicroConditioning(negative_aesthetic_score=float("nan"))),
                both.defaults)
    assert both.defaults.micro == ("size", "aesthetic") and sd.defaults.micro == ()


def test_cli_micro_flags_reach_the_image_and_the_record_and_from_reloads_the_refiner(tmp_path):
    """The CLI's micro-conditioning flags give the library's image; the PNG's record keeps them and
    names the refiner by path, and --from regenerates the same image with the refiner reloaded."""
    from typer.testing import CliRunner

    from marble.cli import app
    from marble.pipeline import load_pipeline
    from marble.png import read_record, read_text_chunks
    base = write_single_file(from_model(random_model(tiny_sdxl, seed=3)), tmp_path / "base.safetensors")
    refiner = write_single_file(from_model(random_model(lambda: tiny_sdxl(True), seed=4)), tmp_path / "ref.safetensors")
    args = ["generate", "a red cat", "--model", str(base), "--refiner", str(refiner), "--seed", "5", "--steps", "5",
            "--sampler", "Euler", "--size", "32x32", "--refiner-switch", "0.6", "--original-size", "64x48",
            "--crop-top-left", "8,0", "--target-size", "32x40", "--aesthetic-score", "7", "--negative-aesthetic-score",
            "2", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pipe = load_pipeline(str(base), refiner=str(refiner), refiner_switch=0.6)
    micro = MicroConditioning(original_size=(64, 48), crop_top_left=(8, 0), target_size=(32, 40),
                              aesthetic_score=7.0, negative_aesthetic_score=2.0)
    request = GenerationRequest(prompt="a red cat", seed=5, steps=5, sampler="Euler", width=32, height=32, micro=micro)
    want = np.asarray(pipe.generate(resolve(request, pipe.defaults)).images[0])
    default = np.asarray(pipe.generate(resolve(GenerationRequest(
        prompt="a red cat", seed=5, steps=5, sampler="Euler", width=32, height=32), pipe.defaults)).images[0])
    (png,) = (tmp_path / "out").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), want)
    assert np.abs(want.astype(int) - default).max() > 0
    record = read_record(png)
    assert record.micro == micro.given() and record.refiner_path == str(refiner.resolve())
    assert "Refiner: ref [" in read_text_chunks(png)["parameters"]
    result = CliRunner().invoke(app, ["generate", "--from", str(png), "--out", str(tmp_path / "again"),
                                      "--model", str(base)])
    assert result.exit_code == 0, result.output
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), want)
    refiner.rename(tmp_path / "moved.safetensors")
    result = CliRunner().invoke(app, ["generate", "--from", str(png), "--out", str(tmp_path / "bad"),
                                      "--model", str(base)])
    assert result.exit_code == 2 and "names the refiner ref [" in result.output and "pass --refiner PATH" in result.output
    bad = ["generate", "a cat", "--model", str(base), "--size", "32x32", "--steps", "1", "--out", str(tmp_path / "b")]
    for extra, message in ((["--original-size", "64"], "--original-size must look like WIDTHxHEIGHT"),
                           (["--aesthetic-score", "6"], "aesthetic_score applies to an SDXL refiner only"),
                           (["--refiner-switch", "0.5"], "--refiner-switch needs --refiner")):
        result = CliRunner().invoke(app, [*bad, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b").exists()


def test_bad_sdxl_input_is_one_line_and_exit_2(tmp_path):
    """SD3 and Flux files named by family; a refiner without an SDXL base; an SDXL refiner given as
    the base with --refiner; sizes off the latent grid (8 for SDXL, 4 for the tiny one) or over --max-pixels: one line, exit 2, no output."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from marble.cli import app
    sd1 = write_single_file(from_model(random_model(tiny_sd, seed=1)), tmp_path / "sd1.safetensors")
    base = write_single_file(from_model(random_model(tiny_sdxl, seed=3)), tmp_path / "base.safetensors")
    refiner = write_single_file(from_model(random_model(lambda: tiny_sdxl(True), seed=4)), tmp_path / "ref.safetensors")
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "sd3.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    out = tmp_path / "out"
    cases = [
        (["--model", str(tmp_path / "sd3.safetensors")], "this looks like an SD3 checkpoint; marble loads SD1.x, SD2.x and SDXL"),
        (["--model", str(tmp_path / "flux.safetensors")], "this looks like an Flux checkpoint"),
        (["--model", str(sd1), "--refiner", str(refiner)], "a refiner needs an SDXL base model; tiny-sd1 is not one"),
        (["--model", str(refiner), "--refiner", str(refiner)], "(it is a refiner itself)"),
        (["--model", str(base), "--refiner", str(base)], "tiny-sdxl is not an SDXL refiner"),
        (["--model", str(base), "--size", "34x32"], "width 34 is not a multiple of the model's latent factor 4"),
        (["--model", str(base), "--size", "64x64", "--max-pixels", "4000"], "size 64x64 is over the model's limit of 4000 pixels"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["generate", "a cat", "--steps", "1", "--out", str(out), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
