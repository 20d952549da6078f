"""The linear latent-to-RGB previewer: the fit is exact on linear data, the table picks the right
numbers per VAE, the built-in's shipped numbers refit from its VAE, and the pipeline previews with it."""
import importlib.util
from pathlib import Path

import pytest
import torch

from marble.models.latent_preview import LATENT_RGB, LatentRGB, fit_latent_rgb, latent_rgb_for
from marble.models.vae import VAE_PRESETS
from marble.pipeline import Pipeline, pixels_to_pil

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


@pytest.mark.unit
def test_fit_recovers_a_linear_map_exactly():
    g = torch.Generator().manual_seed(0)
    m, b = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    latents = torch.randn(5, 4, 6, 7, generator=g, dtype=F64)
    per_cell = torch.einsum("bchw,cr->brhw", latents, m) + b[:, None, None]
    # each latent pixel covers a 4×4 block whose mean is the map's value (the pixels vary inside it)
    wiggle = torch.randn(5, 3, 24, 28, generator=g, dtype=F64)
    wiggle -= torch.nn.functional.avg_pool2d(wiggle, 4).repeat_interleave(4, -2).repeat_interleave(4, -1)
    pixels = per_cell.repeat_interleave(4, -2).repeat_interleave(4, -1) + wiggle
    fitted_m, fitted_b = fit_latent_rgb(latents, pixels)
    torch.testing.assert_close(fitted_m, m, rtol=0, atol=1e-10)
    torch.testing.assert_close(fitted_b, b, rtol=0, atol=1e-10)


@pytest.mark.unit
def test_the_map_and_the_table():
    entry = LatentRGB(((1.0, 0.0, 0.0), (0.0, 2.0, 0.0)), (0.0, 0.0, -0.5), "test")
    latent = torch.tensor([[[[0.25, 3.0]], [[0.125, -0.25]]]])           # (1, 2, 1, 2), exact in binary
    assert entry(latent).tolist() == [[[[0.25, 1.0]], [[0.25, -0.5]], [[-0.5, -0.5]]]]   # clamped to [-1, 1]
    sd, sdxl = latent_rgb_for(VAE_PRESETS["sd"]), latent_rgb_for(VAE_PRESETS["sdxl"])
    assert sd is LATENT_RGB[0.18215] and sdxl is LATENT_RGB[0.13025]
    assert sd.factors[0] == (0.3512, 0.2297, 0.3227) and sdxl.bias == (0.1084, -0.0175, -0.0011)
    assert "ComfyUI" in sd.source and "ComfyUI" in sdxl.source
    assert latent_rgb_for(VAE_PRESETS["sd"].__class__(scaling_factor=0.5)) is None      # unknown VAE
    assert latent_rgb_for(VAE_PRESETS["sd"].__class__(z_channels=16)) is None           # channels differ


def test_the_builtin_numbers_refit_from_its_vae():
    """benchmarks/fit_latent_rgb.py with its defaults gives the shipped numbers (printed to 4
    decimals: 5e-5 rounding, plus float noise from the CPU's kernels well below that)."""
    spec = importlib.util.spec_from_file_location("fit_latent_rgb", ROOT / "benchmarks" / "fit_latent_rgb.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from marble.checkpoints.resolve import builtin_path, load_model
    if not builtin_path().is_file():
        pytest.skip("the built-in model is not in models/")
    factors, bias, quality = script.fit()
    shipped = latent_rgb_for(load_model("builtin").model.config.vae)
    assert shipped is not None, "the built-in VAE changed: rerun benchmarks/fit_latent_rgb.py and update LATENT_RGB"
    torch.testing.assert_close(factors, torch.tensor(shipped.factors, dtype=F64), rtol=0, atol=1e-4)
    torch.testing.assert_close(bias, torch.tensor(shipped.bias, dtype=F64), rtol=0, atol=1e-4)
    assert quality["rms_error"] < 0.6 * quality["rms_spread"]          # measured 0.184 against 0.359


@pytest.mark.unit
def test_the_pipeline_previews_with_the_linear_map(tiny_loaded):
    pipe = Pipeline(tiny_loaded)
    x0 = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    linear = latent_rgb_for(tiny_loaded.model.config.vae)
    assert linear is not None and pipe.previewer is linear                # the tiny VAE keeps SD's scale
    image = pipe.preview(x0)
    assert image.size == (12, 16)                                         # the image's size, latent factor 2
    small = pixels_to_pil(linear(x0[:1]))[0]
    assert image.tobytes() == small.resize((12, 16), 0).tobytes()        # nearest-neighbour enlargement
