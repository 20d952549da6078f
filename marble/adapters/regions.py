"""Regions: the prompt's colour phrases bound to the regions of that colour in a sketch, by
modulating the U-Net's cross-attention (Dense Diffusion, Kim et al. ICCV 2023, eq. 4-6).

A sketch in the shapes world's palette (marble.data.sketch: flat silhouettes on white, as the web
UI's pad draws them) says where each colour goes; a prompt says "a red circle above a blue square".
The text alone leaves the colour words free to land on either shape, and the ControlNet, which
sees the colours, still swaps them for pairs it never saw (docs/controlnet-training.md). Here each
colour region of the sketch is tied to the prompt's phrase that starts with that colour's word
("red circle"): at every cross-attention call, for the conditional half of the batch,

    S' = S + λ_t (1 − a_r) [ m_r (max_j S − S) − (1 − m_r) (S − min_j S) ]   for the tokens j of region r

with S the scaled query-key scores (per query, over the keys j), m_r the region's coverage of the
query's cell, a_r its share of the image (small regions are pushed harder) and λ_t = strength ·
(1 − t/T): it grows as the noise falls. Dense Diffusion fades λ out instead, as (t/T)^5, to shape
the layout early; here the ControlNet draws the layout, and the held-out sweep
(benchmarks/regions_sweep.py, docs/controlnet-training.md#regions) found colour bound late: fading
laws held colour attribution at 0.56-0.68, a constant λ reached 0.97, and the late-acting one kept
that while losing fewer objects (DECAY = -1). Tokens outside every phrase are left alone. Strength
0 is the plain network, bit for bit.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from marble.data.captions import COLOR_SYNONYMS, NUMBER_WORDS, SHAPE_SYNONYMS, plural
from marble.data.shapes import COLORS, SHAPES
from marble.models.layers import SpatialTransformer

MAX_STRENGTH = 10.0
DECAY = -1.0          # λ_t ∝ (1 − t/T): late-acting won the sweep here (Dense Diffusion fades it as (t/T)^5; benchmarks/regions_sweep.py)
CONTROLNETS = False   # the ControlNets' own cross-attention too (region_networks)
SELF_ATTENTION = False  # Dense Diffusion's self-attention modulation too (self_modulation)
TOLERANCE = 40        # a pixel belongs to a palette colour within this RGB distance (anti-aliased uploads)
STOP_WORDS = {"and", "above", "below", "over", "under", "beneath", "left", "right", "of", "to", "on", "in", "at",
              "next", "beside", "with", "the", "a", "an", "near", "behind", "background", ","}


@dataclass(frozen=True)
class Region:
    color: str
    mask: torch.Tensor            # (H, W) float32, 1 on the region's pixels
    tokens: tuple[int, ...]       # context positions of its phrase


def color_masks(image: Image.Image, palette: dict[str, tuple[int, int, int]] = COLORS,
                tolerance: int = TOLERANCE) -> dict[str, torch.Tensor]:
    """{colour name: (H, W) float mask} of the palette colours the image holds: each pixel goes to
    the nearest palette colour within `tolerance` (RGB distance), or to none (white, the rest)."""
    rgb = np.asarray(image.convert("RGB"), np.int32)
    names = list(palette)
    colors = np.array([palette[n] for n in names], np.int32)
    dist = ((rgb[:, :, None, :] - colors[None, None]) ** 2).sum(-1)          # (H, W, colours)
    nearest = np.where(dist.min(-1) <= tolerance ** 2, dist.argmin(-1), -1)   # -1: no palette colour
    return {name: torch.from_numpy((nearest == i).astype(np.float32)) for i, name in enumerate(names)
            if (nearest == i).any()}


def _nouns() -> set[tuple[str, ...]]:
    forms = set()
    for shape in SHAPES:
        for name in SHAPE_SYNONYMS.get(shape, (shape,)):
            forms.update({tuple(name.split()), tuple(plural(name).split())})
    return forms


def color_phrases(prompt: str) -> list[tuple[str, tuple[int, int]]]:
    """(colour name, character span) of each phrase that starts with a colour word: the colour word,
    then up to its shape noun ("violet plus signs"), or else the next word unless it is a stop
    word; "on a blue background" names no region."""
    found = list(re.finditer(r"\S+", prompt))
    words = [(m.group().lower().strip(",.;"), m.span()) for m in found]
    by_word = {w: name for name in COLORS for w in COLOR_SYNONYMS.get(name, (name,))}
    nouns = _nouns()
    out = []
    for i, (word, (start, end)) in enumerate(words):
        if word not in by_word:
            continue
        if found[i].group().endswith((",", ".", ";")):    # "red, ..." ends where it stands
            out.append((by_word[word], (start, end)))
            continue
        rest = [w for w, _ in words[i + 1:i + 4]]
        stop = next((j for j, w in enumerate(rest) if w in STOP_WORDS or w in by_word), len(rest))
        hit = next((j + len(form) for j in range(stop) for form in sorted(nouns, key=len, reverse=True)
                    if tuple(rest[j:j + len(form)]) == form), None)
        if hit is None and "background" in rest[:1]:
            continue
        last = i + (hit if hit is not None else min(stop, 1))
        out.append((by_word[word], (start, words[last][1][1])))
    return out


def phrase_tokens(count_tokens: Callable[[str], int], prompt: str, span: tuple[int, int], max_tokens: int
                  ) -> tuple[int, ...]:
    """Context positions of the characters `span` of the prompt: the tokens its prefix and the
    phrase need, special tokens (one before, one after) taken out. Whitespace separates words in
    both CLIP's and WordPiece's pre-tokenizers, so a prefix tokenizes as the prompt's start does.
    Positions the context truncates (the last keeps the closing token) are left out."""
    first = count_tokens(prompt[:span[0]].rstrip()) - 1
    last = count_tokens(prompt[:span[1]]) - 1
    return tuple(range(first, min(last, max_tokens - 1)))


def components(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 8-connected components of a (H, W) 0/1 mask, each as a float mask: labels spread to the
    largest label of the 3×3 neighbourhood until nothing changes (a pass per pixel of the longest
    path). 8, not 4: a hard-edged star's tips touch its body only at corners."""
    on = mask > 0
    labels = torch.where(on, torch.arange(1, on.numel() + 1, dtype=torch.float64).view(on.shape), 0.0)
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * on
        if torch.equal(grown, labels):
            return [(labels == v).float() for v in labels[on].unique()]
        labels = grown


