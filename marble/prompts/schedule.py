"""Prompt editing and alternation as A1111 (stable-diffusion-webui, modules/prompt_parser.py's
`get_learned_conditioning_prompt_schedules`) reads them: `[from:to:when]`, `[to:when]`,
`[from::when]` and `[a|b|...]` turn one prompt into a list of (last step, plain prompt text).
A prompt the grammar cannot read (a `|` outside brackets, a lone trailing backslash) is used as it
is for every step, as A1111 does.

A hand-written recursive descent over A1111's grammar, memoised per position, so any string parses
in time linear-ish in its length. Where marble differs from A1111 on purpose: a negative or
non-finite `when` is an error (A1111 ignores the edit or crashes), and nesting deeper than
MAX_NESTING reads the prompt literally (A1111's parser has no such limit).
"""
from __future__ import annotations

from dataclasses import dataclass

from marble.prompts.attention import PromptSyntaxError, parse_attention, parse_number

MAX_NESTING = 100               # deeper bracket nesting than this is read as literal text


@dataclass(frozen=True)
class _Edit:
    before: tuple | None        # items, or None for [to:when]
    after: tuple
    when: str                   # the number as written (a '.' makes it a fraction)


@dataclass(frozen=True)
class _Alternate:
    options: tuple              # tuple of item tuples


class _Unreadable(Exception):
    """The grammar cannot read the prompt: A1111 then uses it as it is."""


def _signed_number_end(text: str, i: int) -> int:
    """End of lark's SIGNED_NUMBER starting at i ([+-] then INT, DECIMAL or either with an
    exponent), or i if there is none."""
    n, j = len(text), i
    if j < n and text[j] in "+-":
        j += 1

    def digits(k: int) -> int:
        while k < n and "0" <= text[k] <= "9":
            k += 1
        return k

    int_end = digits(j)
    if int_end < n and text[int_end] == ".":
        frac_end = digits(int_end + 1)
        if int_end == j and frac_end == int_end + 1:
            return i                        # a lone "." is no number
        end = frac_end
    elif int_end == j:
        return i
    else:
        end = int_end
    if end < n and text[end] in "eE":
        k = end + 1
        if k < n and text[k] in "+-":
            k += 1
        if digits(k) > k:
            end = digits(k)
    return end


class _ScheduleParser:
    """Recursive descent over A1111's scheduling grammar:

        start:     (prompt | stray bracket or colon)*
        prompt:    (emphasized | scheduled | alternate | plain)*
        emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
        scheduled: "[" [prompt ":"] prompt ":" ws? NUMBER ws? "]"
        alternate: "[" prompt ("|" prompt?)+ "]"
        plain:     (any character but \\ [ ] ( ) : | , or \\ and any character but a newline)+

    A bracket that does not close as one of these is a stray character of `start`. Results are
    memoised per position, so every position is parsed once whatever the nesting.
    """

    def __init__(self, text: str):
        self.text = text
        self.n = len(text)
        self.brackets: dict[int, tuple[int, tuple] | None] = {}
        self.prompts: dict[int, tuple[int, tuple]] = {}

    def parse(self) -> tuple:
        items, i = [], 0
        while i < self.n:
            i, seq = self.prompt(i, 0)
            items.extend(seq)
            if i < self.n:
                if self.text[i] not in "[]():":
                    raise _Unreadable
                items.append(self.text[i])
                i += 1
        return tuple(items)

    def prompt(self, i: int, depth: int) -> tuple[int, tuple]:
        if i in self.prompts:
            return self.prompts[i]
        start, text, items, buf = i, self.text, [], []
        while i < self.n:
            c = text[i]
            if c == "\\":
                if i + 1 < self.n and text[i + 1] != "\n":
                    buf.append(text[i:i + 2])
                    i += 2
                    continue
                break
            if c in "[(":
                hit = self.bracket(i, depth + 1)
                if hit is None:
                    break
                if buf:
                    items.append("".join(buf))
                    buf = []
                i, node = hit
                items.extend(node)
                continue
            if c in "]):|":
                break
            j = i + 1
            while j < self.n and text[j] not in "\\[]():|":
                j += 1
            buf.append(text[i:j])
            i = j
        if buf:
            items.append("".join(buf))
        self.prompts[start] = (i, tuple(items))
        return self.prompts[start]

    def bracket(self, i: int, depth: int) -> tuple[int, tuple] | None:
        if i not in self.brackets:
            if depth > MAX_NESTING:
                raise _Unreadable
            self.brackets[i] = self._bracket(i, depth)
        return self.brackets[i]

    def _at(self, i: int) -> str:
        return self.text[i] if i < self.n else ""

    def _when(self, i: int) -> tuple[int, str] | None:
        """ws? NUMBER ws? "]" at i: (index after "]", number text) or None."""
        while i < self.n and self.text[i].isspace():
            i += 1
        end = _signed_number_end(self.text, i)
        if end == i:
            return None
        number, j = self.text[i:end], end
        while j < self.n and self.text[j].isspace():
            j += 1
        return (j + 1, number) if self._at(j) == "]" else None

    def _bracket(self, i: int, depth: int) -> tuple[int, tuple] | None:
        j, first = self.prompt(i + 1, depth)
        c = self._at(j)
        if self.text[i] == "(":
            if c == ")":
                return j + 1, ("(", *first, ")")
            if c == ":":
                k, second = self.prompt(j + 1, depth)
                if self._at(k) == ")":
                    return k + 1, ("(", *first, ":", *second, ")")
            return None
        if c == "]":
            return j + 1, ("[", *first, "]")
        if c == "|":
            options = [first]
            while self._at(j) == "|":
                j, option = self.prompt(j + 1, depth)
                options.append(option)
            return (j + 1, (_Alternate(tuple(options)),)) if self._at(j) == "]" else None
        if c == ":":
            hit = self._when(j + 1)
            if hit:
                return hit[0], (_Edit(None, first, hit[1]),)
            k, second = self.prompt(j + 1, depth)
            if self._at(k) == ":":
                hit = self._when(k + 1)
                if hit:
                    return hit[0], (_Edit(first, second, hit[1]),)
        return None


