"""From a request to images: one sampling loop for every mode.

txt2img starts from seeded noise at the top of the schedule; img2img starts from the encoded
init image noised to the sigma where `strength` of the schedule remains; inpainting is img2img
plus a closure that re-imposes the known latent outside the mask, and a final paste of the
unmasked pixels. Guidance is a closure too (marble.diffusion.guidance).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from marble import __version__
from marble.checkpoints.resolve import LoadedModel, load_model
from marble.diffusion.guidance import guided_denoiser, inpaint_denoiser
from marble.diffusion.noise import NoiseSource
from marble.diffusion.samplers import get_sampler
from marble.diffusion.schedule import spacing
from marble.record import GenerationRecord
from marble.request import GenerationRequest, ModelDefaults, ResolvedRequest, resolve

Callback = Callable[[int, int, torch.Tensor], None]  # (step, total, x0 estimate in latent space)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    records: list[GenerationRecord]
    request: ResolvedRequest
    warnings: list[str] = field(default_factory=list)


def pil_to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) in [-1, 1], resized with Lanczos when the size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB images (rounding as diffusers does)."""
    arr = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask image (white = repaint) -> (1, 1, H, W) in [0, 1], 1 = repaint."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def prior_std(sigma_max: torch.Tensor) -> torch.Tensor:
    """Std of x at the top of the schedule: the VP prior N(0, I) seen in the x = x0 + sigma·eps frame,
    i.e. sqrt(1 + sigma_max^2) (diffusers' init_noise_sigma for Euler-type schedulers)."""
    return torch.sqrt(1.0 + sigma_max**2)


