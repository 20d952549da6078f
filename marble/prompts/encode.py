"""Weighted prompts of any length -> context, as A1111's `sd_hijack_clip.py` and `sd_emphasis.py` do.

Chunking: the (text, weight) fragments of a prompt are tokenized one by one (without special
tokens) and laid into windows of `chunk_length` tokens (CLIP: 77 - 2 = 75). When a window fills up
and a comma lies within the last `COMMA_BACKTRACK` tokens, the tokens after that comma move to the
next window, so a phrase is not cut in two. BREAK closes the current window (padding it). Each
window becomes one row of the encoder's own length: start token, the window's ids, end token, pad.
Each row is encoded on its own (attention stays within a window) and the states are concatenated
along the token axis; the U-Net's cross-attention
reads any number of tokens.

Emphasis (what a weight does to the token states z of one window, weights w per token):
- "a1111": z·w, then rescaled so that the window's mean equals the unweighted mean (A1111 "Original";
  states of mean ~0, which only an untrained encoder gives, are only scaled);
- "no-norm": z·w without the rescaling (A1111 "No norm");
- "comfy": ComfyUI's lerp from the empty prompt's states e at the same position: e + (z - e)·w;
- "none": no attention syntax at all: brackets and BREAK are text (A1111 "None").
A window whose weights are all 1 is left exactly as the encoder returned it.

The encoder interface used here (CLIPTextEncoder and BertTextEncoder have it): `max_tokens`,
`comma_id`, `text_ids(text)` (ids without special tokens), `chunk_row(ids)` (one full row) and
calling the module on a (rows, max_tokens) id tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from marble.prompts.attention import Fragment, PromptSyntaxError, parse_attention
from marble.record import EMPHASIS_NAMES      # A1111's names for them, as its infotext writes them

EMPHASIS = ("a1111", "no-norm", "comfy", "none")
COMMA_BACKTRACK = 20        # A1111's default comma_padding_backtrack
ENCODE_BATCH = 64           # rows per text-encoder call
MEAN_EPS = 1e-4             # a weighted mean this small against the mean |state| is no mean to restore


@dataclass(frozen=True)
class Chunk:
    """One window: text token ids (at most chunk_length) and their weights."""
    ids: tuple[int, ...]
    weights: tuple[float, ...]


def chunk_fragments(fragments: list[Fragment], text_ids, chunk_length: int, comma_id: int | None,
                    backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Windows of at most `chunk_length` tokens, A1111's `tokenize_line` (without textual inversion).
    An empty prompt is one empty window; BREAK always closes a window, even an empty one."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(Chunk(tuple(ids), tuple(weights)))
        ids, weights, last_comma = [], [], -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for token in text_ids(fragment.text):
            if token == comma_id:
                last_comma = len(ids)
            elif (backtrack and len(ids) == chunk_length and last_comma != -1
                  and len(ids) - last_comma <= backtrack):
                # the window is full: move what follows its last comma to the next window
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == chunk_length:
                close()
            ids.append(token)
            weights.append(fragment.weight)
    if ids or not chunks:
        close()
    return chunks


def prompt_chunks(encoder, prompt: str, emphasis: str = "a1111") -> list[Chunk]:
    """The windows of one plain (already scheduled) prompt for this encoder."""
    fragments = [Fragment(prompt, 1.0)] if emphasis == "none" else parse_attention(prompt)
    return chunk_fragments(fragments, encoder.text_ids, encoder.max_tokens - 2, encoder.comma_id)


def chunk_rows(encoder, chunk: Chunk) -> tuple[list[int], list[float]]:
    """A window as one encoder row and the weight of every position (1 for the special tokens and pad)."""
    row = encoder.chunk_row(list(chunk.ids))
    weights = [1.0, *chunk.weights] + [1.0] * (len(row) - 1 - len(chunk.weights))
    return row, weights


def emphasize(z: torch.Tensor, weights: torch.Tensor, emphasis: str, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Apply token weights (T,) to one window's states z (T, D); `empty` (T, D) for "comfy"."""
    if bool((weights == 1).all()):
        return z
    w = weights.to(z.dtype)[:, None]
    if emphasis == "comfy":
        changed = (weights != 1)[:, None]
        return torch.where(changed, empty + (z - empty) * w, z)
    weighted = z * w
    if emphasis == "no-norm":
        return weighted
    # A1111: "restoring original mean is likely not correct, but it seems to work well to prevent artifacts".
    # States whose mean is ~0 (an untrained final LayerNorm) have no mean to restore: only scale them.
    mean, new_mean = z.mean(), weighted.mean()
    if abs(float(new_mean)) <= MEAN_EPS * float(z.abs().mean()):
        return weighted
    return weighted * (mean / new_mean)


def check_emphasis(emphasis: str) -> str:
    """The emphasis' marble name; A1111's names ("Original", "No norm", "None") are taken too."""
    for name, a1111 in EMPHASIS_NAMES.items():
        if isinstance(emphasis, str) and emphasis.strip().lower() in (name, a1111.lower()):
            return name
    raise PromptSyntaxError(f"emphasis must be one of {', '.join(EMPHASIS)}, not {emphasis!r}")


@torch.inference_mode()
def encode_prompts(encoder, prompts: list[str], emphasis: str = "a1111") -> list[torch.Tensor]:
    """Context (1, chunks · max_tokens, D) float32 for each plain prompt, the windows encoded together
    in batches of ENCODE_BATCH (so a short list of one-window prompts gives exactly the rows
    `encoder.encode` gives for it)."""
    emphasis = check_emphasis(emphasis)
    per_prompt = [prompt_chunks(encoder, p, emphasis) for p in prompts]
    rows, weights = [], []
    for chunks in per_prompt:
        for chunk in chunks:
            row, w = chunk_rows(encoder, chunk)
            rows.append(row)
            weights.append(w)
    needs_empty = emphasis == "comfy" and any(w != 1 for ws in weights for w in ws)
    if needs_empty:
        rows.append(encoder.chunk_row([]))
    device = next(encoder.parameters()).device
    tokens = torch.tensor(rows, dtype=torch.long, device=device)
    # at most ENCODE_BATCH rows at a time: a schedule with many distinct texts stays within memory
    z = torch.cat([encoder(tokens[k:k + ENCODE_BATCH]).float() for k in range(0, len(rows), ENCODE_BATCH)])
    empty = z[-1] if needs_empty else None
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    out, k = [], 0
    for chunks in per_prompt:
        parts = [emphasize(z[k + j], w[k + j], emphasis, empty) for j in range(len(chunks))]
        out.append(torch.cat(parts)[None])
        k += len(chunks)
    return out
