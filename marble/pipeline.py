"""From a request to images: one sampling loop for every mode.

txt2img starts from seeded noise at the top of the schedule; img2img starts from the encoded
init image noised to the sigma where `strength` of the schedule remains; inpainting is img2img
plus a closure that re-imposes the known latent outside the mask, and a final paste of the
unmasked pixels. Guidance is a closure too (marble.diffusion.guidance).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from marble import __version__
from marble.adapters.controlnet import (ActiveUnit, ControlNetLoader, controlled_denoiser, hint_tensor,
                                       pixel_perfect_resolution, resize_control)
from marble.adapters.lora import LoraUse, overlay
from marble.adapters.lora_loader import LoraLoader, record_entries
from marble.adapters.preprocess import PROCESSOR_RES, preprocess
from marble.adapters.regions import Region, region_denoiser, region_networks, sketch_regions
from marble.checkpoints.resolve import LoadedModel, load_model
from marble.checkpoints.taesd_file import read_taesd
from marble.cpu_features import dtype_name
from marble.errors import LoraError, ModelLoadError
from marble.diffusion.guidance import guided_denoiser, inpaint_denoiser
from marble.diffusion.handoff import handoff_denoiser, switch_sigma
from marble.diffusion.noise import NoiseSource
from marble.diffusion.samplers import get_sampler
from marble.diffusion.schedule import spacing
from marble.hires import LATENT_UPSCALERS, hires_size, upscale_image, upscale_latent
from marble.models.conditioning import vector_y, zeroes_negative
from marble.models.deepcache import deepcache_denoiser
from marble.models.latent_preview import latent_rgb_for
from marble.models.quantize import check_quantization, quantize_linear
from marble.models.tome import token_merging
from marble.models.traced import TracedNetwork
from marble.models.unet import UNet
from marble.models.vae_tiling import tiled
from marble.models.weight_cast import compute_dtype
from marble.prompts.conditioning import PromptConditioning, scheduled_denoiser
from marble.prompts.encode import encode_prompts, prompt_chunks
from marble.record import GenerationRecord
from marble.request import GenerationRequest, ModelDefaults, ResolvedRequest, resolve
from marble.tensor_file import mapped_bytes, release

Callback = Callable[[int, int, torch.Tensor], None]  # (step, total, x0 estimate in latent space)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    records: list[GenerationRecord]
    request: ResolvedRequest
    warnings: list[str] = field(default_factory=list)


def release_weights(*networks) -> None:
    """Hand back the pages of the networks' memory-mapped weights (`--low-memory`) at the end of
    their stage, so the next stage's activations do not sit on top of them; the next use re-faults
    them from the page cache, the file's bytes. Weights held in RAM are untouched: a no-op then."""
    release(t for net in networks if net is not None for t in (*net.parameters(), *net.buffers()))


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
    p = torch.empty(0, device=next(vae.parameters()).device, dtype=compute_dtype(vae))
    factor = vae.downsampling_factor
    mask = torch.ones(1, 1, height, width, device=p.device, dtype=p.dtype) if mask is None else (mask >= 0.5).to(p.dtype)
    blank = torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype)
    masked = blank if pixels is None else pixels * (1 - mask)
    latent_mask = F.interpolate(mask, size=(height // factor, width // factor), mode="nearest")
    return torch.cat([latent_mask, vae.encode(masked)], dim=1)


class Pipeline:
    """`refiner`: a second model that takes over the last (1 − refiner_switch) of the (last pass's)
    schedule (SDXL's refiner; diffusers' denoising_end / denoising_start) and decodes the image.
    `quantize`: "int8" runs the base U-Net's Linear layers in dynamic int8 (marble.models.quantize),
    an approximation the records state."""

    def __init__(self, loaded: LoadedModel, lora_dir: Path | None = None, lora_lenient: bool = False, *,
                 refiner: LoadedModel | None = None, refiner_switch: float = 0.8,
                 preview_decoder=None, decoder=None, decoder_name: str | None = None, trace: bool = False,
                 control_dir: Path | None = None, max_control_units: int = 3, allow_pickle: bool = False,
                 quantize: str | None = None):
        self.loaded = loaded
        self.model = loaded.model
        try:
            self.quantize = check_quantization(quantize)
            if self.quantize is not None:   # before the trace and the LoRA table see the layers
                quantize_linear(self.model.unet, self.quantize)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        self.refiner, self.refiner_switch = refiner, refiner_switch
        if refiner is not None:
            check_refiner(self.model, refiner.model, refiner_switch)
        # --low-memory: each network's mapped pages go back to the kernel when its stage ends; for
        # weights held in RAM nothing is looked up per image
        weights = (t for m in (self.model, refiner and refiner.model) if m is not None for t in m.parameters())
        self.release = release_weights if mapped_bytes(weights) else (lambda *networks: None)
        for codec in (preview_decoder, decoder):
            if codec is not None:
                check_decoder(self.model, codec)
        # the final decode: a user's fast decoder (TAESD, `decoder_name` recorded) or the VAE
        self.decoder, self.decoder_name = decoder, decoder_name
        # a step's preview: the user's preview decoder, else the VAE's linear latent→RGB map, else the VAE
        linear = latent_rgb_for(self.model.config.vae)
        self.previewer = preview_decoder.decode if preview_decoder is not None else \
            linear if linear is not None else self.model.vae.decode
        if trace:   # same bits, less Python per U-Net call (marble.models.traced)
            for m in (self.model, refiner and refiner.model):
                if m is not None:
                    m.denoiser = m.denoiser_for(TracedNetwork(m.unet))
        # LoRA files by name (in lora_dir) or path, read once; applied per request as an overlay
        self.loras = LoraLoader(self.model, lora_dir, lora_lenient)
        # ControlNets by name (in control_dir) or path, read once, fitted to this model's U-Net
        self.controlnets = ControlNetLoader(self.model, control_dir, allow_pickle)
        self.max_control_units = max_control_units
        self._empty_contexts: dict[tuple[int, str], torch.Tensor] = {}   # (model id, emphasis) -> ""'s context

    @property
    def name(self) -> str:
        return self.loaded.name

    @torch.inference_mode()
    def preview(self, x0: torch.Tensor) -> Image.Image:
        """A cheap picture of a step's x0 estimate (the first image of the batch), at the image's
        size: the previewer's pixels, enlarged with nearest neighbours when it works at latent size."""
        m = self.model
        image = pixels_to_pil(self.previewer(x0[:1].to(m.dtype)).float())[0]
        size = (x0.shape[-1] * m.latent_factor, x0.shape[-2] * m.latent_factor)
        return image if image.size == size else image.resize(size, Image.NEAREST)

    @property
    def defaults(self) -> ModelDefaults:
        """What the model contributes to a request: `resolve(request, pipe.defaults)`."""
        c = self.model.config
        return ModelDefaults(steps=c.default_steps, cfg=c.default_cfg, sampler=c.default_sampler,
                             width=c.default_width, height=c.default_height,
                             latent_factor=self.model.latent_factor, max_pixels=c.max_pixels, few_step=c.few_step,
                             max_control_units=self.max_control_units, micro=self.micro_kinds(),
                             unet=isinstance(self.model.unet, UNet),
                             whole_decoder=not getattr(self.model.unet.config, "pruned", False))


    def micro_kinds(self) -> tuple[str, ...]:
        """The SDXL micro-conditioning this pipeline's models take: "size" (original size, crop,
        target size) for any SDXL model, "aesthetic" where one is a refiner."""
        vectors = [m.config.vector for m in (self.model, self.refiner and self.refiner.model) if m is not None]
        vectors = [v for v in vectors if v is not None]
        return (("size",) if vectors else ()) + (("aesthetic",) if any(v.micro == "aesthetic" for v in vectors) else ())

    def conditioning(self, req: ResolvedRequest, hires_steps: int | None = None, model=None) -> PromptConditioning:
        """The per-step contexts of the request's prompts (weights, windows, editing; marble.prompts),
        read from the prompt with its <lora:...> tags cut out; `model`: another than the pipeline's
        (the refiner)."""
        m = model or self.model
        # The empty prompt (the negative of most requests) is encoded once per model and emphasis,
        # alone, so every request encodes its prompt in the same batch; not while LoRAs may patch
        # the text encoder (then as before, together). tests/test_pipeline_speed.py holds the image
        # to the together-encoded one.
        known = None
        if not req.lora_specs:
            key = (id(m), req.emphasis)
            if key not in self._empty_contexts:
                self._empty_contexts[key] = encode_prompts(m.text_encoder, [""], req.emphasis)[0]
            known = {"": self._empty_contexts[key]}
        return PromptConditioning(m.text_encoder, req.text_prompt, req.negative_prompt, req.steps,
                                  hires_steps=hires_steps, emphasis=req.emphasis, device=m.device, dtype=m.dtype,
                                  known=known)

    def denoiser(self, conditioning: PromptConditioning, sigmas: torch.Tensor, cfg: float,
                 extra: dict[str, torch.Tensor], vectors=None, model=None, control: list[ActiveUnit] | None = None,
                 deepcache: int = 1, regions: tuple[list[Region], float] = ([], 0.0), latent: tuple[int, int] = (0, 0)):
        """Guidance around the network, with each step's contexts picked inside the closure.
        `vectors` (from `vector_conditioning`) adds SDXL's y to each branch, and zeros the
        unconditional context where the model conditions an empty negative prompt on zeros.
        `control`: ControlNet units whose residuals join the U-Net (marble.adapters.controlnet); the
        halves of CFG carry `cond_mark` so a unit can act on the conditional half alone.
        `deepcache` > 1: the U-Net's deep features are reused between every `deepcache`-th step
        (marble.models.deepcache; the request refuses it with ControlNet). `regions` (regions, strength)
        modulate the U-Net's cross-attention at a latent of side `latent` (marble.adapters.regions)."""
        model = model or self.model
        y_cond, y_uncond, zero_uncond = vectors or ({}, {}, False)
        network = model.denoiser
        marks: tuple[dict, dict] = ({}, {})
        if control:
            network = region_denoiser(controlled_denoiser(model, control, sigmas), region_networks(model, control),
                                      regions[0], latent, model.schedule, regions[1])
            one = torch.ones(1, device=model.device)
            marks = ({"cond_mark": one}, {"cond_mark": torch.zeros_like(one)})
        elif deepcache > 1:
            network = deepcache_denoiser(model, sigmas, deepcache)

        def guided(cond_context: torch.Tensor, uncond_context: torch.Tensor):
            if zero_uncond:
                uncond_context = torch.zeros_like(uncond_context)
            return guided_denoiser(network, {"context": cond_context, **extra, **y_cond, **marks[0]},
                                   {"context": uncond_context, **extra, **y_uncond, **marks[1]}, cfg)
        return scheduled_denoiser(guided, conditioning, sigmas)

    def vector_conditioning(self, model, conditioning: PromptConditioning, req: ResolvedRequest, width: int,
                            height: int):
        """SDXL's vector conditioning ({"y"} for cond and uncond, and whether the unconditional
        context is zeros), or None for models without it. The pooled text comes from the first
        window of the step-0 prompt texts (as A1111 pools SDXL prompts; weights do not act on it);
        sizes are the request's micro-conditioning, diffusers' defaults for a width × height image
        where it gives none (marble.models.conditioning.MicroConditioning)."""
        vector = model.config.vector
        if vector is None:
            return None
        encoder = model.text_encoder
        rows = []
        for text in conditioning.texts_at(0):
            chunks = prompt_chunks(encoder, text, req.emphasis)
            rows.append(encoder.chunk_row(list(chunks[0].ids) if chunks else []))
        pooled = encoder.pooled_from_rows(torch.tensor(rows, device=model.device))
        zero = zeroes_negative(vector, req.negative_prompt)
        if zero:
            pooled[1:] = 0.0
        sizes = req.micro.branches(width, height)
        y = [vector_y(vector, pooled[i:i + 1], sizes[i], negative=i == 1).to(model.device, model.dtype) for i in (0, 1)]
        return {"y": y[0]}, {"y": y[1]}, zero

    def hand_off(self, denoiser, req: ResolvedRequest, sigmas: torch.Tensor, width: int, height: int,
                 hires_steps: int | None = None):
        """The base's guided denoiser, then the refiner's (its own conditioning) below the switch σ."""
        r = self.refiner.model
        conditioning = self.conditioning(req, hires_steps, model=r)
        refined = self.denoiser(conditioning, sigmas, req.cfg, {},
                                self.vector_conditioning(r, conditioning, req, width, height), model=r)
        schedule = self.model.schedule
        return handoff_denoiser(denoiser, refined,
                                switch_sigma(sigmas, schedule.sigma_to_t, self.refiner_switch, len(schedule.sigmas)))

    def sigmas(self, sampler: str, steps: int, strength: float | None = None, spacing_name: str | None = None
               ) -> torch.Tensor:
        """The schedule of `steps` steps in `spacing_name` (None: the sampler's own); with `strength`,
        its last int(steps · strength) steps (img2img: strength of the schedule is re-run, as diffusers)."""
        m = self.model
        sigmas = spacing(spacing_name or get_sampler(sampler).spacing, m.schedule, steps).to(m.device)
        return sigmas if strength is None else sigmas[steps - int(steps * strength):]

    def extra_conditioning(self, vae, pixels: torch.Tensor | None, mask: torch.Tensor | None, width: int,
                           height: int) -> dict[str, torch.Tensor]:
        """`vae`: the request's codec (the model's VAE, tiled or not)."""
        m = self.model
        if m.config.unet.in_channels > m.latent_channels:   # 9-channel inpainting U-Net: ldm's c_concat
            return {"concat": inpaint_concat(vae, pixels, mask, width, height)}
        return {}

    def sample(self, sampler: str, denoiser, sigmas: torch.Tensor, seed: int, shape: tuple[int, ...],
               known: torch.Tensor | None = None, latent_mask: torch.Tensor | None = None,
               callback=None) -> torch.Tensor:
        """One image's latent: from seeded noise (txt2img) or from `known` noised to sigmas[0]
        (img2img), with the known latent re-imposed outside `latent_mask` (inpainting)."""
        device = self.model.device
        noise = NoiseSource([seed])
        if known is None:
            x = noise.randn(shape, device) * prior_std(sigmas[0])
        else:
            x = known + noise.randn(shape, device) * sigmas[0]
            if latent_mask is not None:
                denoiser = inpaint_denoiser(denoiser, known, latent_mask, noise.randn(shape, device))
        if len(sigmas) > 1:
            x = get_sampler(sampler).fn(denoiser, x, sigmas, noise=noise, callback=callback)
        return x

    def hires_start(self, req: ResolvedRequest, latent: torch.Tensor, size) -> torch.Tensor:
        """The first pass's latent upscaled to `size` (hires_size), as the second pass's known latent:
        interpolated in latent space, or decoded, resized as an image and encoded again (the img2img
        path's own encode, tiled as the request asks)."""
        m, h = self.model, req.hires
        if h.upscaler in LATENT_UPSCALERS:
            return upscale_latent(latent, size, m.latent_factor, h.upscaler)
        vae = tiled(m.vae, req.vae_tile_size)
        first = pixels_to_pil(vae.decode(latent.to(m.dtype)))[0]
        image = upscale_image(first, size, m.latent_factor, h.upscaler)
        return vae.encode(pil_to_pixels(image, size.width, size.height).to(m.device, m.dtype)).float()

    @torch.inference_mode()
    def generate(self, req: ResolvedRequest, callback: Callback | None = None) -> GenerationResult:
        """Images seed, seed+1, ... one after another. Each is computed exactly as a single run
        with its seed would be: batching images through the network changes the reduction order
        inside CPU kernels (oneDNN/MKL pick blockings by batch size) and so the last bits.
        The request is resolved by the caller (`resolve(request, pipe.defaults)`), once.
        With a hires fix, each image's second pass is img2img on its upscaled first pass, with the
        same seed, prompts, sampler and CFG (prompt editing counts on into the second pass)."""
        if not isinstance(req, ResolvedRequest):
            raise TypeError("Pipeline.generate takes a ResolvedRequest: resolve(request, pipe.defaults)")
        uses = self.lora_uses(req)   # LoraError before any work
        self.control_nets(req)       # ModelLoadError before any work
        with overlay(self.model, uses, self.loras.table):   # this request's LoRAs, gone when it ends
            images = self._images(req, callback)
        h = req.hires
        base = GenerationRecord(
            prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
            sampler=req.sampler, cfg=req.cfg, width=req.width, height=req.height, model_name=self.name,
            model_hash=self.loaded.hash, mode=req.mode, strength=req.strength, init_image=req.init_image_path,
            init_image_sha256=req.init_image_sha256, mask=req.mask_path, mask_sha256=req.mask_sha256,
            hires_upscaler=h and h.upscaler, hires_scale=h and h.scale, hires_resize_x=h.resize_x if h else 0,
            hires_resize_y=h.resize_y if h else 0, hires_steps=h.steps if h else 0, hires_denoise=h and h.denoise,
            emphasis=req.emphasis, spacing=req.spacing, vae=self.decoder_name, dtype=dtype_name(self.model.dtype),
            micro=req.micro.given() or None, deepcache=req.deepcache, tome=req.tome, quantize=self.quantize,
            vae_tile_size=req.vae_tile_size, regions=req.regions,
            marble_version=__version__, loras=tuple(record_entries(uses, req.lora_specs)),
            controlnets=tuple(self.control_records(req)))
        if self.refiner is not None:
            base = replace(base, refiner=self.refiner.name, refiner_hash=self.refiner.hash,
                           refiner_path=self.refiner.source or None, refiner_switch=self.refiner_switch)
        records = [replace(base, seed=req.seed + i) for i in range(req.n)]
        warnings = list(req.warnings) + [f"LoRA {use.lora.name}: skipped {why}" for use in uses
                                         for why in use.lora.skipped]
        return GenerationResult(images, records, req, warnings)

    def lora_uses(self, req: ResolvedRequest) -> list[LoraUse]:
        """The request's LoRAs, read (cached) and checked against this model: a LoraError (one line)
        for a missing, corrupt or mismatched file or a name outside the LoRA folder."""
        if self.quantize is not None and req.lora_specs:
            raise LoraError(f"LoRAs cannot patch a U-Net quantised to {self.quantize}: load it without --quantize")
        return self.loras.uses(req.lora_specs)

    def control_nets(self, req: ResolvedRequest) -> list:
        """The request's ControlNets, read (cached) and fitted to this model: a ModelLoadError (one line)
        for a missing, corrupt or mismatched file or a name outside the ControlNet folder."""
        return [self.controlnets.get(spec) for spec in req.controls]

    def control_records(self, req: ResolvedRequest) -> list[dict]:
        out = []
        for spec, loaded in zip(req.controls, self.control_nets(req)):
            entry = {"module": spec.module, "model": loaded.name, "hash": loaded.hash, "weight": spec.weight,
                     "resize_mode": spec.resize, "guidance_start": spec.start, "guidance_end": spec.end,
                     "control_mode": spec.mode, "image": spec.image_path, "image_sha256": spec.image_sha256,
                     "processor_res": spec.processor_res or PROCESSOR_RES, "pixel_perfect": spec.pixel_perfect}
            if spec.is_path:
                entry["path"] = str(loaded.path)
            out.append(entry)
        return out

    def control_units(self, req: ResolvedRequest, images: list[Image.Image]) -> list[ActiveUnit]:
        """The request's units for a pass, each handed its fitted control image (`control_images`) as a
        [0, 1] hint."""
        m = self.model
        return [ActiveUnit.of_mode(loaded.net, hint_tensor(image).to(m.device, m.dtype), spec.weight, spec.start,
                                   spec.end, spec.mode)
                for spec, loaded, image in zip(req.controls, self.control_nets(req), images)]

    def control_images(self, req: ResolvedRequest, width: int, height: int) -> list[Image.Image]:
        """Each unit's control image for a pass at width × height: preprocessed (module, at its
        processor resolution), then fitted (resize mode): sd-webui-controlnet's order, so a map made
        at 512 px is then resized to the output."""
        out = []
        for spec in req.controls:
            res = (pixel_perfect_resolution(spec.image.size, width, height, spec.resize) if spec.pixel_perfect
                   else spec.processor_res or PROCESSOR_RES)
            out.append(resize_control(preprocess(spec.image, spec.module, spec.threshold_a, spec.threshold_b, res),
                                      width, height, spec.resize))
        return out

    def regions(self, req: ResolvedRequest, images: list[Image.Image]) -> tuple[list[Region], float]:
        """The first fitted control image's colour regions that the prompt's colour phrases name, and
        the request's strength (marble.adapters.regions); none when the request has no regions."""
        if not req.regions:
            return [], 0.0
        text = self.model.text_encoder
        return sketch_regions(images[0], req.text_prompt, text.count_tokens, text.max_tokens), req.regions

    def _images(self, req: ResolvedRequest, callback: Callback | None) -> list[Image.Image]:
        m = self.model
        device, dtype = m.device, m.dtype
        vae = tiled(m.vae, req.vae_tile_size)   # tile 0: the VAE itself

        init_pixels = known = mask = latent_mask = None
        if req.init_image is not None:
            init_pixels = pil_to_pixels(req.init_image, req.width, req.height).to(device, dtype)
            known = vae.encode(init_pixels).float()   # the sampler's state is float32 whatever the model's dtype
            if req.mask is not None:
                mask = mask_to_tensor(req.mask, req.width, req.height).to(device, dtype)
                latent_mask = F.max_pool2d(mask, m.latent_factor).float()  # repaint a latent cell if any pixel under it is
        sigmas = self.sigmas(req.sampler, req.steps, req.strength if known is not None else None, req.spacing)
        conditioning = self.conditioning(req)
        controls = self.control_images(req, req.width, req.height)
        denoiser = self.denoiser(conditioning, sigmas, req.cfg,
                                 self.extra_conditioning(vae, init_pixels, mask, req.width, req.height),
                                 self.vector_conditioning(m, conditioning, req, req.width, req.height),
                                 control=self.control_units(req, controls), deepcache=req.deepcache,
                                 regions=self.regions(req, controls),
                                 latent=(req.height // m.latent_factor, req.width // m.latent_factor))
        if self.refiner is not None and req.hires is None:
            denoiser = self.hand_off(denoiser, req, sigmas, req.width, req.height)
        models = [m] if self.refiner is None else [m, self.refiner.model]
        shape = (1, m.latent_channels, req.height // m.latent_factor, req.width // m.latent_factor)

        hires_sigmas = hires_denoiser = None
        if req.hires is not None:
            hires_steps = req.hires.steps or req.steps
            hires_sigmas = self.sigmas(req.sampler, hires_steps, req.hires.denoise, req.spacing)
            size = hires_size(req.width, req.height, scale=req.hires.scale, resize_x=req.hires.resize_x,
                              resize_y=req.hires.resize_y, factor=m.latent_factor)
            hires_conditioning = self.conditioning(req, hires_steps)
            hires_controls = self.control_images(req, size.width, size.height)
            hires_denoiser = self.denoiser(hires_conditioning, hires_sigmas, req.cfg,
                                           self.extra_conditioning(vae, None, None, size.width, size.height),
                                           self.vector_conditioning(m, hires_conditioning, req, size.width, size.height),
                                           control=self.control_units(req, hires_controls), deepcache=req.deepcache,
                                           regions=self.regions(req, hires_controls),
                                           latent=(size.height // m.latent_factor, size.width // m.latent_factor))
            if self.refiner is not None:   # the refiner takes over the end of the last pass
                hires_denoiser = self.hand_off(hires_denoiser, req, hires_sigmas, size.width, size.height, hires_steps)
        self.release(*(n.text_encoder for n in models), m.vae)   # stage over: prompts (and init image) encoded
        decoder = self.decoder if self.decoder is not None else tiled(   # else the last denoiser's VAE decodes
            (self.refiner.model if self.refiner is not None else m).vae, req.vae_tile_size)
        per_image = len(sigmas) - 1 + (len(hires_sigmas) - 1 if hires_sigmas is not None else 0)

        def progress(i: int, offset: int):
            if callback is None:
                return None
            return lambda j, _total, x0: callback(i * per_image + offset + j, req.n * per_image, x0)

        images = []
        for i in range(req.n):
            with token_merging(m.unet, req.tome, req.seed + i):   # ratio 0: the exact network
                x = self.sample(req.sampler, denoiser, sigmas, req.seed + i, shape, known, latent_mask, progress(i, 0))
                if req.hires is not None:
                    start = self.hires_start(req, x, size)
                    x = self.sample(req.sampler, hires_denoiser, hires_sigmas, req.seed + i, tuple(start.shape), start,
                                    callback=progress(i, len(sigmas) - 1))
            self.release(*(n.unet for n in models))   # the decode runs without the U-Nets' pages
            images.extend(pixels_to_pil(decoder.decode(x.to(dtype))))
            self.release(*(n.vae for n in models))
        if mask is not None:
            init_rgb = pixels_to_pil(init_pixels)[0]
            mask_l = Image.fromarray((mask[0, 0].float().cpu().numpy() * 255).round().astype(np.uint8))
            images = [Image.composite(im, init_rgb, mask_l) for im in images]  # unmasked pixels exactly the init's
        return images

    def generate_image(self, prompt: str, seed: int, **options) -> Image.Image:
        """One image for one (prompt, seed): the adapter the benchmark uses."""
        options = {k: v for k, v in options.items() if v is not None}
        request = resolve(GenerationRequest(prompt=prompt, seed=seed, **options), self.defaults)
        return self.generate(request).images[0]


def check_decoder(model, codec) -> None:
    """A replacement decoder must read this model's latents: same channels and downsampling."""
    ours = (model.latent_channels, model.latent_factor)
    theirs = (codec.config.latent_channels, codec.downsampling_factor)
    if ours != theirs:
        raise ModelLoadError(f"the decoder reads {theirs[0]}-channel latents at 1/{theirs[1]} of the image size; "
                             f"this model's are {ours[0]}-channel at 1/{ours[1]} (TAESD is for SD1.x/2.x, "
                             "TAESDXL for SDXL)")


def check_refiner(base, refiner, switch: float) -> None:
    """A refiner continues the base's latent on the base's schedule: same latent space and schedule."""
    if not 0.0 < switch < 1.0:
        raise ModelLoadError(f"the refiner switch must be in (0, 1), not {switch}")
    if refiner.config.vector is None or refiner.config.vector.micro != "aesthetic":
        raise ModelLoadError(f"{refiner.config.name} is not an SDXL refiner (it takes no aesthetic score)")
    if base.config.vector is None or base.config.vector.micro != "size":
        raise ModelLoadError(f"a refiner needs an SDXL base model; {base.config.name} is not one"
                             + (" (it is a refiner itself)" if base.config.vector is not None else ""))
    if (refiner.latent_channels, refiner.latent_factor) != (base.latent_channels, base.latent_factor) \
            or refiner.config.schedule != base.config.schedule:
        raise ModelLoadError(f"the refiner {refiner.config.name} does not share the latent space and noise schedule "
                             f"of {base.config.name}")
    if refiner.config.unet.in_channels != refiner.latent_channels:
        raise ModelLoadError("an inpainting U-Net cannot be a refiner")


def load_pipeline(model: str | None = None, dtype: torch.dtype = torch.float32, *, prediction: str | None = None,
                  allow_pickle: bool = False, lora_dir: Path | None = None, lora_lenient: bool = False,
                  refiner: str | None = None, refiner_switch: float = 0.8, preview_decoder: Path | None = None,
                  decoder: Path | None = None, trace: bool = False, control_dir: Path | None = None,
                  max_control_units: int = 3, storage: torch.dtype | None = None,
                  quantize: str | None = None, mapped: bool = False) -> Pipeline:
    """`preview_decoder`, `decoder`: TAESD files (marble.checkpoints.taesd_file) for step previews
    and for the final decode instead of the VAE; `trace`: the U-Net as a TorchScript trace; `storage`: keep the weights in fp16/bf16
    and compute in `dtype` (marble.models.weight_cast); `quantize`: "int8" (marble.models.quantize);
    `mapped` (`--low-memory`): weights stay views of the model files' memory maps, released between
    stages (the same pixels, less resident memory; resolve.load_model)."""
    base = load_model(model, dtype, prediction=prediction, allow_pickle=allow_pickle, storage=storage, mapped=mapped)
    second = load_model(refiner, dtype, allow_pickle=allow_pickle, storage=storage, mapped=mapped) if refiner else None
    preview = read_taesd(preview_decoder).to(base.model.device) if preview_decoder else None
    final = read_taesd(decoder).to(base.model.device) if decoder else None
    return Pipeline(base, lora_dir, lora_lenient, refiner=second, refiner_switch=refiner_switch,
                    preview_decoder=preview, decoder=final, decoder_name=Path(decoder).stem if decoder else None,
                    trace=trace, control_dir=control_dir, max_control_units=max_control_units,
                    allow_pickle=allow_pickle, quantize=quantize)
