"""diffusers' and transformers' SDXL pieces holding marble's tensors: the oracles of
test_sdxl.py and test_sdxl_files.py (tiny configs shaped as diffusers' own SDXL tests build them)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.diffusers_keys import inverse, rename, unet_table, vae_table, vae_to_diffusers_tensor
from marble.models.text import build_text_encoder
from marble.models.unet import UNet
from sd_fixtures import diffusers_oracle, diffusers_vae_kwargs, oracle_tokenizer_folder, randomize_

diffusers = diffusers_oracle()
transformers = pytest.importorskip("transformers")


def diffusers_sdxl_unet_kwargs() -> dict:
    """diffusers' tests/pipelines/stable_diffusion_xl get_dummy_components U-Net, widened to
    (32, 64) so GroupNorm can have 8 groups; written independently of marble's preset."""
    return dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                cross_attention_dim=64, norm_num_groups=8)


def unet_from_diffusers(theirs, config) -> UNet:
    """marble's U-Net holding the very tensors of a diffusers one, renamed by marble's table."""
    ours = UNet(config)
    back = inverse(unet_table(config))
    state = {rename(k, back): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours.eval()

PROMPTS = ["a red cat on a blue chair", "", "castle " * 90]   # the last is over 77 tokens


def hf_text_config(c, projection_dim: int = 0):
    """transformers' CLIPTextConfig for a marble tower (diffusers' tests: bos/eos ids as the tokenizer's)."""
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.layers,
              num_attention_heads=c.heads, max_position_embeddings=c.max_tokens, hidden_act=c.activation,
              layer_norm_eps=c.layer_norm_eps, bos_token_id=49406, eos_token_id=49407, pad_token_id=c.pad_id)
    return transformers.CLIPTextConfig(**kw, projection_dim=projection_dim or c.width)


def hf_towers(text_config, seed: int = 3):
    """transformers' models for each tower: CLIPTextModel, and the pooling one WithProjection."""
    towers = []
    for i, c in enumerate(text_config.encoders):
        cls = transformers.CLIPTextModelWithProjection if c.projection_dim else transformers.CLIPTextModel
        towers.append(randomize_(cls(hf_text_config(c, c.projection_dim)), seed=seed + i))
    return towers


def hf_state(tower) -> dict:
    """A transformers CLIP model's tensors under CLIPTextModel's saved names (transformers 5 drops
    the text_model. prefix from state_dict(); the files carry it)."""
    out = {}
    for k, v in tower.state_dict().items():
        if not k.endswith("position_ids"):
            out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


def concat_from_hf(towers, text_config):
    ours = build_text_encoder(text_config)
    for encoder, tower in zip(ours.encoders, towers):
        encoder.load_state_dict(hf_state(tower))
    return ours.eval()

def load_hf(tower, state: dict):
    """Load marble-named CLIP tensors (text_model.*, text_projection.*) into a transformers model."""
    names = {}
    for k in tower.state_dict():
        if not k.endswith("position_ids"):
            names[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = k
    tower.load_state_dict({names[k]: v for k, v in state.items()}, strict=False)
    assert set(names) == set(state)
    return tower.eval()


def diffusers_pipeline_of(model, tmp_path, refiner: bool = False):
    """diffusers' StableDiffusionXL(Img2Img)Pipeline holding marble's tensors, renamed in the test."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    state = from_model(model).state
    kwargs = diffusers_sdxl_unet_kwargs()
    if refiner:
        kwargs.update(cross_attention_dim=32, projection_class_embeddings_input_dim=72)
    unet = UNet2DConditionModel(**kwargs)
    table = unet_table(model.config.unet)
    unet.load_state_dict({rename(k[5:], table): v for k, v in state.items() if k.startswith("unet.")})
    vae = AutoencoderKL(**diffusers_vae_kwargs(), scaling_factor=0.13025, force_upcast=True)
    table = vae_table(model.config.vae)
    vae.load_state_dict({rename(k[4:], table): vae_to_diffusers_tensor(k[4:], v)
                         for k, v in state.items() if k.startswith("vae.")})
    towers = []
    for i, c in enumerate(model.config.text and model.text_encoder.config.encoders):
        cls = transformers.CLIPTextModelWithProjection if c.projection_dim else transformers.CLIPTextModel
        prefix = f"text_encoder.encoders.{i}."
        towers.append(load_hf(cls(hf_text_config(c, c.projection_dim)),
                              {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}))
    tok_l = transformers.CLIPTokenizer.from_pretrained(oracle_tokenizer_folder(tmp_path / "tok"), local_files_only=True)
    tok_g = transformers.CLIPTokenizer.from_pretrained(oracle_tokenizer_folder(tmp_path / "tok2", "!"),
                                                       local_files_only=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="linspace")
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=towers[0], tokenizer=None,
                                                tokenizer_2=tok_g, unet=unet, scheduler=scheduler,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=towers[0], text_encoder_2=towers[1], tokenizer=tok_l,
                                         tokenizer_2=tok_g, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_start(pipe, seed: int, steps: int, shape: tuple) -> torch.Tensor:
    """marble starts at sqrt(1 + σ_max²)·noise, diffusers' linspace Euler at σ_max·noise: hand it ours."""
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return noise * ((1 + sigma_max ** 2) ** 0.5 / pipe.scheduler.init_noise_sigma)
