"""Per-step contexts of a prompt and a negative prompt, and the denoiser closure that uses them.

A prompt and a negative prompt are scheduled (marble.prompts.schedule: `[from:to:when]`, `[a|b]`), every
distinct text of the schedules is encoded once with its weights, windows and BREAKs
(marble.prompts.encode), and `PromptConditioning.at(step)` hands the sampler's denoiser closure the
(cond, uncond) contexts of that step, padded to the same length with the empty prompt's window as
A1111 pads them. A plain prompt and negative prompt of one window each give exactly the context
`text_encoder.encode([prompt, negative_prompt])` gives.

`<lora:...>` and other extra-network tags are taken out before this module sees the prompt.
"""
from __future__ import annotations

import torch

from marble.diffusion.schedule import step_index  # noqa: F401  (the step of a call: here for its users)
from marble.prompts.encode import check_emphasis, encode_prompts, prompt_chunks
from marble.prompts.schedule import prompt_at_step, schedule_prompt


def window_count(encoder, prompt: str, emphasis: str = "a1111") -> int:
    """How many windows of max_tokens - 2 tokens the prompt's longest scheduled text needs."""
    return max(len(prompt_chunks(encoder, text, emphasis)) for _, text in schedule_prompt(prompt, 1))


class PromptConditioning:
    """Per-step contexts of a prompt and a negative prompt.

    steps: the steps of the pass the schedule counts (a schedule's `when` refers to them);
    hires_steps: for the second pass of a hires fix, that pass's steps (`steps` then is the first pass's);
    emphasis: how weights act, one of marble.prompts.encode.EMPHASIS.
    Contexts are float32 unless `dtype` is given, on the encoder's device unless `device` is.
    known: texts already encoded (float32, as `encode_prompts` gives them, with this encoder and
    emphasis), which are not encoded again; `encoded` holds every text's float32 context.
    """

    def __init__(self, encoder, prompt: str, negative_prompt: str, steps: int, *, hires_steps: int | None = None,
                 emphasis: str = "a1111", device: torch.device | None = None, dtype: torch.dtype | None = None,
                 known: dict[str, torch.Tensor] | None = None):
        emphasis = check_emphasis(emphasis)
        self.schedule = schedule_prompt(prompt, steps, hires_steps)
        self.negative_schedule = schedule_prompt(negative_prompt, steps, hires_steps)
        texts = list(dict.fromkeys([t for _, t in self.schedule] + [t for _, t in self.negative_schedule]))
        known = known or {}
        todo = [t for t in texts if t not in known]
        fresh = dict(zip(todo, encode_prompts(encoder, todo, emphasis))) if todo else {}
        self.encoded = {t: known[t] if t in known else fresh[t] for t in texts}
        self.window = encoder.max_tokens
        self.contexts = {t: c.to(device=device, dtype=dtype) for t, c in self.encoded.items()}
        self._empty = self.contexts.get("")
        self._encoder, self._emphasis, self._device, self._dtype = encoder, emphasis, device, dtype
        self._pairs: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def is_static(self) -> bool:
        """Whether every step has the same contexts (no editing, no alternation)."""
        return len(self.schedule) == 1 and len(self.negative_schedule) == 1

    def texts_at(self, step: int) -> tuple[str, str]:
        """The (prompt, negative prompt) texts at sampler step `step`, counted from 0."""
        return prompt_at_step(self.schedule, step), prompt_at_step(self.negative_schedule, step)

    def _empty_window(self) -> torch.Tensor:
        if self._empty is None:
            (empty,) = encode_prompts(self._encoder, [""], self._emphasis)
            self._empty = empty.to(device=self._device, dtype=self._dtype)
        return self._empty

    def _pad(self, context: torch.Tensor, tokens: int) -> torch.Tensor:
        missing = (tokens - context.shape[1]) // self.window
        if not missing:
            return context
        return torch.cat([context, *[self._empty_window()] * missing], dim=1)

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) contexts, each (1, T, D) with the same T, at sampler step `step` (from 0)."""
        pair = self.texts_at(step)
        if pair not in self._pairs:
            cond, uncond = self.contexts[pair[0]], self.contexts[pair[1]]
            tokens = max(cond.shape[1], uncond.shape[1])
            self._pairs[pair] = (self._pad(cond, tokens), self._pad(uncond, tokens))
        return self._pairs[pair]


def scheduled_denoiser(make_denoiser, conditioning: PromptConditioning, sigmas: torch.Tensor):
    """A denoiser closure (x, sigma) -> x0 whose contexts follow the prompt schedule.

    make_denoiser(cond_context, uncond_context) builds the closure for one pair of contexts (e.g.
    guidance around the network); it is called once per distinct pair, and the step of each call
    comes from its sigma (`step_index`), so samplers need not know about prompts."""
    if conditioning.is_static:
        return make_denoiser(*conditioning.at(0))
    built: dict[tuple[int, int], object] = {}

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = conditioning.at(step_index(sigmas, sigma))
        key = (id(cond), id(uncond))
        if key not in built:
            built[key] = make_denoiser(cond, uncond)
        return built[key](x, sigma)

    return denoise
