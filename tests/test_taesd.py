"""TAESD (marble.models.taesd): parity with diffusers' AutoencoderTiny on identical random weights,
both file layouts, bad files refused with one line, and its use as a preview or final decoder."""
from pathlib import Path

import pytest
import torch

from marble.checkpoints.taesd_file import read_taesd
from marble.errors import ModelLoadError
from marble.fileio import write_new
from marble.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from marble.pipeline import Pipeline, pixels_to_pil
from marble.tensor_file import safetensors_writer

pytestmark = pytest.mark.unit


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    return write_new(path, safetensors_writer({k: v.contiguous() for k, v in state.items()}))


@pytest.fixture(scope="module")
def diffusers_tiny():
    """diffusers' AutoencoderTiny with TAESD's default config and seeded random weights (biases too,
    so every parameter matters), float32."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * ((2 / max(1, p[0].numel())) ** 0.5 if p.ndim > 1 else 0.05))   # He
    return model


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_parity_with_diffusers_autoencoder_tiny(diffusers_tiny, tmp_path):
    path = save(tmp_path / "diffusion_pytorch_model.safetensors", diffusers_tiny.state_dict())
    ours = read_taesd(tmp_path)                                   # the folder form finds the file
    assert ours.encoder is not None and ours.decoder is not None and ours.downsampling_factor == 8
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 8, 8, generator=g) * 2
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        theirs_decoded = diffusers_tiny.decode(latent).sample
        theirs_encoded = diffusers_tiny.encode(pixels).latents
        decoded, encoded = ours.decode(latent), ours.encode(pixels)
    assert decoded.shape == (2, 3, 64, 64) and encoded.shape == (2, 4, 4, 4)
    assert theirs_decoded.std() > 0.05 and theirs_encoded.std() > 0.05     # not a trivial output
    assert relative_error(decoded, theirs_decoded) <= 1e-5
    assert relative_error(encoded, theirs_encoded) <= 1e-5
    assert read_taesd(path).state_dict().keys() == ours.state_dict().keys()


def test_original_repository_layout(diffusers_tiny, tmp_path):
    """taesd_decoder / taesd_encoder: one Sequential each, keys `N.*`; the decoder's index 0 is its
    clamp, so its layers are numbered one higher than diffusers'."""
    state = diffusers_tiny.state_dict()
    dec = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in state.items() if k.startswith("decoder.")}
    enc = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("encoder.")}
    assert "1.weight" in dec and "3.conv.0.weight" in dec and "0.weight" in enc
    decoder = read_taesd(save(tmp_path / "taesd_decoder.safetensors", dec))
    encoder = read_taesd(save(tmp_path / "taesd_encoder.safetensors", enc), need="encoder")
    assert decoder.encoder is None and encoder.decoder is None
    latent = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(decoder.decode(latent), diffusers_tiny.decode(latent).sample) <= 1e-5
        pixels = diffusers_tiny.decode(latent).sample.clamp(-1, 1)
        assert relative_error(encoder.encode(pixels), diffusers_tiny.encode(pixels).latents) <= 1e-5
    with pytest.raises(ValueError, match="no encoder"):
        decoder.encode(pixels)


def test_bad_files_are_refused_with_one_line(diffusers_tiny, tmp_path):
    state = diffusers_tiny.state_dict()
    cases = {
        "missing": (tmp_path / "nope.safetensors", "no TAESD file at"),
        "pickle": (tmp_path / "taesd_decoder.pth", "safetensors files only"),
        "garbage": (tmp_path / "garbage.safetensors", "not a safetensors file"),
        "other": (save(tmp_path / "other.safetensors", {"unet.weight": torch.zeros(2)}), "holds no TAESD weights"),
        "encoder only": (save(tmp_path / "enc.safetensors", {k: v for k, v in state.items() if k.startswith("encoder.")}),
                         "holds no TAESD decoder"),
        "missing key": (save(tmp_path / "cut.safetensors", {k: v for k, v in state.items() if k != "decoder.layers.4.conv.2.weight"}),
                        "does not match TAESD's layout (1 missing keys, e.g. decoder.layers.4.conv.2.weight"),
        "wrong shape": (save(tmp_path / "shape.safetensors", {**state, "decoder.layers.4.conv.2.weight": torch.zeros(64, 64, 1, 1)}),
                        "decoder.layers.4.conv.2.weight has shape [64, 64, 1, 1]"),
    }
    cases["pickle"][0].write_bytes(b"x")
    cases["garbage"][0].write_bytes(b"\x00" * 3)
    for name, (path, message) in cases.items():
        with pytest.raises(ModelLoadError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
            read_taesd(path)
        assert "\n" not in str(err.value), name
    with pytest.raises(ModelLoadError, match="without diffusion_pytorch_model"):
        read_taesd(tmp_path)


def test_cli_refuses_a_bad_decoder_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from marble.cli.app import app
    bad = tmp_path / "taesd.safetensors"
    bad.write_bytes(b"not a file")
    r = CliRunner().invoke(app, ["generate", "x", "--model", "tiny-random", "--decoder", str(bad), "--out",
                                 str(tmp_path / "out")])
    assert r.exit_code == 2 and "is not a valid safetensors file" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --- in the pipeline: a TAESD shaped for the tiny model (latent factor 2) ----------------------------

def tiny_taesd(seed: int) -> TinyAutoencoder:
    torch.manual_seed(seed)
    return TinyAutoencoder(TinyAutoencoderConfig(channels=8, encoder_blocks=(1, 1), decoder_blocks=(1, 1))).eval()


def test_decoder_and_preview_decoder_in_the_pipeline(tiny_loaded):
    from marble.request import GenerationRequest, resolve
    final, preview = tiny_taesd(3), tiny_taesd(4)
    pipe = Pipeline(tiny_loaded, decoder=final, preview_decoder=preview, decoder_name="taesd")
    latents = []
    request = resolve(GenerationRequest(prompt="x", seed=2, steps=2, sampler="Euler", cfg=1.0, width=32, height=32),
                      pipe.defaults)
    result = pipe.generate(request, callback=lambda i, n, x0: latents.append(x0))
    plain = Pipeline(tiny_loaded).generate(request)
    assert result.records[0].vae == "taesd" and "VAE: taesd" in result.records[0].to_parameters()
    with torch.no_grad():
        # the last step's x0 is the final latent (Euler's step to σ = 0)
        assert result.images[0].tobytes() == pixels_to_pil(final.decode(latents[-1]))[0].tobytes()
        assert pipe.preview(latents[0]).tobytes() == pixels_to_pil(preview.decode(latents[0]))[0].tobytes()
    assert result.images[0].tobytes() != plain.images[0].tobytes()


def test_a_decoder_for_other_latents_is_refused(tiny_loaded):
    with pytest.raises(ModelLoadError, match="reads 4-channel latents at 1/8 of the image size; this model's are "
                                             "4-channel at 1/2"):
        Pipeline(tiny_loaded, decoder=TinyAutoencoder())
