"""U-Net and VAE: structure (SD key layout and sizes), numerics, and the marble file format."""
import math
import pickle

import pytest
import torch

from marble.checkpoints.errors import ModelLoadError
from marble.checkpoints.marble_format import file_hash, load_model_file, save_model
from marble.checkpoints.resolve import load_model, random_model
from marble.models.layers import GroupNorm32, timestep_embedding
from marble.models.unet import UNET_PRESETS, UNet
from marble.models.vae import VAE_PRESETS, AutoencoderKL


def test_sd15_unet_and_vae_have_the_original_sizes_and_key_layout():
    with torch.device("meta"):
        unet = UNet(UNET_PRESETS["sd15"])
        vae = AutoencoderKL(VAE_PRESETS["sd"])
    # parameter counts of the released SD1.5 U-Net and VAE
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    keys = set(unet.state_dict())
    assert len(keys) == 686
    for k in ["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
              "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight",
              "output_blocks.5.2.conv.weight", "out.2.weight", "time_embed.2.bias",
              "input_blocks.4.0.skip_connection.weight", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"]:
        assert k in keys, k
    vkeys = set(vae.state_dict())
    assert len(vkeys) == 248
    for k in ["encoder.down.0.downsample.conv.weight", "decoder.up.3.block.2.conv2.weight",
              "decoder.up.1.upsample.conv.weight", "encoder.mid.attn_1.q.weight", "quant_conv.weight",
              "post_quant_conv.weight", "encoder.down.1.block.0.nin_shortcut.weight"]:
        assert k in vkeys, k
    assert unet.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)


def test_sd21_uses_linear_projections_and_64_channel_heads():
    with torch.device("meta"):
        unet = UNet(UNET_PRESETS["sd21"])
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724  # SD2.x U-Net
    assert unet.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    block = unet.input_blocks[1][1].transformer_blocks[0].attn1
    assert block.heads == 5  # 320 channels / 64


def test_timestep_embedding_golden():
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 500.5]), 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    for row, t in enumerate([0.0, 1.0, 500.5]):
        want = [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]
        assert torch.allclose(emb[row], torch.tensor(want), atol=2e-4 * max(1.0, t / 100))


def test_groupnorm32_computes_in_float32():
    torch.manual_seed(0)
    gn = GroupNorm32(4, 8)
    x = (torch.randn(2, 8, 5, 5) * 100 + 1000).to(torch.bfloat16)
    half = gn(x)
    assert half.dtype == torch.bfloat16
    # statistics and normalisation in fp32, one rounding at the end
    assert torch.equal(half, gn(x.float()).to(torch.bfloat16))


def test_unet_accepts_odd_latent_sides(tiny_loaded):
    unet = tiny_loaded.model.unet
    y = unet(torch.randn(1, 4, 7, 9), torch.tensor([3.0]), torch.randn(1, 5, 32))
    assert y.shape == (1, 4, 7, 9)


def test_vae_round_trip_shapes_and_scale(tiny_loaded):
    vae = tiny_loaded.model.vae
    x = torch.rand(2, 3, 24, 32) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 12, 16)
    mean, _ = vae.posterior(x)
    assert torch.equal(z, mean * vae.config.scaling_factor)
    assert vae.decode(z).shape == x.shape


def test_marble_file_round_trip_is_bit_exact(tmp_path, tiny_loaded):
    path = save_model(tiny_loaded.model, tmp_path / "m.safetensors")
    loaded = load_model_file(path)
    a, b = tiny_loaded.model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == tiny_loaded.model.config
    # fp16 shipping: values equal the fp16 rounding of the originals
    half = load_model_file(save_model(tiny_loaded.model, tmp_path / "h.safetensors", dtype=torch.float16))
    k = "unet.out.2.weight"
    assert torch.equal(half.state_dict()[k], a[k].half().float())
    with pytest.raises(FileExistsError):
        save_model(tiny_loaded.model, path)
    assert load_model(str(path)).hash == file_hash(path)


def test_truncated_or_corrupt_model_files_are_refused(tmp_path, tiny_loaded):
    good = save_model(tiny_loaded.model, tmp_path / "m.safetensors").read_bytes()
    cases = {"truncated": good[: len(good) // 2], "empty": b"", "garbage": b"\x00" * 64,
             "bad-header": (50).to_bytes(8, "little") + b"{not json" + b" " * 100}
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(ModelLoadError):
            load_model(str(p))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(p))
    q = tmp_path / "evil.safetensors"
    q.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelLoadError):
        load_model(str(q))
    assert not marker.exists()


def test_random_model_is_reproducible():
    a, b = random_model(), random_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_skeleton_builds_shapes_only_and_leaves_other_initialisation_alone():
    import threading

    from marble.models.skeleton import skeleton

    with skeleton():
        emb = torch.nn.Embedding(1000, 64)
        lin = torch.nn.Linear(8, 8)
    assert emb.weight.is_meta and lin.weight.is_meta
    # outside, and in another thread while a skeleton is open, modules initialise as usual
    seen = {}
    with skeleton():
        t = threading.Thread(target=lambda: seen.update(w=torch.nn.Embedding(10, 4).weight))
        t.start()
        t.join()
    assert not seen["w"].is_meta and seen["w"].std() > 0.5
    torch.manual_seed(0)
    a = torch.nn.Embedding(10, 4).weight
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.init.normal_(torch.empty(10, 4)))


def test_loading_the_builtin_model_does_not_import_torch_dynamo():
    """The meta kernels of the init functions import torch._dynamo (~2 s of a cold start); loading
    must not run them."""
    import subprocess
    import sys

    code = ("import sys; from marble.pipeline import load_pipeline; load_pipeline('builtin'); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
