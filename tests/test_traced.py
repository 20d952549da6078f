"""The traced U-Net gives the eager U-Net's bits, and steps aside where a trace could be stale."""
import numpy as np
import torch

from marble.models.layers import CrossAttention
from marble.models.traced import TracedNetwork
from marble.pipeline import load_pipeline
from marble.request import GenerationRequest, resolve


def _pixels(pipe, **kw) -> np.ndarray:
    req = resolve(GenerationRequest(prompt="a red circle", seed=5, steps=3, width=32, height=32, **kw), pipe.defaults)
    return np.asarray(pipe.generate(req).images[0])


def test_traced_pipeline_is_bit_identical_to_eager():
    eager, traced = load_pipeline("tiny-random"), load_pipeline("tiny-random", trace=True)
    (net,) = [c.cell_contents for c in traced.model.denoiser.__closure__
              if isinstance(c.cell_contents, TracedNetwork)]
    for cfg in (4.0, 1.0):          # CFG batch 2, and the conditional branch alone (batch 1)
        assert np.array_equal(_pixels(eager, cfg=cfg), _pixels(traced, cfg=cfg))
        assert np.array_equal(_pixels(eager, cfg=cfg), _pixels(traced, cfg=cfg))   # replayed trace too
    assert len(net._traces) == 2    # one per batch size: the traces did run


def test_trace_falls_back_to_eager_for_hooks_swapped_weights_and_extra_inputs():
    pipe = load_pipeline("tiny-random")
    unet = pipe.model.unet
    net = TracedNetwork(unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.randn(2, 7, 32)
    with torch.inference_mode():
        base = net(x, t, ctx)
        assert torch.equal(base, unet(x, t, ctx)) and len(net._traces) == 1
        handle = unet.out.register_forward_hook(lambda m, i, o: o + 1)   # an unfused LoRA's shape
        assert torch.equal(net(x, t, ctx), base + 1)
        handle.remove()
        old = unet.out[2].weight
        unet.out[2].weight = torch.nn.Parameter(old + 0.5, requires_grad=False)   # a materialised LoRA
        assert torch.equal(net(x, t, ctx), unet(x, t, ctx)) and not torch.equal(net(x, t, ctx), base)
        unet.out[2].weight = old
        assert torch.equal(net(x, t, ctx), base)
        # a bias set where there was none, deep inside a transformer block: also a new weight
        to_q = next(m for m in unet.modules() if isinstance(m, CrossAttention)).to_q
        assert to_q.bias is None
        to_q.bias = torch.nn.Parameter(torch.full((to_q.out_features,), 0.25), requires_grad=False)
        assert torch.equal(net(x, t, ctx), unet(x, t, ctx)) and not torch.equal(net(x, t, ctx), base)
        to_q.bias = None
        assert torch.equal(net(x, t, ctx), base)