# which way the first of two phrases lies from the second: (axis of the centroid, first is lower)
RELATION_AXES = {"left": (1, True), "right": (1, False), "above": (0, True), "over": (0, True),
                 "below": (0, False), "under": (0, False), "beneath": (0, False)}


COUNT_WORDS = {w: n for n, w in NUMBER_WORDS.items()}


def phrase_count(prompt: str, start: int) -> int:
    """How many objects the phrase starting at `start` names: the number word or digits just before
    it ("two red circles": 2, "3 red stars": 3), else one ("a red square", "the red square")."""
    before = re.findall(r"[a-z0-9]+", prompt[:start].lower())
    word = before[-1] if before else ""
    if word.isdigit():
        return max(1, int(word))
    return COUNT_WORDS.get(word, 1)


def split_by_relation(mask: torch.Tensor, between: str, counts: tuple[int, int] = (1, 1)
                      ) -> list[torch.Tensor] | None:
    """Two phrases of one colour ("a red diamond below a red square", "two red circles above a red
    square") and that colour's mask: the silhouettes each phrase names by the relation word between
    them (first, second), or None where the words or the silhouettes do not say (no single relation
    word, not as many blobs as the phrases count, or blobs the relation's axis cannot order). The
    blobs are ordered by centroid along that axis and the phrases take them in the relation's order.
    The words are read first: the blobs cost a pass per pixel of the longest path."""
    words = [w for w in re.findall(r"[a-z]+", between.lower()) if w in RELATION_AXES]
    if len(words) != 1:
        return None
    masks = components(mask)
    if len(masks) != sum(counts):
        return None
    axis, first_lower = RELATION_AXES[words[0]]
    centre = [float(m.nonzero()[:, axis].double().mean()) for m in masks]   # centroid row (0) or column (1)
    order = sorted(range(len(masks)), key=centre.__getitem__)
    cut = counts[0] if first_lower else counts[1]             # how many blobs the lower-placed phrase takes
    if centre[order[cut - 1]] == centre[order[cut]]:
        return None
    low, high = (sum(masks[i] for i in group) for group in (order[:cut], order[cut:]))
    return [low, high] if first_lower else [high, low]