def _edit_step(when: str, steps: int, int_offset: int, fraction_offset: float) -> int:
    """The last step of an edit's first part, as A1111's (new) scheduling counts it: a number with
    a '.' is a fraction of the steps, one without is a step number; both clamp at `steps`."""
    v = parse_number(when, "prompt editing step")
    if v < 0:
        raise PromptSyntaxError(f"prompt editing step {when!r} is negative")
    v = (v - fraction_offset) * steps if "." in when else v - int_offset
    return min(steps, int(v))


def _render(items: tuple, step: int, ends: dict[int, int]) -> str:
    out = []
    stack = [iter(items)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Edit):
            part = (item.before or ()) if step <= ends[id(item)] else item.after
            stack.append(iter(part))
        else:
            stack.append(iter(item.options[(step - 1) % len(item.options)]))
    return "".join(out)


def _nodes(items: tuple):
    stack = [iter(items)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, _Edit):
            yield item
            stack.extend([iter(item.before or ()), iter(item.after)])
        elif isinstance(item, _Alternate):
            yield item
            stack.extend(iter(o) for o in item.options)


def schedule_prompt(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, prompt text), ...] for a prompt with editing and alternation, steps counted
    from 1, as A1111's `get_learned_conditioning_prompt_schedules`: the text of entry k is used up
    to and including its step. With `hires_steps`, the schedule of a hires pass of that many steps
    after `steps` first-pass steps (integer steps count on from the first pass; fractions above 1
    reach into the second pass)."""
    if steps < 1:
        raise PromptSyntaxError(f"steps must be at least 1, not {steps}")
    if hires_steps is None:
        int_offset, fraction_offset, total = 0, 0.0, steps
    else:
        int_offset, fraction_offset, total = steps, 1.0, hires_steps
    try:
        items = _ScheduleParser(prompt).parse()
    except _Unreadable:
        return [(total, prompt)]
    ends, boundaries = {}, {total}
    for node in _nodes(items):
        if isinstance(node, _Edit):
            ends[id(node)] = end = _edit_step(node.when, total, int_offset, fraction_offset)
            if end >= 1:
                boundaries.add(end)
        else:
            boundaries.update(range(1, total + 1))
    return [(t, _render(items, t, ends)) for t in sorted(boundaries)]


def prompt_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text for sampler step `step` (0-based, as A1111's denoiser counts): the first entry
    whose last step is ≥ step, the first entry past the end (as A1111)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1]


def check_prompt(prompt: str, steps: int = 1) -> None:
    """Raise PromptSyntaxError (one line) for a prompt that cannot be read; else nothing.
    What A1111 reads literally (unbalanced brackets, `(x:abc)`) is not an error."""
    for _, text in schedule_prompt(prompt, steps):
        parse_attention(text)
