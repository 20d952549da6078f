"""Hires fix sizes and upscales (marble.hires): A1111's target-size rules and crops, written out."""
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
def test_square_first_pass(kwargs, expected):
    assert hires_size(512, 512, **kwargs) == expected


def test_wide_first_pass_and_both_sides():
    assert hires_size(768, 512, scale=2) == HiresSize(1536, 1024, 1536, 1024)
    assert hires_size(768, 512, resize_x=1024) == HiresSize(1024, 680, 1024, 680)    # 1024·512//768 = 682
    assert hires_size(768, 512, resize_x=800, resize_y=800) == HiresSize(1200, 800, 800, 800)
    assert hires_size(512, 768, resize_x=800, resize_y=600) == HiresSize(800, 1200, 800, 600)


@pytest.mark.parametrize("kwargs", [dict(scale=0.5), dict(scale=9), dict(scale=float("nan")), dict(resize_x=-8),
                                    dict(resize_x=3, resize_y=3), dict(resize_x=1.5)])
def test_bad_sizes_are_one_line(kwargs):
    with pytest.raises(HiresError) as e:
        hires_size(512, 512, **kwargs)
    assert "\n" not in str(e.value)


def test_upscaler_names():
    assert upscaler_name(None) == "Latent" and upscaler_name("lanczos") == "Lanczos"
    assert upscaler_name("LATENT (bicubic)") == "Latent (bicubic)"
    with pytest.raises(HiresError, match="R-ESRGAN 4x\\+.*Lanczos"):
        upscaler_name("R-ESRGAN 4x+")
    assert "Lanczos" in UPSCALERS and "Latent" in UPSCALERS


def test_latent_upscale_is_interpolation_then_centre_crop():
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    size = hires_size(96, 64, resize_x=128, resize_y=128)      # cover 192x128, crop the width to 128
    out = upscale_latent(latent, size, 8, "Latent")
    full = F.interpolate(latent, size=(16, 24), mode="bilinear", antialias=False)
    assert out.shape == (1, 4, 16, 16) and torch.equal(out, full[:, :, :, 4:20])
    nearest = upscale_latent(latent, hires_size(96, 64, scale=2), 8, "Latent (nearest)")
    assert torch.equal(nearest, latent.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_image_upscale_crops_whole_latent_cells():
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    size = hires_size(96, 64, resize_x=136, resize_y=128)      # cover 192x128 -> 136 wide: 7 cells cut
    out = upscale_image(image, size, 8, "Lanczos")
    assert out.size == (136, 128)
    full = image.resize((192, 128), Image.LANCZOS)
    assert out.tobytes() == full.crop((24, 0, 160, 128)).tobytes()      # 3 cells before, 4 after


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