def phrase_regions(masks: dict[str, torch.Tensor], prompt: str, count_tokens: Callable[[str], int], max_tokens: int
                   ) -> list[Region]:
    """One region per colour phrase of the prompt whose colour has a mask ({colour name: (H, W)}): a
    phrase whose colour is absent, and a colour no phrase names, bind nothing. Where exactly two
    phrases share a colour and a relation word stands between them, each binds only the silhouettes
    the relation gives it, as many as its count word says (split_by_relation); otherwise both bind
    the whole colour, and the attention could not tell "a red diamond below a red square" from its
    mirror."""
    phrases = [(color, span) for color, span in color_phrases(prompt) if color in masks]
    own = {}
    for color in {c for c, _ in phrases}:
        spans = [span for c, span in phrases if c == color]
        if len(spans) == 2:
            counts = (phrase_count(prompt, spans[0][0]), phrase_count(prompt, spans[1][0]))
            split = split_by_relation(masks[color], prompt[spans[0][1]:spans[1][0]], counts)
            if split is not None:
                own.update(zip(spans, split))
    return [Region(color, own.get(span, masks[color]), tokens) for color, span in phrases
            if (tokens := phrase_tokens(count_tokens, prompt, span, max_tokens))]


def sketch_regions(image: Image.Image, prompt: str, count_tokens: Callable[[str], int], max_tokens: int
                   ) -> list[Region]:
    """The regions of a colour sketch that the prompt names (`phrase_regions` of its colour masks)."""
    return phrase_regions(color_masks(image), prompt, count_tokens, max_tokens)


def time_law(t: torch.Tensor, top: int, strength, decay: float) -> torch.Tensor:
    """λ at timesteps t (0..top): strength · (t/T)^decay, or for a negative decay its mirror
    strength · (1 − t/T)^|decay|, acting late. `strength` a number or one per row."""
    return strength * ((t / top) ** decay if decay >= 0 else (1 - t / top) ** -decay)


def level_grid(latent: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) of a U-Net level with `queries` cells: the latent halved (ceil, as a stride-2
    convolution with padding 1 does) until it fits."""
    h, w = latent
    while h * w > queries and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != queries:
        raise ValueError(f"no U-Net level of a {latent[0]}x{latent[1]} latent has {queries} cells")
    return h, w


def region_tables(regions: list[Region], grid: tuple[int, int], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The coverage m (N, T) of each region's tokens over the cells of a (h, w) grid (area-averaged
    masks; a token two regions name takes the larger) and the weight 1 − a (T,) of its region."""
    h, w = grid
    cover = torch.zeros(h * w, t)
    weight = torch.zeros(t)
    for r in regions:
        m = F.interpolate(r.mask[None, None], size=(h, w), mode="area").reshape(h * w)
        area = float(r.mask.mean())
        for j in r.tokens:
            if j < t:
                cover[:, j] = torch.maximum(cover[:, j], m)
                weight[j] = max(float(weight[j]), 1.0 - area)
    return cover, weight


