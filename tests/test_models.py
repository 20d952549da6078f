"""U-Net and VAE: structure (SD key layout and sizes), numerics, and the marble file format."""
import math
import pickle

import pytest
import torch

from marble.checkpoints.checkpoint import file_hash, from_model, to_model
from marble.checkpoints.marble_format import read_marble, read_vae, write_marble, write_vae
from marble.checkpoints.resolve import load_model, random_model
from marble.errors import ModelLoadError
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
    path = write_marble(from_model(tiny_loaded.model), tmp_path / "m.safetensors")
    loaded = to_model(read_marble(path))
    a, b = tiny_loaded.model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == tiny_loaded.model.config
    # fp16 shipping: values equal the fp16 rounding of the originals
    half = to_model(read_marble(write_marble(from_model(tiny_loaded.model, dtype=torch.float16), tmp_path / "h.safetensors")))
    k = "unet.out.2.weight"
    assert torch.equal(half.state_dict()[k], a[k].half().float())
    with pytest.raises(FileExistsError):
        write_marble(from_model(tiny_loaded.model), path)
    assert load_model(str(path)).hash == file_hash(path)


def test_the_shipped_model_loads_exactly_as_the_safetensors_library_reads_it():
    """marble reads safetensors with its own streaming reader (marble/tensor_file.py); the library
    is the oracle: every tensor equal, bit for bit, after the same cast."""
    from safetensors.torch import load_file

    from marble.checkpoints.resolve import builtin_path
    reference = load_file(str(builtin_path()))
    for dtype in (torch.float32, torch.float16):
        state = load_model("builtin", dtype).model.state_dict()
        assert set(reference) <= set(state)
        assert all(torch.equal(state[k], v.to(dtype)) for k, v in reference.items())


def test_the_reader_casts_through_its_staging_buffer_bit_for_bit(tmp_path):
    """read_tensors reads the tensors it casts into one reused buffer: every tensor, read as a
    whole dict (so a later read overwriting the buffer would show), equals the safetensors
    library's after the same cast; tensors it does not cast are their own storage."""
    from safetensors.torch import load_file, save_file

    from marble.tensor_file import read_header, read_tensors
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(64, 33, generator=g).half(), "small": torch.randn(5, generator=g).half(),
               "bf": torch.randn(3, 7, generator=g).bfloat16(), "scalar": torch.tensor(1.5).half(),
               "empty": torch.zeros(0, 4).half(), "f32": torch.randn(9, generator=g),
               "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
               "ids": torch.arange(7), "mask": torch.tensor([True, False, True])}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    reference = load_file(str(path))
    header = read_header(path)
    for dtype in (torch.float32, torch.float16, None):
        state = dict(read_tensors(header, dtype=dtype))
        assert state.keys() == reference.keys()
        for k, v in reference.items():
            want = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            assert state[k].dtype == want.dtype and state[k].shape == want.shape, k
            assert torch.equal(state[k].view(torch.uint8) if k == "f8" and dtype is None else state[k],
                               want.view(torch.uint8) if k == "f8" and dtype is None else want), (k, dtype)
        pointers = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
        assert len(set(pointers)) == len(pointers)


def test_vae_file_round_trip_is_bit_exact_and_checks_its_format(tmp_path, tiny_loaded):
    vae = tiny_loaded.model.vae
    loaded = read_vae(write_vae(vae, tmp_path / "vae.safetensors"))
    assert loaded.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values(), strict=True))
    with pytest.raises(ModelLoadError, match="not a marble VAE"):
        read_vae(write_marble(from_model(tiny_loaded.model), tmp_path / "m.safetensors"))


def test_truncated_or_corrupt_model_files_are_refused(tmp_path, tiny_loaded):
    good = write_marble(from_model(tiny_loaded.model), tmp_path / "m.safetensors").read_bytes()
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


# one config path: marble.config -------------------------------------------------------------------

def test_every_model_config_round_trips_through_json_by_one_function():
    import json

    from marble.config import config_from_dict, config_from_json, config_to_dict, config_to_json
    from marble.models.latent_diffusion import LatentDiffusionConfig, tiny_config
    from marble.models.unet import UNetConfig
    from marble.train.config import TrainConfig
    config = tiny_config()
    d = json.loads(config_to_json(config))
    assert d["unet"]["channel_mult"] == [1, 2] and d["vae"]["ch_mult"] == [1, 2]
    back = config_from_json(LatentDiffusionConfig, config_to_json(config))
    assert back == config and back.unet.channel_mult == (1, 2)    # tuples come back as tuples
    for preset in UNET_PRESETS.values():
        assert config_from_dict(UNetConfig, json.loads(json.dumps(config_to_dict(preset)))) == preset
    train = TrainConfig()
    assert config_from_dict(TrainConfig, json.loads(json.dumps(config_to_dict(train)))) == train
    # a partial table: nested configs keep their other defaults; None stays None for `X | None`
    partial = config_from_dict(TrainConfig, {"data": {"n": 7, "world": None}})
    assert (partial.data.n, partial.data.world, partial.data.size) == (7, None, 64)


def test_unknown_and_missing_keys_are_one_error_type_with_one_message():
    from marble.config import config_from_dict, config_to_dict
    from marble.errors import ConfigError
    from marble.models.latent_diffusion import LatentDiffusionConfig, tiny_config
    from marble.models.unet import UNetConfig
    from marble.models.vae import VAEConfig
    from marble.train.config import TrainConfig
    good = config_to_dict(tiny_config())
    cases = [
        (UNetConfig, {"depth": 3, "width": 1}, "unknown keys in config: depth, width"),
        (VAEConfig, {"chmult": [1]}, "unknown keys in config: chmult"),
        (LatentDiffusionConfig, {**good, "unet": {**good["unet"], "depth": 3}}, r"unknown keys in config\.unet: depth"),
        (LatentDiffusionConfig, {k: v for k, v in good.items() if k not in ("vae", "name")},
         "missing keys in config: name, vae"),
        (TrainConfig, {"optim": {"learning_rate": 1}}, r"unknown keys in config\.optim: learning_rate"),
        (TrainConfig, {"data": 5}, r"config\.data must be a table, not int"),
    ]
    for cls, data, message in cases:
        with pytest.raises(ConfigError, match=f"^{message}$"):
            config_from_dict(cls, data)
    assert issubclass(ConfigError, ValueError)   # callers that catch ValueError keep working
