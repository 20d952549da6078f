"""SDXL: U-Net, text encoders, conditioning, loading and pipelines against diffusers / transformers
on identical random weights, offline (tiny configs shaped as diffusers' own SDXL tests build them)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from marble.checkpoints.diffusers_keys import inverse, rename, unet_table
from marble.models.unet import UNET_PRESETS, UNet
from sd_fixtures import diffusers_oracle, randomize_

diffusers = diffusers_oracle()
transformers = pytest.importorskip("transformers")
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()


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


# --- the U-Net ------------------------------------------------------------------------------------

def test_sdxl_unets_have_the_released_sizes_and_key_layout():
    with torch.device("meta"):
        base, refiner = UNet(UNET_PRESETS["sdxl-base"]), UNet(UNET_PRESETS["sdxl-refiner"])
    assert sum(p.numel() for p in base.parameters()) == 2_567_463_684
    keys = base.state_dict().keys()
    # the original checkpoints' names: label_emb, no transformer at level 0, ten blocks at level 2
    assert "label_emb.0.0.weight" in keys and base.label_emb[0][0].weight.shape == (1280, 2816)
    assert not any(k.startswith("input_blocks.1.1.") for k in keys)
    assert "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in keys
    assert "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight" in keys
    assert "middle_block.1.transformer_blocks.9.norm3.bias" in keys
    assert base.input_blocks[7][1].proj_in.weight.shape == (1280, 1280)   # linear projection
    assert base.input_blocks[7][1].transformer_blocks[0].attn2.to_k.weight.shape == (1280, 2048)
    assert refiner.label_emb[0][0].weight.shape == (1536, 2560)
    assert "middle_block.1.transformer_blocks.3.norm1.weight" in refiner.state_dict()


@pytest.mark.parametrize("preset, kwargs", [
    ("sdxl-base", dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                       addition_embed_type="text_time", addition_time_embed_dim=256,
                       transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816,
                       cross_attention_dim=2048)),
    ("sdxl-refiner", dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
                          use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                          transformer_layers_per_block=4, projection_class_embeddings_input_dim=2560,
                          cross_attention_dim=1280)),
], ids=["base", "refiner"])
def test_released_sdxl_unets_map_key_for_key_onto_diffusers(preset, kwargs):
    """The full-size configs (diffusers' unet/config.json of the released base and refiner), on the
    meta device: every marble key renames to a diffusers key of the same shape, and back."""
    config = UNET_PRESETS[preset]
    with torch.device("meta"):
        ours = UNet(config).state_dict()
        theirs = diffusers.UNet2DConditionModel(**kwargs).state_dict()
    table = unet_table(config)
    renamed = {rename(k, table): v.shape for k, v in ours.items()}
    assert renamed == {k: v.shape for k, v in theirs.items()}


@torch.no_grad()
def test_tiny_sdxl_unet_matches_diffusers():
    theirs = randomize_(diffusers.UNet2DConditionModel(**diffusers_sdxl_unet_kwargs()), seed=1)
    config = UNET_PRESETS["sdxl-tiny"]
    ours = unet_from_diffusers(theirs, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 310.5])
    context = torch.randn(2, 77, 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[64.0, 48, 0, 0, 64, 48], [1024, 768, 16, 8, 512, 384]])
    want = theirs(x, t, encoder_hidden_states=context,
                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    # y as diffusers builds it: pooled text, then each size number's sinusoidal embedding of width 8
    from marble.models.layers import timestep_embedding
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 8).reshape(2, -1)], dim=1)
    got = ours(x, t, context, y=y)
    assert want.abs().max() > 0.5
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="vector y"):
        ours(x, t, context)


# --- the text encoders ----------------------------------------------------------------------------

from marble.models.text import TEXT_ENCODER_PRESETS, build_text_encoder  # noqa: E402

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


@torch.no_grad()
@pytest.mark.parametrize("preset", ["sdxl-tiny-text"])
def test_sdxl_text_states_match_transformers(preset):
    """Context = hidden state -2 of each tower, raw (no final norm), joined along the width; pooled =
    the bigG-shaped tower's text_embeds. diffusers' encode_prompt, written out with transformers."""
    config = TEXT_ENCODER_PRESETS[preset]
    towers = hf_towers(config)
    ours = concat_from_hf(towers, config)
    contexts, pooled = [], None
    for encoder, tower in zip(ours.encoders, towers):
        ids = encoder.tokenize(PROMPTS)
        out = tower(ids, output_hidden_states=True)
        contexts.append(out.hidden_states[-2])
        pooled = out[0]
    want = torch.cat(contexts, dim=-1)
    got_context, got_pooled = ours.encode_pooled(PROMPTS)
    assert got_context.shape == (3, 77, 64) and got_pooled.shape == (3, 32)
    assert (got_context - want).abs().max() < 1e-4 * want.abs().max()
    assert (got_pooled - pooled).abs().max() < 1e-4 * pooled.abs().max()
    assert torch.equal(ours.encode(PROMPTS), got_context)


def test_refiner_text_is_bigg_alone_and_full_size_towers_have_transformers_shapes():
    """Full-size towers on the meta device: the same keys and shapes as transformers' models with
    SDXL's text_encoder / text_encoder_2 configs (bigG: 32 layers, 1280 wide, projection 1280)."""
    base, refiner = TEXT_ENCODER_PRESETS["sdxl-base-text"], TEXT_ENCODER_PRESETS["sdxl-refiner-text"]
    assert [c.width for c in base.encoders] == [768, 1280] and base.width == 2048
    assert refiner.encoders == base.encoders[1:] and refiner.width == 1280
    for c in base.encoders:
        cls = transformers.CLIPTextModelWithProjection if c.projection_dim else transformers.CLIPTextModel
        with torch.device("meta"):
            theirs = hf_state(cls(hf_text_config(c, c.projection_dim)))
            ours = build_text_encoder(c).state_dict()
        theirs = {k: v.shape for k, v in theirs.items()}
        assert {k: v.shape for k, v in ours.items()} == theirs
    with torch.device("meta"):
        bigg = build_text_encoder(base.encoders[1])
    assert sum(p.numel() for p in bigg.parameters()) == 694_659_840   # OpenCLIP bigG text tower + projection


# --- conditioning and the pipeline -----------------------------------------------------------------

import numpy as np  # noqa: E402

from marble.checkpoints.checkpoint import from_model  # noqa: E402
from marble.checkpoints.diffusers_keys import vae_table, vae_to_diffusers_tensor  # noqa: E402
from marble.checkpoints.resolve import LoadedModel, random_model  # noqa: E402
from marble.models.conditioning import SizeConditioning, condition_pair  # noqa: E402
from marble.pipeline import Pipeline  # noqa: E402
from marble.request import GenerationRequest, resolve  # noqa: E402
from sd_fixtures import diffusers_vae_kwargs, oracle_tokenizer_folder, tiny_sdxl  # noqa: E402


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


@torch.no_grad()
def test_conditioning_matches_diffusers_encode_prompt_and_time_ids(tmp_path):
    model = random_model(tiny_sdxl, seed=7)
    pipe = diffusers_pipeline_of(model, tmp_path)
    size = SizeConditioning(original=(96, 80), crop=(8, 16), target=(64, 48))
    for negative in ("blurry", ""):
        cond, uncond = condition_pair(model.text_encoder, model.config.vector, PROMPTS[0], negative, size)
        c, u, pc, pu = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=True,
                                          negative_prompt=negative or None)   # None: diffusers' empty negative
        ids = pipe._get_add_time_ids((96, 80), (8, 16), (64, 48), torch.float32, text_encoder_projection_dim=32)
        time = pipe.unet.add_time_proj(ids.flatten()).reshape(1, -1)
        for ours, context, pooled in ((cond, c, pc), (uncond, u, pu)):
            assert (ours["context"] - context).abs().max() < 1e-5
            assert (ours["y"] - torch.cat([pooled, time], dim=1)).abs().max() < 1e-5
        assert (negative == "") == bool((uncond["context"] == 0).all() and (uncond["y"][:, :32] == 0).all())