def modulation(regions: list[Region], latent: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A closure (scores (B, heads, N, T) float32, scale (B,)) -> scores, eq. 4-6 above with λ = the
    row's scale (0 for the unconditional rows). Per grid, the coverage m (N, T) and the weight
    1 − a (T,) of the region tokens are made once."""
    cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def modulate(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n, t = scores.shape[-2:]
        key = (n, t, id(scores.device))
        if key not in cache:
            cache[key] = tuple(z.to(scores.device) for z in region_tables(regions, level_grid(latent, n), t))
        cover, weight = cache[key]
        return push(scores, cover, weight, scale)        # weight 0: tokens outside every phrase untouched
    return modulate


def row_modulation(rows: list[list[Region]], latent: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`modulation` with regions of its own for each row of the batch (a training batch: each scene
    its sketch and caption): the tables stacked to (B, 1, N, T) and (B, 1, 1, T)."""
    cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def modulate(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n, t = scores.shape[-2:]
        key = (n, t, id(scores.device))
        if key not in cache:
            grid = level_grid(latent, n)
            cover, weight = zip(*(region_tables(regions, grid, t) for regions in rows))
            cache[key] = (torch.stack(cover)[:, None].to(scores.device), torch.stack(weight)[:, None, None].to(scores.device))
        cover, weight = cache[key]
        return push(scores, cover, weight, scale)
    return modulate


def push(scores: torch.Tensor, pull: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eq. 4-6's update of scores (B, heads, N, K): S + λ w [p (max S − S) − (1 − p)(S − min S)], the
    max and min over the keys, p the pull toward the max (N, K) or per row (B, 1, N, K), w (K,), (N, 1)
    or (B, 1, 1, K), λ (B,) a row."""
    hi = scores.amax(-1, keepdim=True) - scores
    lo = scores - scores.amin(-1, keepdim=True)
    return scores + scale.to(scores)[:, None, None, None] * (weight * (pull * hi - (1 - pull) * lo))


def self_modulation(regions: list[Region], latent: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dense Diffusion's self-attention half: a closure (scores (B, heads, N, N), scale (B,)) -> scores
    raised between cells of one segment and lowered across segments, S' = S + λ (1 − a_i) [M (max S
    − S) − (1 − M)(S − min S)], with M_ij = Σ_r m_r(i) m_r(j) over the regions and the background
    (what no region covers) and a_i the share of the image of i's segment."""
    cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, id(device))
        if key not in cache:
            h, w = level_grid(latent, n)
            cover = torch.stack([F.interpolate(r.mask[None, None], size=(h, w), mode="area").reshape(n)
                                 for r in regions]).clamp(0, 1)                  # (R, N)
            segments = torch.cat([cover, (1 - cover.sum(0, keepdim=True)).clamp(min=0)])   # + background
            same = (segments.T @ segments).clamp(0, 1)                             # (N, N)
            weight = 1 - segments.T @ segments.mean(1)                             # (N,) 1 − its segment's share
            cache[key] = (same.to(device), weight.to(device))
        return cache[key]

    def modulate(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        same, weight = tables(scores.shape[-1], scores.device)
        return push(scores, same, weight[:, None], scale)
    return modulate


def transformer_blocks(networks: list[nn.Module]) -> list[nn.Module]:
    """Every transformer block of the networks' spatial transformers (each has attn1 and attn2)."""
    return [block for net in networks for m in net.modules() if isinstance(m, SpatialTransformer)
            for block in m.transformer_blocks]


@contextmanager
def region_attention(blocks: list[nn.Module], bias: Callable[[torch.Tensor], torch.Tensor],
                     self_bias: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Route the text cross-attention of the transformer blocks through `bias`, and with `self_bias`
    their self-attention through it, for the calls inside the context
    (marble.models.layers.CrossAttention.score_bias)."""
    layers = [(block.attn2, bias) for block in blocks]
    if self_bias is not None:
        layers += [(block.attn1, self_bias) for block in blocks]
    try:
        for layer, f in layers:
            layer.score_bias = f
        yield
    finally:
        for layer, _ in layers:
            layer.score_bias = None


def region_denoiser(network, networks: list[nn.Module], regions: list[Region], latent: tuple[int, int], schedule,
                    strength: float, decay: float | None = None):
    """network(x, sigma, cond_mark=..., **cond) with the regions' modulation on the cross-attention of
    `networks` (the U-Net, and the ControlNets that run inside `network`): λ = strength · (t/T)^decay
    at the call's σ, or for a negative decay its mirror strength · (1 − t/T)^|decay|, acting late
    (decay None: the module's DECAY, read per call so a sweep can set it), on the rows
    of the conditional half (cond_mark 1; the halves split the batch evenly, as
    marble.diffusion.guidance batches them). A ControlNet that runs on the conditional rows alone
    ("ControlNet is more important") gets those rows' λ."""
    if strength == 0 or not regions:
        return network
    decay = DECAY if decay is None else decay
    modulate = modulation(regions, latent)
    modulate_self = self_modulation(regions, latent) if SELF_ATTENTION else None
    blocks = transformer_blocks(networks)        # found once, not at every call
    top = schedule.num_timesteps - 1

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond_mark: torch.Tensor | None = None, **cond) -> torch.Tensor:
        t = schedule.sigma_to_t(sigma.detach().float().cpu()).clamp(0, top)
        scale = time_law(t, top, strength, decay)
        cond_rows = torch.ones(len(x), dtype=torch.bool)
        if cond_mark is not None:           # one mark a half: repeat it over the half's rows
            cond_rows = (cond_mark.cpu() > 0).repeat_interleave(len(x) // len(cond_mark))
            scale = scale * cond_rows
        by_rows = {len(x): scale, int(cond_rows.sum()): scale[cond_rows]}

        def bias(scores: torch.Tensor) -> torch.Tensor:
            return modulate(scores, by_rows[scores.shape[0]])

        def self_bias(scores: torch.Tensor) -> torch.Tensor:
            return modulate_self(scores, by_rows[scores.shape[0]])
        with region_attention(blocks, bias, self_bias if modulate_self else None):
            return network(x, sigma, cond_mark=cond_mark, **cond)
    return denoise


def region_networks(model, units) -> list[nn.Module]:
    """The networks whose cross-attention the regions modulate: the U-Net, and with CONTROLNETS the
    ControlNets of the units (they read the same caption). Read per call so a sweep can set it."""
    return [model.unet, *(u.net for u in units if CONTROLNETS)]
