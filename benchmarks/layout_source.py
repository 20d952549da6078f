"""Where does a shapes-world model take an image's layout from: the prompt, or the noise?

Two measurements (docs/results/layout-source.md has the built-in model's):

1. Signal left at the top of the schedule. A discrete VP schedule whose last alpha_bar is not 0
   (SD's scaled_linear: 0.0047) leaves a faint copy of the training image in x_T, and a network
   can learn to read the layout from it (Lin et al. 2024, "Common Diffusion Noise Schedules and
   Sample Steps are Flawed"). Sampling starts from pure noise, which holds no layout. For training
   scenes we compare the x0 estimate's correlation with the true latent when x_t is built from that
   latent (training), from another scene's latent (only the caption is right), and from pure noise
   (sampling).
2. The relation word. The same (prompt, seed) with "above" and with "below" (and left/right): if
   the first-named object lands on the same side as often under both words, the word is ignored.

    python benchmarks/layout_source.py [--model builtin] [--scenes 64] [--seeds 4]
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from marble.checkpoints.resolve import load_model
from marble.data.shapes import sample
from marble.eval.detector import detect
from marble.pipeline import Pipeline, pil_to_pixels

PAIRS = (("red", "circle", "blue", "square"), ("green", "triangle", "yellow", "star"),
         ("purple", "square", "orange", "circle"), ("blue", "star", "red", "triangle"),
         ("yellow", "circle", "green", "square"), ("white", "diamond", "red", "circle"))
RELATIONS = (("above", 1), ("below", 1), ("to the left of", 0), ("to the right of", 0))


def centred_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the Pearson correlation of two latents, each centred per channel."""
    a = a - a.mean(dim=(2, 3), keepdim=True)
    b = b - b.mean(dim=(2, 3), keepdim=True)
    r = (a * b).sum(dim=(1, 2, 3)) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    return float(r.mean())


@torch.inference_mode()
def leak_table(loaded, scenes: int, timesteps=(999, 950, 900, 800, 600)) -> list[dict]:
    m = loaded.model
    size = m.config.default_width
    drawn = [sample("train", 123, i, size) for i in range(scenes)]
    x0 = torch.cat([m.vae.encode(pil_to_pixels(im, size, size)) for im, _, _ in drawn]).float()
    context = m.text_encoder.encode([caption for _, caption, _ in drawn]).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    other = torch.roll(torch.arange(scenes), 1)
    rows = []
    for t in timesteps:
        sigma = float(m.schedule.t_to_sigma(torch.tensor(float(t))))

        def x0_hat(x):
            return m.denoiser(x, torch.full((scenes,), sigma), context=context).float()
        rows.append({"t": t, "sigma": sigma, "snr": 1 / sigma ** 2,
                     "training": centred_correlation(x0_hat(x0 + sigma * eps), x0),
                     "other_scene": centred_correlation(x0_hat(x0[other] + sigma * eps), x0),
                     "other_scene_follows_it": centred_correlation(x0_hat(x0[other] + sigma * eps), x0[other]),
                     "pure_noise": centred_correlation(x0_hat(eps * (1 + sigma ** 2) ** 0.5), x0)})
    return rows


def relation_table(loaded, seeds: int) -> list[dict]:
    """For each relation word: how often the first-named object has the lower coordinate (is above,
    or left), over the images in which both named shapes were found."""
    pipe = Pipeline(loaded)
    rows = []
    for word, axis in RELATIONS:
        first_low = found = 0
        for (c1, s1, c2, s2), seed in itertools.product(PAIRS, range(seeds)):
            objects = detect(pipe.generate_image(f"a {c1} {s1} {word} a {c2} {s2}", seed=seed))
            a = [o for o in objects if o.shape == s1]
            b = [o for o in objects if o.shape == s2]
            if a and b:
                found += 1
                first_low += a[0].center[axis] < b[0].center[axis]
        rows.append({"relation": word, "found": found, "first_above_or_left": first_low,
                     "images": len(PAIRS) * seeds})
    return rows


def markdown(leak: list[dict], relations: list[dict]) -> str:
    out = ["| t | σ | SNR | x_t from its own scene | from another scene (own / other's) | pure noise |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in leak:
        out.append(f"| {r['t']} | {r['sigma']:.2f} | {r['snr']:.4f} | {r['training']:.3f} | "
                   f"{r['other_scene']:.3f} / {r['other_scene_follows_it']:.3f} | {r['pure_noise']:.3f} |")
    out += ["", "| relation word | both shapes found | first-named object above / left of the other |",
            "|---|---:|---:|"]
    for r in relations:
        share = r["first_above_or_left"] / r["found"] if r["found"] else float("nan")
        out.append(f"| {r['relation']} | {r['found']} / {r['images']} | {r['first_above_or_left']} ({share:.2f}) |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.seterr(all="ignore")
    loaded = load_model(args.model)
    print(f"model {loaded.name} ({loaded.hash}), last alpha_bar {float(loaded.model.schedule.alphas_cumprod[-1]):.4g}\n")
    print(markdown(leak_table(loaded, args.scenes), relation_table(loaded, args.seeds)))


if __name__ == "__main__":
    main()
