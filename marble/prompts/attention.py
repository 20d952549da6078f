"""Attention syntax as A1111 (stable-diffusion-webui, modules/prompt_parser.py's
`parse_prompt_attention`) reads it: `(x)` ×1.1, `[x]` ÷1.1, `(x:1.3)`, escapes `\\(` `\\)` `\\[`
`\\]` `\\\\` and `BREAK` turn one plain (already scheduled, marble.prompts.schedule) prompt into
(text, weight) fragments. Unbalanced brackets are read as A1111 reads them: an unclosed opener
weights everything after it, a stray closer is text, `(x:abc)` is text with weight 1.1.

A hand-written scanner, a bounded amount of work per character (no regular expression that could
backtrack). The one error is `PromptSyntaxError`, for text A1111 itself crashes on (`(x:1.2.3)`) or
weights that overflow. Where marble differs from A1111 on purpose: `BREAK` inside brackets still
breaks (A1111 scales its -1 marker and then reads it as the word "BREAK").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1          # (text)
SQUARE_MULTIPLIER = 1 / 1.1     # [text]


class PromptSyntaxError(ValueError):
    """A prompt that cannot be read; the message is one line for the user."""


def parse_number(text: str, context: str, error: type[ValueError] = PromptSyntaxError) -> float:
    """float(text), finite, or `error` naming `context` (one line)."""
    try:
        value = float(text)
    except ValueError:
        raise error(f"{context}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise error(f"{context}: {text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one attention weight; `is_break` marks a BREAK (text is empty)."""
    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Fragment("", 1.0, True)


def _is_word(c: str) -> bool:
    """A character of Python's `\\w` (what `\\b` in A1111's BREAK pattern looks at)."""
    return c.isalnum() or c == "_"


def split_break(text: str) -> list[str]:
    """Split at every `BREAK` standing as a whole word, dropping the whitespace around it
    (A1111's `re.split(r"\\s*\\bBREAK\\b\\s*", text)`)."""
    parts, start, i, n = [], 0, 0, len(text)
    while True:
        i = text.find("BREAK", i)
        if i < 0:
            break
        end = i + 5
        if (i == 0 or not _is_word(text[i - 1])) and (end == n or not _is_word(text[end])):
            left = i
            while left > start and text[left - 1].isspace():
                left -= 1
            right = end
            while right < n and text[right].isspace():
                right += 1
            parts.append(text[start:left])
            start = i = right
        else:
            i += 1
    parts.append(text[start:])
    return parts


def _weight_token(text: str, i: int) -> tuple[int, str] | None:
    """At a ':' that starts `:\\s*([+-]?[.\\d]+)\\s*\\)`: (index after ')', the number text), or None."""
    n, j = len(text), i + 1
    while j < n and text[j].isspace():
        j += 1
    start = j
    if j < n and text[j] in "+-":
        j += 1
    digits = j
    while j < n and (text[j] == "." or text[j].isdecimal()):
        j += 1
    if j == digits:
        return None
    number = text[start:j]
    while j < n and text[j].isspace():
        j += 1
    if j < n and text[j] == ")":
        return j + 1, number
    return None


def _close_all(weights: list[float], starts: list[int], m: float) -> None:
    """Multiply weights[start:] by m for every start in order (the brackets left open at the end),
    in time linear in len(weights) + len(starts): entry k is multiplied once per start <= k, one
    multiplication after another (so the floats are those of the one-by-one loop), and the chain of
    products from one base weight is computed once."""
    chains: dict[float, list[float]] = {}
    s = 0
    for k, w in enumerate(weights):
        while s < len(starts) and starts[s] <= k:
            s += 1
        chain = chains.setdefault(w, [w])
        while len(chain) <= s:
            chain.append(chain[-1] * m)
        weights[k] = chain[s]


def parse_attention(text: str) -> list[Fragment]:
    """(text, weight) fragments of a prompt, runs of equal weight merged, as A1111's
    `parse_prompt_attention`; BREAK as `BREAK` fragments. An empty prompt gives [("", 1.0)]."""
    texts: list[str] = []
    weights: list[float] = []
    breaks: list[bool] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, m: float) -> None:
        weights[start:] = [w * m for w in weights[start:]]

    def add_text(s: str) -> None:
        for k, part in enumerate(split_break(s)):
            if k:
                texts.append("")
                weights.append(1.0)
                breaks.append(True)
            texts.append(part)
            weights.append(1.0)
            breaks.append(False)

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            # \( \) \[ \] \\ are the character; a backslash before anything else vanishes
            escaped = i + 1 < n and text[i + 1] in "()[]\\"
            add_text(text[i + 1] if escaped else "")
            i += 2 if escaped else 1
            continue
        if c == "(":
            round_open.append(len(texts))
        elif c == "[":
            square_open.append(len(texts))
        elif c == ":" and round_open and (hit := _weight_token(text, i)):
            i, number = hit
            multiply(round_open.pop(), parse_number(number, "attention weight"))
            continue
        elif c == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif c == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        elif c in "()[]:":
            add_text(c)
        else:
            j = i + 1
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add_text(text[i:j])
            i = j
            continue
        i += 1
    _close_all(weights, round_open, ROUND_MULTIPLIER)
    _close_all(weights, square_open, SQUARE_MULTIPLIER)
    if any(not math.isfinite(w) for w in weights):
        raise PromptSyntaxError("attention weights multiply beyond the range of numbers (too many nested brackets)")

    out: list[Fragment] = []
    for t, w, b in zip(texts, weights, breaks):
        if b:
            out.append(BREAK)
        elif out and not out[-1].is_break and out[-1].weight == w:
            out[-1] = Fragment(out[-1].text + t, w)
        else:
            out.append(Fragment(t, w))
    return out or [Fragment("", 1.0)]
