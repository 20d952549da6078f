"""Prompts as A1111 users write them -> the context of every sampling step.

- schedule.py, attention.py: the syntax, as A1111's modules/prompt_parser.py reads it:
  `[from:to:when]`, `[a|b]` (scheduling, first), then `(x:1.3)`, `[x]`, BREAK (attention);
  pure Python, no torch.
- encode.py: weighted text of any length -> context: 75-token windows with A1111's comma rule,
  BREAK, and emphasis (A1111's or ComfyUI's), for any text encoder marble has.
- conditioning.py: a prompt and a negative prompt -> per-step (cond, uncond) contexts, and the
  denoiser closure that switches them inside the sampling loop.

The package imports nothing itself, so the request's validation can use the syntax modules alone.
"""