def euler_start(pipe, seed: int, steps: int, shape: tuple) -> torch.Tensor:
    """marble starts at sqrt(1 + σ_max²)·noise, diffusers' linspace Euler at σ_max·noise: hand it ours."""
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return noise * ((1 + sigma_max ** 2) ** 0.5 / pipe.scheduler.init_noise_sigma)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_txt2img_matches_stable_diffusion_xl_pipeline(tmp_path, negative):
    model = random_model(tiny_sdxl, seed=5)
    pipe = diffusers_pipeline_of(model, tmp_path)
    seed, steps, width, height = 42, 8, 64, 48
    request = GenerationRequest(prompt=PROMPTS[0], negative_prompt=negative, seed=seed, steps=steps,
                                sampler="Euler", cfg=5.0, width=width, height=height)
    ours = Pipeline(LoadedModel(model, "m", "h"))
    ours = np.asarray(ours.generate(resolve(request, ours.defaults)).images[0]).astype(int)
    start = euler_start(pipe, seed, steps, (1, 4, height // 4, width // 4))
    theirs = pipe(PROMPTS[0], negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=5.0,
                  height=height, width=width, latents=start).images[0]
    theirs = np.asarray(theirs).astype(int)
    assert ours.std() > 20
    assert np.abs(ours - theirs).max() <= 1


def test_an_fp16_sdxl_model_keeps_its_vae_in_float32():
    """SDXL's VAE overflows in fp16 (diffusers' force_upcast): loaded at fp16, the U-Net and text
    encoders are fp16 and the VAE stays float32, decoding an fp16 latent as the fp32 model does."""
    from marble.checkpoints.checkpoint import to_model
    model = random_model(tiny_sdxl, seed=5)
    half = to_model(from_model(model), torch.float16)
    assert half.dtype == torch.float16 and half.text_encoder.encoders[1].text_projection.weight.dtype == torch.float16
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}
    latent = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0)).half()
    assert torch.equal(half.vae.decode(latent), model.vae.decode(latent.float()))


