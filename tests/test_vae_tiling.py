"""Tiled VAE encode/decode (marble.models.vae_tiling): diffusers' `enable_tiling()` on identical
random weights, the untiled path below a tile, and the opt-in from the CLI to the record."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from marble.checkpoints.diffusers_keys import rename, vae_reverse_table, vae_from_diffusers_tensor
from marble.models.vae import AutoencoderKL
from marble.models.vae_tiling import check_tile_size, tiled, tiled_decode, tiled_encode
from sd_fixtures import TINY_VAE, diffusers_oracle, diffusers_vae_kwargs, randomize_

TILE = 64   # pixels: diffusers_vae_kwargs' sample_size, so diffusers tiles at the same size (16 latent cells)


@pytest.fixture(scope="module")
def vaes():
    """A diffusers AutoencoderKL with seeded weights and marble's VAE holding the same weights."""
    diffusers = diffusers_oracle()
    theirs = randomize_(diffusers.AutoencoderKL(**diffusers_vae_kwargs()), seed=5)
    table = vae_reverse_table(TINY_VAE)
    ours = AutoencoderKL(TINY_VAE).eval()
    state = {rename(k, table): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict({k: vae_from_diffusers_tensor(k, v) for k, v in state.items()})
    theirs.enable_tiling()
    assert (theirs.tile_sample_min_size, theirs.tile_latent_min_size) == (TILE, TILE // 4)
    return ours, theirs


@torch.no_grad()
def test_tiled_decode_matches_diffusers(vaes):
    ours, theirs = vaes
    # 40 x 56 latent cells: tiles start at 0, 12, 24, 36 (rows) and 0, ..., 48 (columns), the last clipped
    latent = torch.randn(2, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    want = theirs.decode(latent / theirs.config.scaling_factor).sample
    got = tiled_decode(ours, latent, TILE)
    assert got.shape == want.shape == (2, 3, 160, 224)
    assert want.abs().max() > 0.5 and (got - want).abs().max() < 1e-5


@torch.no_grad()
def test_tiled_encode_matches_diffusers(vaes):
    ours, theirs = vaes
    pixels = torch.rand(2, 3, 160, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = theirs.encode(pixels).latent_dist.mean * theirs.config.scaling_factor
    got = tiled_encode(ours, pixels, TILE)
    assert got.shape == want.shape == (2, 4, 40, 56)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < 1e-5


@torch.no_grad()
def test_within_one_tile_is_the_untiled_codec_bit_for_bit(vaes):
    ours, _ = vaes
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 16, 12, generator=g)      # 16 cells = one 64-pixel tile: not tiled
    assert torch.equal(tiled_decode(ours, latent, TILE), ours.decode(latent))
    pixels = torch.rand(1, 3, 64, 40, generator=g) * 2 - 1
    assert torch.equal(tiled_encode(ours, pixels, TILE), ours.encode(pixels))
    assert tiled(ours, 0) is ours


@torch.no_grad()
def test_tiling_changes_the_image(vaes):
    """Not the untiled image: every tile normalises with its own GroupNorm statistics (and attends
    within itself), so the values differ everywhere, most where tiles meet and fade."""
    ours, _ = vaes
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    untiled, tiled_ = ours.decode(latent), tiled_decode(ours, latent, TILE)
    assert untiled.shape == tiled_.shape and (untiled - tiled_).abs().max() > 1e-2


def test_tile_sizes_are_checked():
    assert check_tile_size(0, 8) == 0 and check_tile_size(512, 8) == 512
    for bad in (-32, 500, 16, True, 2.0, 16384 + 32):
        with pytest.raises(ValueError, match="multiple of 32"):
            check_tile_size(bad, 8)


# --- the opt-in, from the CLI to the record ----------------------------------------------------------

runner = CliRunner()


def run(*args):
    from marble.cli import app
    return runner.invoke(app, list(args))


def record_of(path):
    from marble.png import read_record
    return read_record(path)


def test_cli_flag_tiles_the_decode_and_is_recorded(tmp_path):
    """The built-in model (64², 16 latent cells) with 32-pixel tiles: 3 × 3 tiles. The image differs
    from the untiled one, the record says so, and --from replays it exactly."""
    common = ["generate", "a red circle", "--seed", "3", "--steps", "2"]
    plain = run(*common, "--out", str(tmp_path / "plain"))
    tiled_run = run(*common, "--vae-tile-size", "32", "--out", str(tmp_path / "tiled"))
    assert plain.exit_code == 0 and tiled_run.exit_code == 0, plain.output + tiled_run.output
    (a,), (b,) = (sorted((tmp_path / d).glob("*.png")) for d in ("plain", "tiled"))
    assert a.read_bytes() != b.read_bytes()
    assert record_of(a).vae_tile_size == 0 and record_of(b).vae_tile_size == 32
    assert "VAE tile size: 32" in record_of(b).to_parameters()
    replay = run("generate", "--from", str(b), "--out", str(tmp_path / "replay"))
    assert replay.exit_code == 0, replay.output
    (c,) = sorted((tmp_path / "replay").glob("*.png"))
    assert c.read_bytes() == b.read_bytes()
    # --vae-tiling alone: 512-pixel tiles, larger than the image: recorded, and the untiled pixels
    flag = run(*common, "--vae-tiling", "--out", str(tmp_path / "flag"))
    assert flag.exit_code == 0, flag.output
    (d,) = sorted((tmp_path / "flag").glob("*.png"))
    from marble.cli.generate import DEFAULT_TILE
    from marble.models.vae_tiling import DEFAULT_TILE as LIBRARY_TILE
    assert record_of(d).vae_tile_size == DEFAULT_TILE == LIBRARY_TILE == 512
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(d)))


def test_cli_bad_tile_size_is_one_line_exit_2(tmp_path):
    result = run("generate", "x", "--model", "tiny-random", "--vae-tile-size", "20", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["marble: error: the VAE tile size must be a multiple of 8 pixels "
                                                  "up to 16384 (0 = off), got 20"]
    assert not list(tmp_path.glob("*.png"))


def test_record_reads_the_tile_size_back():
    from marble.record import GenerationRecord
    rec = GenerationRecord(prompt="p", negative_prompt="", seed=1, steps=2, sampler="Euler", cfg=7.0, width=64,
                           height=64, model_name="m", model_hash="h", vae_tile_size=256)
    assert GenerationRecord.from_json(rec.to_json()) == rec
    assert GenerationRecord.from_parameters(rec.to_parameters()).vae_tile_size == 256
    assert json.loads(rec.to_json())["vae_tile_size"] == 256


# --- the pipeline: every encode and decode of a request tiles ------------------------------------

BASE = dict(prompt="two red circles", steps=2, sampler="Euler", cfg=5.0, width=32, height=32, seed=4)


@pytest.fixture
def spied(monkeypatch):
    """Counts of the tiled codec's calls that actually tiled (input larger than a tile), and the
    VAEs they ran on ("encode by", "decode by")."""
    import marble.models.vae_tiling as vt
    calls = {"encode": 0, "decode": 0}

    def spy(name, real, latent):
        def call(vae, x, tile):
            calls[name] += max(x.shape[-2:]) * (vae.downsampling_factor if latent else 1) > tile
            calls.setdefault(f"{name} by", []).append(vae)
            return real(vae, x, tile)
        return call
    monkeypatch.setattr(vt, "tiled_encode", spy("encode", vt.tiled_encode, False))
    monkeypatch.setattr(vt, "tiled_decode", spy("decode", vt.tiled_decode, True))
    return calls


def counts(calls):
    return {k: calls[k] for k in ("encode", "decode")}


def test_pipeline_tiles_img2img_inpaint_and_hires(tiny_pipe, spied):
    from marble.hires import HiresFix
    from marble.request import GenerationRequest, resolve
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))

    def gen(**kw):
        return tiny_pipe.generate(resolve(GenerationRequest(**{**BASE, **kw}), tiny_pipe.defaults))
    plain = gen(init_image=init)
    assert counts(spied) == {"encode": 0, "decode": 0}
    tiled_ = gen(init_image=init, vae_tile_size=8)
    assert counts(spied) == {"encode": 1, "decode": 1} and tiled_.records[0].vae_tile_size == 8
    assert plain.records[0].vae_tile_size == 0
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(tiled_.images[0]))
    gen(init_image=init, mask=mask, vae_tile_size=8)
    assert counts(spied) == {"encode": 2, "decode": 2}
    # hires with an image upscaler: the first pass decoded, resized and encoded again, then the decode
    gen(hires=HiresFix(scale=2.0, steps=1, denoise=0.5, upscaler="Lanczos"), vae_tile_size=16)
    assert counts(spied) == {"encode": 3, "decode": 4}


