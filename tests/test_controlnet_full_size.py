"""A full-size SD1.5 ControlNet (random weights, built from the architecture) in lllyasviel's layout:
marble reads it, converts it to a diffusers folder, and both hold tensor for tensor what diffusers'
own ControlNetModel.from_single_file reads from the same file. fp16 keeps the memory near 2 GB."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from marble.checkpoints.controlnet_files import ControlNetFile, read_controlnet, write_controlnet
from marble.checkpoints.diffusers_keys import controlnet_table, rename
from marble.models.controlnet import ControlNet, controlnet_config
from marble.models.unet import UNET_PRESETS
from sd_fixtures import diffusers_oracle

pytestmark = pytest.mark.slow

diffusers = diffusers_oracle()


@torch.no_grad()
def test_full_size_sd15_controlnet_matches_diffusers_from_single_file(tmp_path):
    from diffusers import ControlNetModel
    config = controlnet_config(UNET_PRESETS["sd15"], 8)
    with torch.device("meta"):
        net = ControlNet(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in net.state_dict().items():
        scale = 1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1
        state[name] = (torch.randn(p.shape, generator=g) * scale).half()
    with torch.device("meta"):   # diffusers' SD1.5 ControlNet: its defaults but the context width
        reference = ControlNetModel(cross_attention_dim=768)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in reference.parameters())
    path = write_controlnet(ControlNetFile(config, state, tmp_path, "", "marble"), tmp_path / "cn.safetensors",
                            "single-file")
    del state
    ours = read_controlnet(path, unet=UNET_PRESETS["sd15"])
    assert ours.config == config and ours.kind == "single-file"
    reference.save_config(tmp_path / "config")   # diffusers needs a config for single files; offline, this one
    theirs = ControlNetModel.from_single_file(path, config=str(tmp_path / "config"), torch_dtype=torch.float16,
                                              local_files_only=True).state_dict()
    table = controlnet_table(config.unet, 2 * len(config.hint_block))
    assert len(theirs) == len(ours.state)
    for key, tensor in ours.state.items():
        assert torch.equal(theirs[rename(key, table)], tensor), key
    folder = write_controlnet(ours, tmp_path / "diffusers", "diffusers")
    del ours
    again = read_controlnet(folder, unet=UNET_PRESETS["sd15"])
    for key, tensor in again.state.items():
        assert torch.equal(theirs[rename(key, table)], tensor), key