@torch.inference_mode()
def inpaint_concat(vae, pixels: torch.Tensor | None, mask: torch.Tensor | None, width: int,
                   height: int) -> torch.Tensor:
    """The extra input of SD inpainting U-Nets (ldm's c_concat): [mask at latent size, latent of
    the image with the repainted region blanked], (1, 1 + C, h, w). The mask is binarised at 0.5
    and resized with nearest neighbours, as diffusers' inpainting pipeline does. Without a mask the
    whole image is repainted, and without an image it is blank (0), as A1111 does for txt2img."""
    p = next(vae.parameters())
    factor = vae.downsampling_factor
    mask = torch.ones(1, 1, height, width, device=p.device, dtype=p.dtype) if mask is None else (mask >= 0.5).to(p.dtype)
    blank = torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype)
    masked = blank if pixels is None else pixels * (1 - mask)
    latent_mask = F.interpolate(mask, size=(height // factor, width // factor), mode="nearest")
    return torch.cat([latent_mask, vae.encode(masked)], dim=1)


class Pipeline:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def defaults(self) -> ModelDefaults:
        """What the model contributes to a request: `resolve(request, pipe.defaults)`."""
        c = self.model.config
        return ModelDefaults(steps=c.default_steps, cfg=c.default_cfg, sampler=c.default_sampler,
                             width=c.default_width, height=c.default_height,
                             latent_factor=self.model.latent_factor, max_pixels=c.max_pixels)

    def prompt_warnings(self, req: ResolvedRequest) -> list[str]:
        text = self.model.text_encoder
        out = []
        for label, prompt in (("prompt", req.prompt), ("negative prompt", req.negative_prompt)):
            n = text.count_tokens(prompt)
            if n > text.max_tokens:
                out.append(f"the {label} is {n} tokens; the text encoder reads the first {text.max_tokens} "
                           f"and ignores the rest")
        return out

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.text_encoder.encode(prompts).to(self.model.device, self.model.dtype)

    @torch.inference_mode()
    def generate(self, req: ResolvedRequest, callback: Callback | None = None) -> GenerationResult:
        """Images seed, seed+1, ... one after another. Each is computed exactly as a single run
        with its seed would be: batching images through the network changes the reduction order
        inside CPU kernels (oneDNN/MKL pick blockings by batch size) and so the last bits.
        The request is resolved by the caller (`resolve(request, pipe.defaults)`), once."""
        if not isinstance(req, ResolvedRequest):
            raise TypeError("Pipeline.generate takes a ResolvedRequest: resolve(request, pipe.defaults)")
        m = self.model
        device, dtype = m.device, m.dtype
        spec = get_sampler(req.sampler)
        context = self.encode_text([req.prompt, req.negative_prompt])

        init_pixels = known = mask = latent_mask = None
        if req.init_image is not None:
            init_pixels = pil_to_pixels(req.init_image, req.width, req.height).to(device, dtype)
            known = m.vae.encode(init_pixels).float()   # the sampler's state is float32 whatever the model's dtype
            if req.mask is not None:
                mask = mask_to_tensor(req.mask, req.width, req.height).to(device, dtype)
                latent_mask = F.max_pool2d(mask, m.latent_factor).float()  # repaint a latent cell if any pixel under it is
        cond, uncond = {"context": context[:1]}, {"context": context[1:]}
        if m.config.unet.in_channels > m.latent_channels:   # 9-channel inpainting U-Net: ldm's c_concat
            cond["concat"] = uncond["concat"] = inpaint_concat(m.vae, init_pixels, mask, req.width, req.height)
        denoiser = guided_denoiser(m.denoiser, cond, uncond, req.cfg)

        sigmas = spacing(spec.spacing, m.schedule, req.steps).to(device)
        if known is not None:
            # strength of the schedule is re-run: keep the last int(steps · strength) steps (as diffusers)
            sigmas = sigmas[req.steps - int(req.steps * req.strength):]
        per_image = len(sigmas) - 1
        shape = (1, m.latent_channels, req.height // m.latent_factor, req.width // m.latent_factor)

        images = []
        for i in range(req.n):
            noise = NoiseSource([req.seed + i])
            if known is None:
                x = noise.randn(shape, device) * prior_std(sigmas[0])
                image_denoiser = denoiser
            else:
                x = known + noise.randn(shape, device) * sigmas[0]
                image_denoiser = denoiser if mask is None else \
                    inpaint_denoiser(denoiser, known, latent_mask, noise.randn(shape, device))
            if per_image:
                step_cb = None
                if callback is not None:
                    step_cb = (lambda j, _total, x0, i=i: callback(i * per_image + j, req.n * per_image, x0))
                x = spec.fn(image_denoiser, x, sigmas, noise=noise, callback=step_cb)
            images.extend(pixels_to_pil(m.vae.decode(x.to(dtype))))
        if mask is not None:
            init_rgb = pixels_to_pil(init_pixels)[0]
            mask_l = Image.fromarray((mask[0, 0].float().cpu().numpy() * 255).round().astype(np.uint8))
            images = [Image.composite(im, init_rgb, mask_l) for im in images]  # unmasked pixels exactly the init's

        base = GenerationRecord(
            prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
            sampler=req.sampler, cfg=req.cfg, width=req.width, height=req.height, model_name=self.name,
            model_hash=self.loaded.hash, mode=req.mode, strength=req.strength, init_image=req.init_image_path,
            init_image_sha256=req.init_image_sha256, mask=req.mask_path, mask_sha256=req.mask_sha256,
            marble_version=__version__)
        records = [replace(base, seed=req.seed + i) for i in range(req.n)]
        return GenerationResult(images, records, req, self.prompt_warnings(req))

    def generate_image(self, prompt: str, seed: int, **options) -> Image.Image:
        """One image for one (prompt, seed): the adapter the benchmark uses."""
        options = {k: v for k, v in options.items() if v is not None}
        request = resolve(GenerationRequest(prompt=prompt, seed=seed, **options), self.defaults)
        return self.generate(request).images[0]


def load_pipeline(model: str | None = None, dtype: torch.dtype = torch.float32, *, prediction: str | None = None,
                  allow_pickle: bool = False) -> Pipeline:
    return Pipeline(load_model(model, dtype, prediction=prediction, allow_pickle=allow_pickle))
