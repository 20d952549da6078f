"""What a step preview costs against one sampler step (issue 16's bar: at most 5% of a step).

For each model: one step is one call of the guided denoiser the pipeline builds (CFG at the model's
default scale: both branches in one batch), at the model's default size. A preview is what the
server's worker does for it: `Pipeline.preview(x0)` (the linear latent→RGB map by default,
enlarged to the image size) and the PNG encode. The full-VAE decode that previews used before is
timed beside it. Each is timed `--repeats` times, interleaved (step, preview, VAE, step, ...) so a
busy machine slows all alike, after one warm-up call; medians are reported.

    python benchmarks/preview_cost.py [--models builtin tiny-random] [--repeats 20] [--threads N]

Also prints the linear preview alone for an SD1.5-sized 512×512 image (a 64×64 latent), which
needs no weights.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import torch

from marble.cpu_features import cpu_label
from marble.models.latent_preview import LATENT_RGB
from marble.pipeline import load_pipeline, pixels_to_pil
from marble.request import GenerationRequest, resolve


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)     # as the worker encodes previews
    return buf.getvalue()


@torch.inference_mode()
def measure(model: str, repeats: int) -> dict:
    pipe = load_pipeline(model)
    m = pipe.model
    req = resolve(GenerationRequest(prompt="two red circles above a blue square", seed=0), pipe.defaults)
    sigmas = pipe.sigmas(req.sampler, req.steps, spacing_name=req.spacing)
    conditioning = pipe.conditioning(req)
    denoiser = pipe.denoiser(conditioning, sigmas, req.cfg, {},
                             pipe.vector_conditioning(m, conditioning, req, req.width, req.height))
    x = torch.randn(1, m.latent_channels, req.height // m.latent_factor, req.width // m.latent_factor)
    sigma = sigmas[len(sigmas) // 2].reshape(1)
    x0 = denoiser(x, sigma)
    jobs = {
        "step": lambda: denoiser(x, sigma),
        "preview": lambda: png(pipe.preview(x0)),
        "vae preview": lambda: png(pixels_to_pil(m.vae.decode(x0[:1]))[0]),
    }
    for fn in jobs.values():
        fn()                                                          # warm-up
    samples: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            samples[name].append(median_ms(fn, 1))
    out = {k: statistics.median(v) for k, v in samples.items()}
    out.update(model=pipe.name, size=f"{req.width}x{req.height}", cfg=req.cfg,
               previewer=type(pipe.previewer).__name__)
    return out


def sd_sized_linear_preview(repeats: int) -> float:
    linear = LATENT_RGB[0.18215]
    x0 = torch.randn(1, 4, 64, 64)

    def preview():
        image = pixels_to_pil(linear(x0))[0].resize((512, 512), 0)
        return png(image)
    preview()
    return median_ms(preview, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["builtin", "tiny-random"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_label()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats}")
    print(f"{'model':<12} {'size':<8} {'CFG':>4} {'step ms':>9} {'preview ms':>11} {'preview/step':>13} "
          f"{'VAE preview ms':>15}")
    for model in args.models:
        r = measure(model, args.repeats)
        print(f"{r['model']:<12} {r['size']:<8} {r['cfg']:>4g} {r['step']:>9.2f} {r['preview']:>11.3f} "
              f"{r['preview'] / r['step']:>12.1%} {r['vae preview']:>15.2f}")
    print(f"linear preview of an SD 512x512 latent (64x64), enlarged and PNG-encoded: "
          f"{sd_sized_linear_preview(args.repeats):.2f} ms")


if __name__ == "__main__":
    main()
