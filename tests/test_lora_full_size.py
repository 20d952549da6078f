"""LoRA at full SD1.5 size: marble's fused weights against diffusers' (slow; CI runs it)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from kohya_files import kohya_paths, random_kohya, write_safetensors
from marble.adapters.lora import LoraUse, fuse
from marble.adapters.lora_files import read_lora
from marble.adapters.lora_table import module_table
from sd_fixtures import diffusers_oracle, diffusers_vae_kwargs, oracle_tokenizer_folder

diffusers = diffusers_oracle()
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.mark.slow
@torch.no_grad()
def test_sd15_sized_fused_weights_equal_diffusers(tmp_path):
    """SD1.5's shapes (U-Net 860M, CLIP ViT-L/14 text), random weights, a random rank-8 LoRA (α = 4)
    on every kohya target (attention, LoCon convolutions, text encoder): every weight marble fuses
    equals diffusers' fused weight within 1e-6 relative; every other weight is untouched on both
    sides. Memory: one copy of the weights per side (~8 GB); the VAE stays unbuilt on marble's side."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from marble.checkpoints.diffusers_keys import inverse, rename, unet_table
    from marble.models.latent_diffusion import LatentDiffusion
    from marble.models.skeleton import skeleton
    from marble.models.stable_diffusion import sd_config
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**diffusers_vae_kwargs()), text_encoder=text, unet=unet, scheduler=EulerDiscreteScheduler(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(oracle_tokenizer_folder(tmp_path / "vocab")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    config = sd_config("sd15")
    with skeleton():
        model = LatentDiffusion(config)
    to_marble = inverse(unet_table(config.unet))
    model.unet.load_state_dict({rename(k, to_marble): v.clone() for k, v in unet.state_dict().items()},
                               strict=True, assign=True)
    model.text_encoder.load_state_dict({f"text_model.{k}": v.clone() for k, v in text.state_dict().items()
                                        if k != "embeddings.position_ids"}, strict=True, assign=True)

    paths = {name: path for name, path, _ in kohya_paths(pipe)}
    tensors, _ = random_kohya(pipe, seed=3, alpha=4.0, ranks=(8,))
    lora_path = write_safetensors(tmp_path / "sd15.safetensors", tensors)
    table = module_table(model)
    lora = read_lora(lora_path, table)
    assert len(lora.layers) == len(paths) > 300, len(paths)
    fuse(model, [LoraUse(lora)], table)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()

    ours = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    ours.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
    theirs = {f"unet.{rename(k, to_marble)}": v for k, v in pipe.unet.state_dict().items()}
    theirs.update({f"text_encoder.text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()
                   if k != "embeddings.position_ids"})
    assert ours.keys() == theirs.keys()
    patched = {table.find(name).name + ".weight" for name in paths}
    for key, want in theirs.items():
        if key in patched:
            assert (ours[key] - want).abs().max() <= 1e-6 * want.abs().max(), key
        else:
            assert torch.equal(ours[key], want), key
