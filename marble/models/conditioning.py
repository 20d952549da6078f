"""What the U-Net is conditioned on, per model family: the text context, and for SDXL the vector y.

SD1/SD2: {"context"} — the text encoder's states for the prompt and for the negative prompt.
SDXL (Podell et al. 2023, §2.2): {"context", "y"}, with y = [pooled text embedding, the Fourier
features of a few numbers] (ldm's vector conditioning, added to the time embedding):
  base:    original size (h, w), crop top-left (top, left), target size (h, w)
  refiner: original size (h, w), crop top-left (top, left), aesthetic score
Each number is embedded like a timestep (sinusoids, [cos | sin], `fourier_dim` wide). The family's
difference is data in the model config (`VectorConditioning`), and the one function
`condition_pair` reads it; samplers and guidance only see the dicts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from marble.models.layers import timestep_embedding

MICRO = ("size", "aesthetic")


@dataclass(frozen=True)
class VectorConditioning:
    micro: str = "size"                    # numbers after the pooled text: "size" (SDXL base) or "aesthetic" (refiner)
    fourier_dim: int = 256                 # width of each number's sinusoidal embedding
    zero_empty_negative: bool = True       # an empty negative prompt conditions on zeros (diffusers' force_zeros_for_empty_prompt)
    aesthetic_score: float = 6.0           # refiner: the score the prompt is conditioned on
    negative_aesthetic_score: float = 2.5  # refiner: the score the negative prompt is conditioned on

    def __post_init__(self):
        if self.micro not in MICRO:
            raise ValueError(f"micro must be one of {MICRO}, not {self.micro!r}")

    def numbers(self) -> int:
        """How many numbers follow the pooled text in y."""
        return 6 if self.micro == "size" else 5


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one request, in pixels."""
    original: tuple[int, int]              # (height, width) the image is said to come from
    crop: tuple[int, int]                  # (top, left) of the crop it is said to be
    target: tuple[int, int]                # (height, width) asked for

    @classmethod
    def of_image(cls, width: int, height: int) -> "SizeConditioning":
        """diffusers' defaults: original = target = the image size, no crop."""
        return cls((height, width), (0, 0), (height, width))


def fourier_features(numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, n) numbers -> (B, n·dim): each embedded like a timestep, in order."""
    b, n = numbers.shape
    return timestep_embedding(numbers.reshape(-1), dim).reshape(b, n * dim)


def micro_numbers(vector: VectorConditioning, size: SizeConditioning, negative: bool) -> list[float]:
    tail = (size.target if vector.micro == "size" else
            (vector.negative_aesthetic_score if negative else vector.aesthetic_score,))
    return [float(v) for v in (*size.original, *size.crop, *tail)]


def zeroes_negative(vector: VectorConditioning | None, negative_prompt: str) -> bool:
    """Whether the unconditional branch conditions on zeros (context and pooled) rather than on the
    encoded negative prompt: an empty one, for models trained so (force_zeros_for_empty_prompt)."""
    return vector is not None and vector.zero_empty_negative and negative_prompt == ""


def vector_y(vector: VectorConditioning, pooled: torch.Tensor, size: SizeConditioning,
             negative: bool) -> torch.Tensor:
    """(B, adm_in_channels) y: the pooled text, then the Fourier features of the size numbers."""
    numbers = torch.tensor([micro_numbers(vector, size, negative)] * len(pooled), device=pooled.device)
    return torch.cat([pooled, fourier_features(numbers, vector.fourier_dim)], dim=1)


def condition_pair(text_encoder, vector: VectorConditioning | None, prompt: str, negative_prompt: str,
                   size: SizeConditioning) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(cond, uncond) for the prompt and the negative prompt, batch 1 each, float32: {"context"},
    and "y" when the model takes vector conditioning. Both prompts go through the encoder together."""
    if vector is None:
        context = text_encoder.encode([prompt, negative_prompt])
        return {"context": context[:1]}, {"context": context[1:]}
    context, pooled = text_encoder.encode_pooled([prompt, negative_prompt])
    if zeroes_negative(vector, negative_prompt):
        context[1:], pooled[1:] = 0.0, 0.0
    return ({"context": context[:1], "y": vector_y(vector, pooled[:1], size, False)},
            {"context": context[1:], "y": vector_y(vector, pooled[1:], size, True)})