# --- loading: diffusers folders and single files ----------------------------------------------------

from marble.checkpoints.checkpoint import to_model  # noqa: E402
from marble.checkpoints.detect import open_checkpoint  # noqa: E402
from marble.checkpoints.diffusers_folder import write_diffusers  # noqa: E402
from marble.checkpoints.sd_single_file import write_single_file  # noqa: E402
from marble.errors import ModelLoadError  # noqa: E402
from marble.tensor_file import read_header  # noqa: E402


@pytest.fixture(scope="module", params=[False, True], ids=["base", "refiner"])
def born_in_diffusers(request, tmp_path_factory):
    """A folder written by diffusers' save_pretrained from its own SDXL pipeline (random weights)."""
    refiner = request.param
    root = tmp_path_factory.mktemp("sdxl-refiner" if refiner else "sdxl")
    model = random_model(lambda: tiny_sdxl(refiner), seed=11)
    pipe = diffusers_pipeline_of(model, root, refiner)
    pipe.save_pretrained(root / "pipe")
    return refiner, root / "pipe", pipe, model


@torch.no_grad()
def test_diffusers_sdxl_folders_load_with_their_configs_and_tensors(born_in_diffusers):
    refiner, folder, pipe, model = born_in_diffusers
    ckpt = open_checkpoint(folder)
    want = tiny_sdxl(refiner)
    c = ckpt.config
    assert (c.unet, c.vae, c.vector, c.prediction) == (want.unet, want.vae, want.vector, want.prediction)
    from marble.models.text import text_config_from_dict
    assert text_config_from_dict(c.text) == text_config_from_dict(want.text)
    theirs = from_model(model).state
    assert ckpt.state.keys() == theirs.keys()
    assert all(torch.equal(ckpt.state[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdxl_round_trips_through_every_layout_bit_exactly(dtype, tmp_path):
    """marble -> diffusers folder -> single file -> marble, both SDXL shapes, tensors untouched."""
    for refiner in (False, True):
        model = random_model(lambda: tiny_sdxl(refiner), seed=2)
        ckpt = from_model(model, dtype=dtype)
        folder = write_diffusers(ckpt, tmp_path / f"d{refiner}")
        back = open_checkpoint(folder)
        single = write_single_file(back, tmp_path / f"s{refiner}.safetensors")
        again = open_checkpoint(single)
        assert again.config == ckpt.config
        assert again.state.keys() == ckpt.state.keys()
        assert all(again.state[k].dtype == dtype and torch.equal(again.state[k], ckpt.state[k]) for k in ckpt.state)
        keys = read_header(single).entries
        if refiner:
            assert "conditioner.embedders.0.model.text_projection" in keys
            assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
        else:
            assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
            assert "conditioner.embedders.1.model.transformer.resblocks.4.attn.in_proj_weight" in keys
            assert "model.diffusion_model.label_emb.0.0.weight" in keys


def test_unsupported_families_are_named(tmp_path):
    from safetensors.torch import save_file
    for keys, family in ((["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "SD3"),
                         (["double_blocks.0.img_attn.qkv.weight"], "Flux")):
        path = tmp_path / f"{family}.safetensors"
        save_file({k: torch.zeros(2) for k in keys}, str(path))
        with pytest.raises(ModelLoadError, match=f"looks like an {family} checkpoint; marble loads SD1.x, SD2.x and SDXL"):
            open_checkpoint(path)
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match="Flux pipeline"):
        open_checkpoint(folder)


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_single_file_matches_diffusers_from_single_file(refiner, tmp_path):
    """marble writes an sgm-layout SDXL file (bigG in OpenCLIP's layout: fused in_proj, transposed
    text_projection); diffusers' from_single_file (its own converter) loads the very tensors marble
    loads from it, bit for bit."""
    from dataclasses import replace

    from marble.checkpoints.diffusers_keys import vae_table
    from marble.checkpoints.resolve import load_model
    from marble.config import config_to_dict

    def config():
        """diffusers' converter tells CLIP-L's tower from bigG's by its width (position_embedding),
        so here the CLIP-L-shaped tower is 40 wide rather than 32 (context 72)."""
        c = tiny_sdxl(refiner)
        if refiner:
            return c
        text = TEXT_ENCODER_PRESETS["sdxl-tiny-text"]
        text = text.replace(encoders=(replace(text.encoders[0], width=40), text.encoders[1]))
        return c.replace(text=config_to_dict(text), unet=replace(c.unet, context_dim=72))

    model = random_model(config, seed=4)
    path = write_single_file(from_model(model), tmp_path / "model.safetensors")
    configs = write_diffusers(from_model(random_model(config, seed=9)), tmp_path / "configs")
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    pipe = cls.from_single_file(str(path), config=str(configs), local_files_only=True)
    ours = load_model(str(path)).model.state_dict()
    parts = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict()}
    towers = [pipe.text_encoder_2] if refiner else [pipe.text_encoder, pipe.text_encoder_2]
    ut, vt = unet_table(model.config.unet), vae_table(model.config.vae)
    n = 0
    for key, tensor in ours.items():
        part, inner = key.split(".", 1)
        if part == "unet":
            theirs = parts["unet"][rename(inner, ut)]
        elif part == "vae":
            theirs, tensor = parts["vae"][rename(inner, vt)], vae_to_diffusers_tensor(inner, tensor)
        else:
            _, i, rest = inner.split(".", 2)
            state = hf_state(towers[int(i)])
            theirs = state[rest]
        assert torch.equal(theirs, tensor), key
        n += 1
    assert n == len(parts["unet"]) + len(parts["vae"]) + sum(len(hf_state(t)) for t in towers)


@pytest.mark.parametrize("preset", ["sdxl-base", "sdxl-refiner"])
def test_released_sdxl_files_are_recognised_and_fully_mapped(preset):
    """The key set of a released sgm file (meta tensors, no metadata), with the extras real files
    carry (position_ids, logit_scale): recognised by its towers and every key mapped."""
    from pathlib import Path

    from marble.checkpoints.checkpoint import Checkpoint, convert_state, expected_state
    from marble.checkpoints.sd_single_file import detect_preset, single_file_state, to_marble_fn
    from marble.models.stable_diffusion import sd_config
    config = sd_config(preset)
    keys = single_file_state(Checkpoint(config, expected_state(config), Path("x"), "", "marble"))
    g = "conditioner.embedders.0.model." if preset == "sdxl-refiner" else "conditioner.embedders.1.model."
    assert keys[g + "text_projection"].shape == (1280, 1280)
    assert keys[g + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    keys[g + "logit_scale"] = torch.empty((), device="meta")
    if preset == "sdxl-base":
        keys["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")

    class MetaSource:
        path = Path("fake.safetensors")

        def shapes(self):
            return {k: (tuple(v.shape), v.dtype) for k, v in keys.items()}

        def read(self, names, dtype):
            return ((n, keys[n]) for n in names)

    assert detect_preset({k: tuple(v.shape) for k, v in keys.items()}, Path("x")) == preset
    state = convert_state(MetaSource(), to_marble_fn(config), expected_state(config), None)
    assert state.keys() == expected_state(config).keys()


# --- images through marble's loader -------------------------------------------------------------------

@pytest.mark.parametrize("born_in_diffusers", [False], indirect=True, ids=["base"])
def test_txt2img_through_the_loader_matches_diffusers_from_a_folder_and_a_single_file(born_in_diffusers, tmp_path):
    """The folder diffusers saved, and a single file marble writes from it, both generate through
    `load_model` the image StableDiffusionXLPipeline makes (within 1/255)."""
    from marble.checkpoints.resolve import load_model
    refiner, folder, pipe, _ = born_in_diffusers
    single = write_single_file(open_checkpoint(folder), tmp_path / "sdxl.safetensors")
    seed, steps, width, height = 7, 6, 48, 64
    start = euler_start(pipe, seed, steps, (1, 4, height // 4, width // 4))
    theirs = np.asarray(pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=6.0, height=height, width=width,
                             latents=start).images[0]).astype(int)
    request = GenerationRequest(prompt=PROMPTS[0], seed=seed, steps=steps, sampler="Euler", cfg=6.0,
                                width=width, height=height)
    for path in (folder, single):
        ours = Pipeline(load_model(str(path)))
        image = np.asarray(ours.generate(resolve(request, ours.defaults)).images[0]).astype(int)
        assert image.std() > 20
        assert np.abs(image - theirs).max() <= 1, path


@pytest.mark.parametrize("born_in_diffusers", [True], indirect=True, ids=["refiner"])
@torch.no_grad()
def test_refiner_conditioning_matches_diffusers_img2img_with_aesthetic_scores(born_in_diffusers):
    """The refiner: bigG alone, y = pooled + (original, crop, aesthetic score 6 / negative 2.5),
    an empty negative encoded (force_zeros_for_empty_prompt off); loaded from diffusers' folder."""
    from marble.checkpoints.resolve import load_model
    refiner, folder, pipe, _ = born_in_diffusers
    model = load_model(str(folder)).model
    assert model.config.vector.micro == "aesthetic" and not model.config.vector.zero_empty_negative
    size = SizeConditioning.of_image(48, 64)
    cond, uncond = condition_pair(model.text_encoder, model.config.vector, PROMPTS[0], "", size)
    c, u, pc, pu = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=True, negative_prompt=None)
    ids, neg_ids = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), 6.0, 2.5, (64, 48), (0, 0), (64, 48),
                                          torch.float32, text_encoder_projection_dim=32)
    for ours, context, pooled, time_ids in ((cond, c, pc, ids), (uncond, u, pu, neg_ids)):
        time = pipe.unet.add_time_proj(time_ids.flatten()).reshape(1, -1)
        assert (ours["context"] - context).abs().max() < 1e-5
        assert (ours["y"] - torch.cat([pooled, time], dim=1)).abs().max() < 1e-5
    assert uncond["context"].abs().max() > 0    # the empty negative is encoded, not zeroed


def test_marble_generate_reads_an_sdxl_single_file_and_inpaints_with_it(tmp_path):
    """From the command line, a tiny SDXL single file gives the image the library gives; an
    inpainting run with it keeps every unmasked pixel of the init image."""
    from PIL import Image
    from typer.testing import CliRunner

    from marble.checkpoints.resolve import load_model
    from marble.cli import app
    model = random_model(tiny_sdxl, seed=3)
    path = write_single_file(from_model(model), tmp_path / "sdxl.safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "a red cat", "--model", str(path), "--seed", "5", "--steps", "4",
                                      "--sampler", "Euler", "--size", "48x32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pipe = Pipeline(load_model(str(path)))
    request = GenerationRequest(prompt="a red cat", seed=5, steps=4, sampler="Euler", width=48, height=32)
    want = pipe.generate(resolve(request, pipe.defaults)).images[0]
    (png,) = out.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(want))
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 8:32] = 255
    request = GenerationRequest(prompt="a red cat", seed=5, steps=4, sampler="Euler", width=48, height=32,
                                init_image=init, mask=Image.fromarray(mask), strength=0.8)
    image = np.asarray(pipe.generate(resolve(request, pipe.defaults)).images[0]).astype(int)
    keep = mask == 0
    assert np.array_equal(image[keep], np.asarray(init)[keep])
    assert np.abs(image[~keep] - np.asarray(init)[~keep]).mean() > 10


# --- full size ---------------------------------------------------------------------------------------

def _fingerprint(t: torch.Tensor) -> tuple:
    import hashlib
    t = t.detach().contiguous()
    return t.dtype, tuple(t.shape), hashlib.sha1(t.view(torch.uint8).numpy()).hexdigest()


@pytest.mark.slow
@torch.inference_mode()
def test_full_size_sdxl_base_single_file_matches_diffusers_from_single_file(tmp_path):
    """A full-size SDXL base (U-Net, CLIP-L, bigG, VAE) with seeded random fp16 weights, written in
    the sgm layout without metadata (so marble recognises it from its keys), loads in marble and in
    diffusers' single-file converters (fed the released configs, written here independently) to the
    very same tensors. Memory stays under 16 GB: fp16, and marble's model is reduced to tensor
    fingerprints before diffusers loads one component at a time (measured: 13.3 GB peak RSS, while
    the file is written; 92 s on 2 cores)."""
    import gc
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from marble.checkpoints.checkpoint import Checkpoint, expected_state
    from marble.checkpoints.resolve import load_model
    from marble.checkpoints.sd_single_file import single_file_state
    from marble.models.stable_diffusion import sd_config
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    config = sd_config("sdxl-base")
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, meta in expected_state(config).items():
        if meta.ndim > 1:
            t = torch.randn(meta.shape, generator=g) / max(1, meta[0].numel()) ** 0.5
        else:
            t = (1.0 if "norm" in key and key.endswith("weight") else 0.0) + 0.1 * torch.randn(meta.shape, generator=g)
        state[key] = t.half()
    path = tmp_path / "sd_xl_base_random.safetensors"
    save_file(single_file_state(Checkpoint(config, state, path, "", "marble")), str(path))
    del state
    gc.collect()

    loaded = load_model(str(path), torch.float16)
    assert loaded.model.config.unet == config.unet and loaded.model.config.vector == config.vector
    ours = {k: _fingerprint(v) for k, v in loaded.model.state_dict().items()}
    assert {p.dtype for p in loaded.model.vae.parameters()} == {torch.float32}   # decode_fp32
    del loaded
    gc.collect()

    folder = tmp_path / "configs"
    unet_config = dict(_class_name="UNet2DConditionModel", sample_size=128, in_channels=4, out_channels=4,
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                       block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                       transformer_layers_per_block=[1, 2, 10], projection_class_embeddings_input_dim=2816,
                       cross_attention_dim=2048, norm_num_groups=32)
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                hidden_act="quick_gelu", projection_dim=768).save_pretrained(folder / "text_encoder")
    transformers.CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                hidden_act="gelu", projection_dim=1280, pad_token_id=0).save_pretrained(
        folder / "text_encoder_2")

    def part(prefixes):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}

    seen = set()
    unet = diffusers.UNet2DConditionModel.from_single_file(part("model.diffusion_model."), config=str(folder),
                                                           subfolder="unet", torch_dtype=torch.float16,
                                                           local_files_only=True)
    theirs = unet.state_dict()
    for key, inner in ((k, k[5:]) for k in ours if k.startswith("unet.")):
        assert _fingerprint(theirs[rename(inner, unet_table(config.unet))]) == ours[key], key
        seen.add(key)
    assert len(theirs) == len([k for k in ours if k.startswith("unet.")])
    del unet, theirs
    gc.collect()

    for i, (cls, sub) in enumerate(((transformers.CLIPTextModel, "text_encoder"),
                                    (transformers.CLIPTextModelWithProjection, "text_encoder_2"))):
        tower = create_diffusers_clip_model_from_ldm(cls, part("conditioner."), subfolder=sub, config=str(folder),
                                                     torch_dtype=torch.float16, local_files_only=True)
        theirs = hf_state(tower)
        prefix = f"text_encoder.encoders.{i}."
        mine = [k for k in ours if k.startswith(prefix)]
        assert len(theirs) == len(mine)
        for key in mine:
            assert _fingerprint(theirs[key[len(prefix):]]) == ours[key], key
            seen.add(key)
        del tower, theirs
        gc.collect()
    assert seen == {k for k in ours if not k.startswith("vae.")}