def test_pipeline_tiles_an_inpainting_unets_masked_image_and_the_refiners_decode(spied):
    from marble.checkpoints.resolve import LoadedModel, random_model
    from marble.pipeline import Pipeline
    from marble.request import GenerationRequest, resolve
    from sd_fixtures import tiny_sd, tiny_sdxl
    inpainting = Pipeline(LoadedModel(random_model(lambda: tiny_sd("sd1", 9), seed=1), "inpaint", "h"))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    request = GenerationRequest(**BASE, init_image=Image.new("RGB", (32, 32), (20, 90, 200)), mask=mask,
                                vae_tile_size=16)   # factor 4: 8 latent cells, tiles of 4
    inpainting.generate(resolve(request, inpainting.defaults))
    assert counts(spied) == {"encode": 2, "decode": 1}   # the init image, the masked image (c_concat)
    both = Pipeline(LoadedModel(random_model(tiny_sdxl, seed=5), "m", "h"),
                    refiner=LoadedModel(random_model(lambda: tiny_sdxl(True), seed=6), "r", "h"))
    both.generate(resolve(GenerationRequest(**BASE, vae_tile_size=16), both.defaults))
    assert counts(spied) == {"encode": 2, "decode": 2} and spied["decode by"][-1] is both.refiner.model.vae


