"""SDXL: U-Net, text encoders, conditioning, pipelines and the base → refiner hand-off against
diffusers / transformers on identical random weights, offline (loading: test_sdxl_files.py)."""
import numpy as np
import pytest
import torch

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.diffusers_keys import rename, unet_table
from marble.checkpoints.resolve import LoadedModel, random_model
from marble.checkpoints.sd_single_file import write_single_file
from marble.errors import ModelLoadError
from marble.models.conditioning import SizeConditioning, condition_pair
from marble.models.text import TEXT_ENCODER_PRESETS, build_text_encoder
from marble.models.unet import UNET_PRESETS, UNet
from marble.pipeline import Pipeline
from marble.request import GenerationRequest, resolve
from sd_fixtures import randomize_, tiny_sdxl
from sdxl_oracle import (PROMPTS, concat_from_hf, diffusers, diffusers_pipeline_of, diffusers_sdxl_unet_kwargs, euler_start,
                         hf_state, hf_text_config, hf_towers, transformers, unet_from_diffusers)


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
