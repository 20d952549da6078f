"""Hires fix sizes and upscales (marble.hires): A1111's target-size rules and crops, written out."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from marble.hires import (UPSCALERS, HiresError, HiresSize, hires_size, upscale_image, upscale_latent,
                          upscaler_name)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(scale=2), HiresSize(1024, 1024, 1024, 1024)),
    (dict(scale=1.5), HiresSize(768, 768, 768, 768)),
    (dict(scale=1.3), HiresSize(664, 664, 664, 664)),              # int(512·1.3) = 665, floored to 8
    (dict(resize_x=1000), HiresSize(1000, 1000, 1000, 1000)),
    (dict(resize_y=768), HiresSize(768, 768, 768, 768)),
    (dict(resize_x=1024, resize_y=768), HiresSize(1024, 1024, 1024, 768)),   # cover, then crop the height
])
@pytest.mark.unit
def test_square_first_pass(kwargs, expected):
    assert hires_size(512, 512, **kwargs) == expected


@pytest.mark.unit
def test_wide_first_pass_and_both_sides():
    assert hires_size(768, 512, scale=2) == HiresSize(1536, 1024, 1536, 1024)
    assert hires_size(768, 512, resize_x=1024) == HiresSize(1024, 680, 1024, 680)    # 1024·512//768 = 682
    assert hires_size(768, 512, resize_x=800, resize_y=800) == HiresSize(1200, 800, 800, 800)
    assert hires_size(512, 768, resize_x=800, resize_y=600) == HiresSize(800, 1200, 800, 600)


@pytest.mark.parametrize("kwargs", [dict(scale=0.5), dict(scale=9), dict(scale=float("nan")), dict(resize_x=-8),
                                    dict(resize_x=3, resize_y=3), dict(resize_x=1.5)])
@pytest.mark.unit
def test_bad_sizes_are_one_line(kwargs):
    with pytest.raises(HiresError) as e:
        hires_size(512, 512, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_upscaler_names():
    assert upscaler_name(None) == "Latent" and upscaler_name("lanczos") == "Lanczos"
    assert upscaler_name("LATENT (bicubic)") == "Latent (bicubic)"
    with pytest.raises(HiresError, match="R-ESRGAN 4x\\+.*Lanczos"):
        upscaler_name("R-ESRGAN 4x+")
    assert "Lanczos" in UPSCALERS and "Latent" in UPSCALERS


@pytest.mark.unit
def test_latent_upscale_is_interpolation_then_centre_crop():
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    size = hires_size(96, 64, resize_x=128, resize_y=128)      # cover 192x128, crop the width to 128
    out = upscale_latent(latent, size, 8, "Latent")
    full = F.interpolate(latent, size=(16, 24), mode="bilinear", antialias=False)
    assert out.shape == (1, 4, 16, 16) and torch.equal(out, full[:, :, :, 4:20])
    nearest = upscale_latent(latent, hires_size(96, 64, scale=2), 8, "Latent (nearest)")
    assert torch.equal(nearest, latent.repeat_interleave(2, 2).repeat_interleave(2, 3))


@pytest.mark.unit
def test_image_upscale_crops_whole_latent_cells():
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    size = hires_size(96, 64, resize_x=136, resize_y=128)      # cover 192x128 -> 136 wide: 7 cells cut
    out = upscale_image(image, size, 8, "Lanczos")
    assert out.size == (136, 128)
    full = image.resize((192, 128), Image.LANCZOS)
    assert out.tobytes() == full.crop((24, 0, 160, 128)).tobytes()      # 3 cells before, 4 after


@pytest.mark.unit
def test_record_writes_a1111s_hires_fields_in_a1111s_order():
    from marble.record import GenerationRecord, parse_parameters
    base = GenerationRecord(prompt="a (red:1.3) hat BREAK forest", negative_prompt="", seed=7, steps=20,
                            sampler="Euler a", cfg=7.0, width=64, height=64, model_name="builtin",
                            model_hash="0123456789", marble_version="0.1.0")
    hires = GenerationRecord(**{**base.__dict__, "hires_upscaler": "Latent", "hires_scale": 2.0, "hires_steps": 10,
                                "hires_denoise": 0.55})
    assert hires.to_parameters().split("\n")[-1] == (
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 64x64, Model hash: 0123456789, Model: builtin, "
        "Denoising strength: 0.55, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Version: marble 0.1.0")
    resized = GenerationRecord(**{**hires.__dict__, "hires_resize_x": 128, "hires_resize_y": 96, "hires_steps": 0,
                                  "hires_upscaler": "Lanczos"})
    parsed = parse_parameters(resized.to_parameters())
    assert parsed["Hires resize"] == "128x96" and "Hires steps" not in parsed and parsed["Hires upscaler"] == "Lanczos"
    assert parsed["Denoising strength"] == "0.55" and parsed["Prompt"] == "a (red:1.3) hat BREAK forest"
    assert GenerationRecord.from_json(hires.to_json()) == hires


# ---- the hires fix in the pipeline ------------------------------------------------------------
from marble.hires import HiresFix                                  # noqa: E402
from marble.request import GenerationRequest, RequestError, resolve  # noqa: E402

PROMPT = "two red (circles:1.2) above a blue square"


def run(pipe, **kw):
    base = dict(prompt=PROMPT, seed=5, steps=4, width=32, height=32, sampler="Euler")
    return pipe.generate(resolve(GenerationRequest(**{**base, **kw}), pipe.defaults))


def pixels(image):
    return np.asarray(image)


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest"])
def test_image_upscaler_hires_equals_img2img_by_hand(tiny_pipe, upscaler):
    hires = run(tiny_pipe, n=2, hires=HiresFix(scale=2, steps=3, denoise=0.55, upscaler=upscaler))
    for i, image in enumerate(hires.images):
        first = run(tiny_pipe, seed=5 + i).images[0]
        size = hires_size(32, 32, scale=2, factor=tiny_pipe.model.latent_factor)
        init = upscale_image(first, size, tiny_pipe.model.latent_factor, upscaler)
        by_hand = run(tiny_pipe, seed=5 + i, steps=3, strength=0.55, width=64, height=64, init_image=init).images[0]
        assert image.size == (64, 64) and pixels(image).tobytes() == pixels(by_hand).tobytes()
    record = hires.records[1]
    assert (record.width, record.height, record.seed, record.hires_upscaler) == (32, 32, 6, upscaler)
    assert "Denoising strength: 0.55, Hires upscale: 2, Hires steps: 3, Hires upscaler: " + upscaler \
        in record.to_parameters()


def test_latent_hires_is_the_img2img_path_from_the_upscaled_latent(tiny_pipe):
    pipe, factor = tiny_pipe, tiny_pipe.model.latent_factor
    hires = run(pipe, hires=HiresFix(resize_x=48, resize_y=64, denoise=0.5, upscaler="Latent (bicubic)"))
    assert hires.images[0].size == (48, 64)
    req = resolve(GenerationRequest(prompt=PROMPT, seed=5, steps=4, width=32, height=32, sampler="Euler"),
                  pipe.defaults)
    with torch.inference_mode():
        sigmas = pipe.sigmas("Euler", 4)
        first = pipe.sample("Euler", pipe.denoiser(pipe.conditioning(req), sigmas, req.cfg, {}), sigmas, 5,
                            (1, pipe.model.latent_channels, 32 // factor, 32 // factor))
        assert pixels(pipe_decode(pipe, first)).tobytes() == pixels(run(pipe).images[0]).tobytes()
        start = upscale_latent(first, hires_size(32, 32, resize_x=48, resize_y=64, factor=factor), factor,
                               "Latent (bicubic)")
        sigmas2 = pipe.sigmas("Euler", 4, 0.5)              # hires steps 0: the first pass's 4
        second = pipe.sample("Euler", pipe.denoiser(pipe.conditioning(req, 4), sigmas2, req.cfg, {}), sigmas2, 5,
                             tuple(start.shape), start)
    assert pixels(pipe_decode(pipe, second)).tobytes() == pixels(hires.images[0]).tobytes()
    assert "Hires resize: 48x64" in hires.records[0].to_parameters()


def pipe_decode(pipe, latent):
    from marble.pipeline import pixels_to_pil
    return pixels_to_pil(pipe.model.vae.decode(latent.to(pipe.model.dtype)))[0]


@pytest.mark.parametrize("kw, message", [
    (dict(hires=HiresFix(scale=8)), "over the model's limit"),               # 256x256 > 128x128
    (dict(hires=HiresFix(upscaler="R-ESRGAN 4x+")), "marble can run"),
    (dict(hires=HiresFix(denoise=0)), "denoising strength"),
    (dict(hires=HiresFix(steps=-1)), "hires steps"),
    (dict(hires=HiresFix(), init_image=Image.new("RGB", (32, 32))), "txt2img only"),
    (dict(prompt="a (cat:1.2.3)"), "prompt: attention weight"),
    (dict(negative_prompt="[a:b:-2]"), "negative prompt: prompt editing step"),
])
def test_bad_hires_and_prompts_are_one_line(tiny_pipe, kw, message):
    base = dict(prompt=PROMPT, seed=5, steps=4, width=32, height=32)
    with pytest.raises(RequestError, match=message) as e:
        resolve(GenerationRequest(**{**base, **kw}), tiny_pipe.defaults)
    assert "\n" not in str(e.value)


def test_prompt_editing_in_the_pipeline(tiny_pipe):
    """An edit past the last step is its first prompt, one at step 0 its second, bit for bit; one in
    the middle is neither (the context switched inside the sampling loop)."""
    a, b = "red circles", "blue squares"
    plain_a, plain_b = (pixels(run(tiny_pipe, prompt=p).images[0]).tobytes() for p in (a, b))
    assert pixels(run(tiny_pipe, prompt=f"[{a}:{b}:9]").images[0]).tobytes() == plain_a
    assert pixels(run(tiny_pipe, prompt=f"[{a}:{b}:0]").images[0]).tobytes() == plain_b
    middle = pixels(run(tiny_pipe, prompt=f"[{a}:{b}:1]").images[0]).tobytes()
    assert middle not in (plain_a, plain_b)


# ---- the CLI --------------------------------------------------------------------------------------
class Ran:
    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


def marble_cli(*args):
    from typer.testing import CliRunner

    from marble.cli import app
    return Ran(CliRunner().invoke(app, [str(a) for a in args]))


def test_cli_hires_info_and_from(tmp_path):
    out = tmp_path / "out"
    prompt = "a (red:1.3) circle, " * 8 + "BREAK [blue|green] square"
    p = marble_cli("generate", prompt, "--model", "tiny-random", "--seed", 3, "--steps", 3, "--size", "32x32",
                   "--hires-scale", 2, "--hires-steps", 2, "--hires-denoise", 0.55, "--hires-upscaler", "lanczos",
                   "--out", out)
    assert p.returncode == 0, p.stderr
    assert "tokens" not in p.stderr                      # no truncation warning: the prompt is read whole
    first = out / "marble-00000.png"
    assert Image.open(first).size == (64, 64)
    info = marble_cli("info", first).stdout.strip().split("\n")
    assert info == [prompt, "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 32x32, Model hash: "
                    f"{info[1].split('Model hash: ')[1].split(',')[0]}, Model: tiny-random, Denoising strength: 0.55, "
                    "Hires upscale: 2, Hires steps: 2, Hires upscaler: Lanczos, Version: marble "
                    f"{info[1].rsplit('marble ', 1)[1]}"]
    again = marble_cli("generate", "--from", first, "--model", "tiny-random", "--out", out)
    assert again.returncode == 0, again.stderr
    assert (out / "marble-00001.png").read_bytes() == first.read_bytes()
    comfy = marble_cli("generate", "a (red:1.5) circle", "--model", "tiny-random", "--seed", 3, "--steps", 2, "--size",
                       "32x32", "--emphasis", "comfy", "--out", tmp_path / "comfy")
    assert comfy.returncode == 0, comfy.stderr
    made = tmp_path / "comfy" / "marble-00000.png"
    assert ", Emphasis: ComfyUI, Version: " in marble_cli("info", made).stdout
    replay = marble_cli("generate", "--from", made, "--model", "tiny-random", "--out", tmp_path / "comfy")
    assert replay.returncode == 0 and (tmp_path / "comfy" / "marble-00001.png").read_bytes() == made.read_bytes()
    other = marble_cli("generate", "--from", first, "--model", "tiny-random", "--hires-denoise", 0.3, "--out", out)
    assert other.returncode == 0 and "Denoising strength: 0.3, Hires upscale: 2, Hires steps: 2, Hires upscaler: " \
        "Lanczos" in Image.open(out / "marble-00002.png").info["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--hires-scale", 9], "hires scale"),
    (["--hires-upscaler", "esrgan"], "marble can run"),
    (["--hires-resize", "4000x4000"], "over the model's limit"),
    (["--hires-resize", "12"], "--hires-resize"),
    (["--hires-denoise", 0], "denoising strength"),
])
def test_cli_bad_hires_is_one_line_and_exit_2(tmp_path, args, message):
    p = marble_cli("generate", "x", "--model", "tiny-random", "--size", "32x32", "--steps", 1, *args,
                   "--out", tmp_path)
    assert p.returncode == 2 and message in p.stderr and p.stderr.strip().count("\n") == 0
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("prompt", ["a (x:1.2.3)", "[a:b:-1]", "[a:b:1e999]"])
def test_cli_unreadable_prompt_is_one_line_and_exit_2(tmp_path, prompt):
    p = marble_cli("generate", prompt, "--model", "tiny-random", "--size", "32x32", "--steps", 1, "--out", tmp_path)
    assert p.returncode == 2 and "prompt" in p.stderr and p.stderr.strip().count("\n") == 0


A1111_INFOTEXT = ("masterpiece, (red circle:1.3), [blurry] BREAK blue square, [cat:dog:0.5]\n"
                  "Negative prompt: lowres, (bad:1.2)\n"
                  "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 123, Size: 32x32, "
                  "Model hash: abcdef1234, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, "
                  "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, Version: v1.10.1")


def test_from_an_a1111_png_regenerates_what_its_infotext_says(tmp_path):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_INFOTEXT)
    source = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(source, pnginfo=info)
    replay = marble_cli("generate", "--from", source, "--model", "tiny-random", "--out", tmp_path / "a")
    assert replay.returncode == 0, replay.stderr
    assert "model hash abcdef1234" in replay.stderr          # said, not fatal: another model
    by_flags = marble_cli("generate", "masterpiece, (red circle:1.3), [blurry] BREAK blue square, [cat:dog:0.5]",
                          "--negative", "lowres, (bad:1.2)", "--steps", 3, "--sampler", "DPM++ 2M Karras", "--cfg",
                          6.5, "--seed", 123, "--size", "32x32", "--hires-scale", 2, "--hires-steps", 2,
                          "--hires-denoise", 0.5, "--hires-upscaler", "Latent", "--model", "tiny-random",
                          "--out", tmp_path / "b")
    assert by_flags.returncode == 0, by_flags.stderr
    a, b = tmp_path / "a" / "marble-00000.png", tmp_path / "b" / "marble-00000.png"
    assert Image.open(a).size == (64, 64) and a.read_bytes() == b.read_bytes()
    assert "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent" in \
        marble_cli("info", a).stdout