def test_request_refuses_bad_tile_sizes(tiny_pipe):
    from marble.request import GenerationRequest, RequestError, resolve
    for bad in (12, -8, "512", 1.5):
        with pytest.raises(RequestError, match="VAE tile size"):
            resolve(GenerationRequest(**BASE, vae_tile_size=bad), tiny_pipe.defaults)
    assert resolve(GenerationRequest(**BASE), tiny_pipe.defaults).vae_tile_size == 0


def test_a1111_api_takes_vae_tile_size(tiny_pipe, tmp_path):
    import base64
    import io
    from fastapi.testclient import TestClient
    from marble.request import GenerationRequest, resolve
    from marble.server.app import create_app
    from marble.server.state import ServerConfig
    body = {"prompt": BASE["prompt"], "steps": 2, "width": 32, "height": 32, "seed": 5, "sampler_name": "Euler"}
    with TestClient(create_app([tiny_pipe], ServerConfig(outputs=tmp_path, max_queue=2)),
                    raise_server_exceptions=False) as client:
        r = client.post("/sdapi/v1/txt2img", json={**body, "vae_tile_size": 16})
        assert r.status_code == 200, r.text
        assert "VAE tile size: 16" in json.loads(r.json()["info"])["infotexts"][0]
        direct = tiny_pipe.generate(resolve(GenerationRequest(
            prompt=BASE["prompt"], steps=2, width=32, height=32, seed=5, sampler="Euler", vae_tile_size=16),
            tiny_pipe.defaults))
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(served, np.asarray(direct.images[0]))
        bad = client.post("/sdapi/v1/txt2img", json={**body, "vae_tile_size": 12})
        assert bad.status_code == 400 and "VAE tile size" in bad.text
