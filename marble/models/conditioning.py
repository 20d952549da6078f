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

from dataclasses import asdict, dataclass, fields

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
    """SDXL's micro-conditioning of one branch (prompt or negative prompt), in pixels."""
    original: tuple[int, int]              # (height, width) the image is said to come from
    crop: tuple[int, int]                  # (top, left) of the crop it is said to be
    target: tuple[int, int]                # (height, width) asked for
    aesthetic: float | None = None         # refiner: the score; None: the model config's for the branch

    @classmethod
    def of_image(cls, width: int, height: int) -> "SizeConditioning":
        """diffusers' defaults: original = target = the image size, no crop."""
        return cls((height, width), (0, 0), (height, width))


@dataclass(frozen=True)
class MicroConditioning:
    """What a request asks SDXL's y to say, as the user gives it: sizes (width, height) like --size,
    crops (top, left) like diffusers' crops_coords_top_left; None: the default. Defaults are
    diffusers': original = target = the image size, crop (0, 0), the refiner's scores 6.0 / 2.5 (the
    model config's); each negative_* defaults to its positive (diffusers' StableDiffusionXLPipeline
    uses the prompt's numbers for the negative prompt unless told otherwise; A1111 always does)."""
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None            # refiner only
    negative_aesthetic_score: float | None = None   # refiner only

    def branches(self, width: int, height: int) -> tuple[SizeConditioning, SizeConditioning]:
        """(prompt, negative prompt) numbers for a width × height pass."""
        original = self.original_size or (width, height)
        target = self.target_size or (width, height)
        crop = self.crop_top_left or (0, 0)
        cond = SizeConditioning(original[::-1], crop, target[::-1], self.aesthetic_score)
        negative = SizeConditioning((self.negative_original_size or original)[::-1],
                                    self.negative_crop_top_left or crop,
                                    (self.negative_target_size or target)[::-1], self.negative_aesthetic_score)
        return cond, negative

    def given(self) -> dict:
        """The fields set, for the record: {"original_size": [w, h], ...}."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_given(cls, data: dict) -> "MicroConditioning":
        """The inverse of `given`; ValueError for unknown keys or values of the wrong shape."""
        if not isinstance(data, dict):
            raise ValueError("micro-conditioning must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown micro-conditioning fields: {', '.join(unknown)}")
        out = {}
        for k, v in data.items():
            if k.endswith("aesthetic_score"):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{k} must be a number, got {v!r}")
                out[k] = float(v)
            else:
                if not (isinstance(v, (list, tuple)) and len(v) == 2
                        and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
                    raise ValueError(f"{k} must be two integers, got {v!r}")
                out[k] = tuple(v)
        return cls(**out)


def fourier_features(numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, n) numbers -> (B, n·dim): each embedded like a timestep, in order."""
    b, n = numbers.shape
    return timestep_embedding(numbers.reshape(-1), dim).reshape(b, n * dim)


def micro_numbers(vector: VectorConditioning, size: SizeConditioning, negative: bool) -> list[float]:
    score = size.aesthetic
    if score is None:
        score = vector.negative_aesthetic_score if negative else vector.aesthetic_score
    tail = size.target if vector.micro == "size" else (score,)
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