# --- base → refiner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, switch", [(8, 0.8), (7, 0.5)])
def test_base_to_refiner_hand_off_matches_diffusers_denoising_end_and_start(tmp_path, steps, switch):
    """marble's Pipeline with a refiner against diffusers' documented ensemble: the base pipeline
    with denoising_end, its latents into the refiner's img2img pipeline with denoising_start; the
    refiner's VAE decodes. Within 1/255."""
    from marble.diffusion.handoff import switch_sigma
    base, refiner = random_model(tiny_sdxl, seed=5), random_model(lambda: tiny_sdxl(True), seed=6)
    base_pipe = diffusers_pipeline_of(base, tmp_path / "b")
    refiner_pipe = diffusers_pipeline_of(refiner, tmp_path / "r", refiner=True)
    seed, width, height = 42, 48, 64
    start = euler_start(base_pipe, seed, steps, (1, 4, height // 4, width // 4))
    latents = base_pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=5.0, height=height, width=width,
                        latents=start, denoising_end=switch, output_type="latent").images
    theirs = refiner_pipe(PROMPTS[0], image=latents, num_inference_steps=steps, denoising_start=switch,
                          guidance_scale=5.0).images[0]
    theirs = np.asarray(theirs).astype(int)
    ours = Pipeline(LoadedModel(base, "base", "h"), refiner=LoadedModel(refiner, "refiner", "h2"),
                    refiner_switch=switch)
    request = GenerationRequest(prompt=PROMPTS[0], seed=seed, steps=steps, sampler="Euler", cfg=5.0,
                                width=width, height=height)
    image = np.asarray(ours.generate(resolve(request, ours.defaults)).images[0]).astype(int)
    alone = np.asarray(Pipeline(LoadedModel(base, "base", "h")).generate(resolve(request, ours.defaults)).images[0])
    assert image.std() > 20 and np.abs(image - alone.astype(int)).max() > 10   # the refiner did change the image
    assert np.abs(image - theirs).max() <= 1
    # the split: diffusers' base ran the steps with t >= round(1000·(1 − switch))
    from marble.diffusion.schedule import spacing
    sigmas = spacing("normal", base.schedule, steps)
    sigma = switch_sigma(sigmas, base.schedule.sigma_to_t, switch)
    base_pipe.scheduler.set_timesteps(steps)
    assert int((sigmas[:-1] > sigma).sum()) == int((base_pipe.scheduler.timesteps >= round(1000 * (1 - switch))).sum())


def test_a_refiner_must_share_the_base_schedule_and_switch_inside_it():
    from marble.pipeline import check_refiner
    base = random_model(tiny_sdxl, seed=5)
    with pytest.raises(ModelLoadError, match="refiner switch must be in"):
        check_refiner(base, random_model(lambda: tiny_sdxl(True), seed=6), 1.0)
    schedule = {"name": "scaled_linear", "n": 1000, "beta_start": 0.00085, "beta_end": 0.02}
    other = random_model(lambda: tiny_sdxl(True).replace(schedule=schedule), seed=6)
    with pytest.raises(ModelLoadError, match="does not share the latent space and noise schedule"):
        check_refiner(base, other, 0.8)


def test_marble_generate_with_a_refiner_gives_the_librarys_image_and_refuses_a_bad_switch(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from marble.cli import app
    from marble.pipeline import load_pipeline
    base = write_single_file(from_model(random_model(tiny_sdxl, seed=3)), tmp_path / "base.safetensors")
    refiner = write_single_file(from_model(random_model(lambda: tiny_sdxl(True), seed=4)), tmp_path / "ref.safetensors")
    args = ["generate", "a red cat", "--model", str(base), "--refiner", str(refiner), "--seed", "5", "--steps", "5",
            "--sampler", "Euler", "--size", "32x32"]
    result = CliRunner().invoke(app, [*args, "--refiner-switch", "0.6", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pipe = load_pipeline(str(base), refiner=str(refiner), refiner_switch=0.6)
    request = GenerationRequest(prompt="a red cat", seed=5, steps=5, sampler="Euler", width=32, height=32)
    want = pipe.generate(resolve(request, pipe.defaults)).images[0]
    (png,) = (tmp_path / "out").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(want))
    from marble.png import read_record, read_text_chunks
    record = read_record(png)
    assert (record.refiner, record.refiner_switch) == ("ref", 0.6) and record.model_name == "base"
    import hashlib
    assert record.refiner_hash == hashlib.sha256(refiner.read_bytes()).hexdigest()[:10]
    assert f"Refiner: ref [{record.refiner_hash}], Refiner switch at: 0.6" in read_text_chunks(png)["parameters"]
    result = CliRunner().invoke(app, [*args, "--refiner-switch", "1.5", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "refiner switch must be in (0, 1)" in result.output
    assert not (tmp_path / "bad").exists()


@torch.no_grad()
def test_sdxl_text_takes_token_rows_like_the_single_tower_encoders():
    """encoder(rows) from the first tower's rows gives encode()'s context: each tower re-pads the rows
    with its own pad token (CLIP-L: end token, bigG: "!"), as windowed prompts need."""
    config = TEXT_ENCODER_PRESETS["sdxl-tiny-text"]
    ours = concat_from_hf(hf_towers(config), config)
    rows = ours.tokenize(PROMPTS)
    assert torch.equal(ours(rows), ours.encode(PROMPTS))
    assert torch.equal(ours._repad(rows, 0), ours.encoders[1].tokenize(PROMPTS))
    ids = ours.text_ids(PROMPTS[0])
    assert ours.chunk_row(ids) == rows[0].tolist() and ours.comma_id == ours.text_ids(",")[0]


@torch.no_grad()
def test_weighted_sdxl_prompts_weight_the_context_and_pool_the_first_window_unweighted():
    """A1111 prompt syntax on SDXL: weights act on the joined context; y pools the first window of
    the text with its weights taken off (A1111's SDXL pooling), so it equals the plain prompt's y."""
    model = random_model(tiny_sdxl, seed=5)
    pipe = Pipeline(LoadedModel(model, "m", "h"))
    weighted = resolve(GenerationRequest(prompt="a (red:1.3) cat", seed=1, steps=2, width=32, height=32), pipe.defaults)
    plain = resolve(GenerationRequest(prompt="a red cat", seed=1, steps=2, width=32, height=32), pipe.defaults)
    cw, cp = pipe.conditioning(weighted), pipe.conditioning(plain)
    yw = pipe.vector_conditioning(model, cw, weighted, 32, 32)
    yp = pipe.vector_conditioning(model, cp, plain, 32, 32)
    assert torch.equal(yw[0]["y"], yp[0]["y"]) and torch.equal(yw[1]["y"], yp[1]["y"]) and yw[2] is True
    cond, _ = condition_pair(model.text_encoder, model.config.vector, "a red cat", "", SizeConditioning.of_image(32, 32))
    assert torch.allclose(yp[0]["y"], cond["y"], atol=1e-6, rtol=0)
    assert torch.allclose(cp.at(0)[0], cond["context"], atol=1e-6, rtol=0)
    assert (cw.at(0)[0] - cp.at(0)[0]).abs().max() > 1e-3   # the weight acts on the context


def test_with_a_hires_fix_the_refiner_takes_over_the_end_of_the_second_pass():
    """With a hires fix the hand-off is built once, for the second pass (its sigmas and size), and
    the refiner changes the image."""
    from marble.request import HiresFix
    base, refiner = random_model(tiny_sdxl, seed=5), random_model(lambda: tiny_sdxl(True), seed=6)
    alone = Pipeline(LoadedModel(base, "base", "h"))
    both = Pipeline(LoadedModel(base, "base", "h"), refiner=LoadedModel(refiner, "ref", "h2"), refiner_switch=0.5)
    calls = []
    original = both.hand_off

    def spy(denoiser, req, sigmas, width, height, hires_steps=None):
        calls.append((len(sigmas), width, height, hires_steps))
        return original(denoiser, req, sigmas, width, height, hires_steps)

    both.hand_off = spy
    request = GenerationRequest(prompt="a red cat", seed=3, steps=4, sampler="Euler", width=32, height=32,
                                hires=HiresFix(scale=2, steps=4, denoise=0.5, upscaler="Latent (bicubic)"))
    resolved = resolve(request, alone.defaults)
    a = np.asarray(alone.generate(resolved).images[0]).astype(int)
    b = np.asarray(both.generate(resolved).images[0]).astype(int)
    assert calls == [(3, 64, 64, 4)]           # once, on the second pass (2 of its 4 steps re-run, at 64²)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a - b).max() > 10
