"""Candidate (a) of the built-in model v2 (issue 20): the U-Net with explicit 2-D position,
coordinate channels at the input and a sin-cos position embedding in every spatial transformer.
Off by default: every existing U-Net (SD, SDXL, the shipped built-in model) builds, loads and runs
exactly as before."""
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from marble.models import layers, unet as unet_module
from marble.models.layers import SpatialTransformer, coordinate_channels, position_embedding_2d, timestep_embedding
from marble.models.unet import UNET_PRESETS, UNet

# sha256 of every preset's state-dict keys and shapes, computed before the position fields existed
PRESET_KEYS = "8ec10b65b19e66889265102f4b7b453c27e672b34a1dc559ad7c6efec1a316ef"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "builtin.safetensors"


def test_default_unets_keep_their_keys_and_shapes():
    out = {}
    with torch.device("meta"):
        for name, c in UNET_PRESETS.items():
            assert not c.coord_channels and not c.attention_position
            out[name] = sorted((k, list(v.shape)) for k, v in UNet(c).state_dict().items())
    assert hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest() == PRESET_KEYS


def _never(*args, **kwargs):
    raise AssertionError("a position input was computed for a U-Net without one")


def test_the_shipped_model_never_touches_the_position_code(monkeypatch):
    """With the fields off the position code is not on the path at all, so outputs are the old
    ones bit for bit (and its file, written before the fields existed, reads with them off)."""
    from marble.checkpoints.marble_format import read_marble
    monkeypatch.setattr(unet_module, "coordinate_channels", _never)
    monkeypatch.setattr(layers, "position_embedding_2d", _never)
    ckpt = read_marble(SHIPPED)
    c = ckpt.config.unet
    assert not c.coord_channels and not c.attention_position
    net = UNet(c).eval()
    net.load_state_dict({k[5:]: v.float() for k, v in ckpt.state.items() if k.startswith("unet.")})
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, c.context_dim, generator=g)
    with torch.no_grad():
        a, b = net(x, torch.tensor([10.0, 900.0]), ctx), net(x, torch.tensor([10.0, 900.0]), ctx)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_coordinate_channels_are_cell_centres():
    grid = coordinate_channels(torch.zeros(3, 4, 2, 4))
    assert grid.shape == (3, 2, 2, 4)
    assert torch.equal(grid[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))      # x along a row
    assert torch.equal(grid[0, 1, :, 0], torch.tensor([-0.5, 0.5]))                  # y down a column
    assert torch.equal(grid[2], grid[0])


def test_position_embedding_codes_row_and_column():
    pe = position_embedding_2d(4, 8, 16).reshape(4, 8, 16)
    rows = timestep_embedding((torch.arange(4) + 0.5) * 4.0, 8)
    cols = timestep_embedding((torch.arange(8) + 0.5) * 2.0, 8)
    assert torch.equal(pe[:, 3, :8], rows) and torch.equal(pe[2, :, 8:], cols)
    assert len({tuple(v.tolist()) for v in pe.reshape(32, 16)}) == 32                # every cell distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        position_embedding_2d(2, 2, 6)


@pytest.mark.parametrize("position", [False, True])
def test_attention_sees_position_only_when_asked(position):
    """A transformer is permutation-equivariant: on a constant map every token comes out equal,
    unless a position embedding tells the tokens apart."""
    torch.manual_seed(0)
    st = SpatialTransformer(16, 2, 8, 12, groups=4, position=position).eval()
    for p in st.parameters():
        p.data.normal_(0, 0.3)
    x = torch.ones(1, 16, 4, 4) + torch.arange(16.0)[None, :, None, None] * 0.1        # constant over space
    with torch.no_grad():
        y = st(x, torch.randn(1, 3, 12))[0].reshape(16, 16).T        # (token, channel)
    spread = (y - y.mean(0, keepdim=True)).abs().max()
    assert (spread > 1e-2) if position else (spread < 1e-5)


def test_coordinates_enter_only_through_the_two_extra_input_channels():
    """A coordinate U-Net whose weights on the coordinate channels are zero is the plain U-Net."""
    plain_c = UNET_PRESETS["tiny"]
    torch.manual_seed(0)
    coords = UNet(replace(plain_c, coord_channels=True)).eval()
    assert coords.input_blocks[0][0].weight.shape[1] == plain_c.in_channels + 2
    for p in coords.parameters():
        p.data.normal_(0, 0.1)
    plain = UNet(plain_c).eval()
    state = coords.state_dict()
    w = state["input_blocks.0.0.weight"]
    plain.load_state_dict({**state, "input_blocks.0.0.weight": w[:, :plain_c.in_channels]})
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        moved = coords(x, t, ctx)
        w[:, plain_c.in_channels:] = 0
        assert torch.allclose(coords(x, t, ctx), plain(x, t, ctx), atol=1e-6)
        assert (moved - plain(x, t, ctx)).abs().max() > 1e-3


def test_diffusers_export_refuses_position_unets():
    from marble.checkpoints.diffusers_folder import unet_config_to_diffusers
    c = replace(UNET_PRESETS["tiny"], coord_channels=True)
    with pytest.raises(ValueError, match="position"):
        unet_config_to_diffusers(c, 32)
