"""SDXL's memory at 1024²: the in-place paths taken without autograd compute bit for bit what the
autograd paths compute, and the activation peaks counted on the meta device (marble.eval.live_bytes)
stay where docs/bench.md puts them."""
import pytest
import torch

from marble.eval.live_bytes import LiveBytes, label_children
from marble.models.layers import GEGLU
from marble.models.unet import UNET_PRESETS, UNet
from marble.models.vae import AutoencoderKL, VAEConfig


def test_vae_decode_without_autograd_equals_the_autograd_path_bit_for_bit():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, groups=8))   # 16 → 32 channels: a nin_shortcut
    z = torch.randn(2, 4, 8, 8)
    with torch.enable_grad():
        plain = vae.decode(z)
    assert plain.requires_grad                       # the autograd path: nothing in place
    with torch.inference_mode():
        inplace = vae.decode(z)
    assert torch.equal(plain.detach(), inplace)


def test_sdxl_unet_without_autograd_equals_the_autograd_path_bit_for_bit():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["sdxl-tiny"])
    with torch.no_grad():
        for p in unet.parameters():   # no zero-initialised output convs: every branch counts
            p.normal_(0.0, 0.2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    context, y = torch.randn(2, 7, 64), torch.randn(2, 80)
    with torch.enable_grad():
        plain = unet(x, t, context, y=y)
    with torch.inference_mode():
        inplace = unet(x, t, context, y=y)
    assert plain.requires_grad and torch.equal(plain.detach(), inplace)


def test_geglu_without_autograd_equals_the_autograd_path_bit_for_bit():
    torch.manual_seed(0)
    ff = GEGLU(24, 40)
    x = torch.randn(3, 7, 24)
    with torch.enable_grad():
        plain = ff(x)
    with torch.no_grad():
        inplace = ff(x)
    assert plain.requires_grad and torch.equal(plain.detach(), inplace)


def test_live_bytes_counts_storages_once_and_frees_them_with_their_last_tensor():
    x = torch.empty(1000, device="meta")                 # alive before: not counted
    live = LiveBytes()
    with live:
        with live.label("a"):
            y = x * 2                                    # 4000 B
            v = y.view(10, 100)                          # a view: no new bytes
            del y
            z = v + 1                                    # 8000 live
            del v                                        # y's storage dies with its last view
            w = z.repeat(2, 1)                           # 4000 + 8000 = 12000: the peak
        del w
        with live.label("b"):
            u = z.flatten()[:500].clone()                # 4000 + 2000
    assert live.peak == 12000
    assert live.peaks_by_label == {"a": 12000, "b": 2000}
    assert live.live == 6000
    del z, u


def test_labels_nest_and_wrap_module_forwards():
    seq = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5)).to("meta")
    live = LiveBytes()
    label_children(live, [("first", seq[0]), ("second", seq[1])])
    with live, torch.no_grad():
        seq(torch.empty(4, 10, device="meta"))
    # first: its 4×20 output; second: the 4×5 output beside the 4×20 input still held by Sequential
    assert live.peaks_by_label == {"first": 320, "second": 80}
