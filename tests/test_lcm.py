"""Latent consistency distillation: the loss against closed forms and the exact Gaussian-mixture
oracle, and `marble train lcm` on a tiny model (exact resume, a file that loads and samples)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gmm import standard_mixture
from marble.diffusion.guidance import cfg_denoiser
from marble.diffusion.samplers import sample_euler, sample_heun
from marble.diffusion.schedule import make_schedule, spacing_karras, spacing_lcm, timesteps_lcm
from marble.train.checkpoint import load_checkpoint
from marble.train.consistency import (boundary, consistency, edge_sigmas, huber, lcd_loss, phase_edges, phased,
                                      skipping_grid)
from test_train import finish, make_folder, marble, same_tensors

SIGMAS = make_schedule("scaled_linear").sigmas.double()


def test_skipping_grid_and_boundary_conditions():
    grid = skipping_grid(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    with pytest.raises(ValueError):
        skipping_grid(1000, 30)
    c_skip, c_out = boundary(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0                      # f(x, 0) = x exactly
    # LCM's c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/sqrt((10t)² + σ_d²) with σ_d = 0.5
    assert math.isclose(float(c_skip[1]), 0.25 / (190 ** 2 + 0.25), rel_tol=1e-6)
    assert math.isclose(float(c_out[1]), 190 / math.sqrt(190 ** 2 + 0.25), rel_tol=1e-6)
    assert float(c_skip[2]) < 1e-7


@pytest.mark.parametrize("t, s", [(19, 0), (499, 479), (999, 979)])
def test_lcd_loss_for_a_point_mass_is_the_closed_form(t, s):
    """Data at two points a_c (cond) and a_u (uncond): the exact denoisers are constants. With the
    student at a_c and the target at a_u, the teacher's guided DDIM step and the boundary give the
    loss in closed form. At s = 0 the target is the teacher's x_s itself (c_skip(0) = 1)."""
    gen = torch.Generator().manual_seed(0)
    a_c, a_u = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64).unbind(0)[:2]
    x0 = a_c.expand(3, 4, 2, 2)
    eps = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    w = 4.0
    def exact(x, sigma, c):   # the point masses' denoiser: a_c given the caption, a_u without
        return torch.where(c[:, None, None, None] > 0, a_c, a_u).expand_as(x)
    teacher = cfg_denoiser(exact, {"c": torch.ones(3)}, {"c": torch.zeros(3)}, w)
    student = lambda x, sigma: a_c.expand_as(x)  # noqa: E731
    target = lambda x, sigma: a_u.expand_as(x)  # noqa: E731
    tt, ss = torch.full((3,), t), torch.full((3,), s)
    loss = lcd_loss(student, target, teacher, x0, eps, tt, ss, SIGMAS, huber_c=0.001)

    sigma_t, sigma_s = float(SIGMAS[t]), float(SIGMAS[s])
    x_t = a_c + sigma_t * eps
    guided = a_u + w * (a_c - a_u)                                 # D_u + w (D_c − D_u)
    x_s = guided + (x_t - guided) * sigma_s / sigma_t              # DDIM, η = 0
    (cs_t, co_t), (cs_s, co_s) = boundary(torch.tensor(t)), boundary(torch.tensor(s))
    f = float(cs_t) * x_t + float(co_t) * a_c
    y = float(cs_s) * x_s + float(co_s) * a_u
    expected = (torch.sqrt((f - y) ** 2 + 0.001 ** 2) - 0.001).mean()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
    if s == 0:   # the target is x_s: the loss is the distance of a_c from the teacher's step
        assert math.isclose(float(loss), float((torch.sqrt((a_c - x_s) ** 2 + 1e-6) - 1e-3).mean()), rel_tol=1e-3)


def test_the_exact_consistency_function_minimises_the_loss_on_the_mixture_oracle():
    """With the exact teacher (the mixture's posterior mean, no guidance) the true consistency
    function leaves only the DDIM step's local error, O(Δσ²): halving the skipping step quarters
    its loss. The posterior mean, which is not constant along ODE trajectories, is off by O(Δσ):
    halving the step only halves its loss, and at k = 20 it is already >10x worse. Same draws."""
    gmm = standard_mixture()
    gen = torch.Generator().manual_seed(1)
    n, t = 512, 219                    # σ ≈ 0.37
    x0, _ = gmm.sample(n, gen)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    f_true = gmm.consistency_function(steps=200)
    tt = torch.full((n,), t)

    def losses(k):
        ss = torch.full((n,), t - k)
        return (float(lcd_loss(f_true, f_true, gmm.denoise, x0, eps, tt, ss, SIGMAS, huber_c=0.0)),
                float(lcd_loss(gmm.denoise, gmm.denoise, gmm.denoise, x0, eps, tt, ss, SIGMAS, huber_c=0.0)))
    (exact20, post20), (exact10, post10) = losses(20), losses(10)
    print(f"L1 LCD loss, k = 20 / 10: consistency function {exact20:.2e} / {exact10:.2e}, "
          f"posterior mean {post20:.2e} / {post10:.2e}")
    assert exact20 < post20 / 10
    assert 3.0 < exact20 / exact10 < 5.0       # second order in the step
    assert 1.6 < post20 / post10 < 2.5         # first order


@pytest.mark.parametrize("phases", [1, 2, 4, 8])
def test_phase_edges_are_where_the_lcm_spacing_steps(phases):
    """A sampler on the LCM spacing at `phases` steps starts each step on an edge and ends it on the
    edge below: the σ the trainer takes each step's timestep to is the spacing's next σ, exactly."""
    edges = phase_edges(1000, 50, phases)
    steps_t = torch.from_numpy(timesteps_lcm(1000, phases).copy())
    assert edges.tolist() == sorted(steps_t.tolist())[:-1] and steps_t[0] == 999
    # the sampler's σ are float32: equal there
    assert torch.equal(edge_sigmas(SIGMAS, edges)[steps_t].float(), spacing_lcm(make_schedule("scaled_linear"), phases)[1:])
    if phases == 4:
        assert edges.tolist() == [259, 499, 759]
        t = torch.tensor([19, 259, 279, 759, 779, 999])   # an edge belongs to the phase above it
        assert edge_sigmas(SIGMAS, edges)[t].tolist() == [0.0, 0.0, float(SIGMAS[259]), float(SIGMAS[499]),
                                                         float(SIGMAS[759]), float(SIGMAS[759])]
    with pytest.raises(ValueError):
        phase_edges(1000, 50, 0)


def test_one_phase_is_lcd_bit_for_bit_and_an_edge_is_its_own_target():
    gen = torch.Generator().manual_seed(3)
    x, d0 = torch.randn(2, 4, 3, 3, 3, generator=gen).unbind(0)
    denoiser = lambda x, sigma: d0  # noqa: E731
    sigma, t = torch.tensor([0.4, 3.0, 9.0, 14.0]), torch.tensor([0, 199, 599, 999])
    assert torch.equal(phased(denoiser, x, sigma, t, torch.zeros(4)), consistency(denoiser, x, sigma, t))
    assert torch.allclose(phased(denoiser, x, sigma, t, sigma), x, rtol=0, atol=1e-6)   # f(x, edge) = x


def _exact_phase_maps(gmm, edges, steps=200):
    """The mixture's probability-flow ODE from σ to the phase edge below (Heun), written as the
    denoiser D with DDIM(x, D, σ → σ_edge) = the ODE's point there: what a PCM student learns."""
    schedule = make_schedule("scaled_linear")

    def ode(x, level, sigma_edge):
        if sigma_edge == 0:
            return gmm.consistency_function(steps)(x, torch.tensor([level]))
        return sample_heun(gmm.denoise, x, spacing_karras(sigma_edge, level, steps)[:-1].double())

    def denoiser(x, sigma):
        level = float(sigma.reshape(-1)[0])
        t = torch.full((len(x),), int((SIGMAS - level).abs().argmin()))
        sigma_edge = float(edge_sigmas(schedule.sigmas, edges)[t[0]])
        r = sigma_edge / level
        return (ode(x, level, sigma_edge) - r * x) / (1 - r)
    return denoiser


def test_euler_on_the_lcm_spacing_walks_the_exact_phase_maps_to_the_ode_endpoint():
    """With the exact phase maps as its network, 4 Euler steps on the LCM spacing land on the
    mixture's probability-flow ODE endpoint from σ_max (integration error only). A sampler stepping
    anywhere but the trainer's edges (e.g. the normal spacing) misses it by far."""
    gmm = standard_mixture()
    gen = torch.Generator().manual_seed(4)
    schedule = make_schedule("scaled_linear")
    sigmas = spacing_lcm(schedule, 4).double()
    x = torch.randn(256, 2, generator=gen, dtype=torch.float64) * sigmas[0]
    d = _exact_phase_maps(gmm, phase_edges(1000, 50, 4), steps=800)   # Heun's error: 1e-4 at 800 steps, 1.7e-3 at 200
    out = sample_euler(d, x, sigmas)
    endpoint = gmm.consistency_function(800)(x, torch.full((256,), float(sigmas[0]), dtype=torch.float64))
    err = float((out - endpoint).abs().max())
    off = float((sample_euler(d, x, torch.tensor([float(sigmas[0]), 5.0, 2.0, 0.5, 0.0], dtype=torch.float64))
                 - endpoint).abs().max())
    print(f"max |Euler on the phase maps − ODE endpoint|: lcm spacing {err:.2e}, other levels {off:.2e}")
    assert err < 5e-4 and off > 100 * err


def test_the_exact_phase_map_minimises_the_phased_loss_on_the_mixture_oracle():
    """As for LCD: inside a phase the exact map leaves the DDIM step's O(Δσ²) error, while the
    posterior mean, not constant along trajectories, is off by O(Δσ). t = 379 lies in (259, 499]."""
    gmm = standard_mixture()
    gen = torch.Generator().manual_seed(5)
    n, t = 512, 379
    edges = phase_edges(1000, 50, 4)
    x0, _ = gmm.sample(n, gen)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    tt = torch.full((n,), t)
    sigma_edge = edge_sigmas(SIGMAS, edges)[tt]
    assert float(sigma_edge[0]) == float(SIGMAS[259])
    f_true = _exact_phase_maps(gmm, edges)

    def losses(k):
        ss = torch.full((n,), t - k)
        return (float(lcd_loss(f_true, f_true, gmm.denoise, x0, eps, tt, ss, SIGMAS, 0.0, sigma_edge)),
                float(lcd_loss(gmm.denoise, gmm.denoise, gmm.denoise, x0, eps, tt, ss, SIGMAS, 0.0, sigma_edge)))
    (exact20, post20), (exact10, post10) = losses(20), losses(10)
    print(f"L1 phased loss, k = 20 / 10: phase map {exact20:.2e} / {exact10:.2e}, posterior mean {post20:.2e} / {post10:.2e}")
    assert exact10 < post10 / 10               # measured: 9x at k = 20, 20x at k = 10
    assert 3.0 < exact20 / exact10 < 5.0
    assert 1.6 < post20 / post10 < 2.5


def test_consistency_and_huber_are_the_formulas():
    x = torch.full((2, 1), 3.0)
    d = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    out = consistency(d, x, torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    assert out[0].item() == 3.0                                      # c_skip(0) = 1
    assert math.isclose(out[1].item(), 3.0 * 0.25 / (100 + 0.25), rel_tol=1e-6)
    a, b = torch.tensor([[0.0, 3.0]]), torch.tensor([[4.0, 3.0]])
    assert math.isclose(huber(a, b, 3.0).item(), ((5.0 - 3.0) + 0.0) / 2)
    assert math.isclose(huber(a, b, 0.0).item(), 2.0)


# --- marble train lcm on a tiny model ------------------------------------------------------------

CONFIG = """
kind = "lcm"
run_dir = "{run_dir}"
steps = {steps}
batch = 4
seed = 2
checkpoint_every = 2
log_every = 1
threads = 1
ema_decay = 0.95
sample_every = {sample_every}

[model]
init = "{init}"
guidance = 3.0
solver_steps = 50

[data]
folder = "{folder}"
size = 16
caption_dropout = 0.25

[optim]
lr = {lr}
warmup = 2
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random tiny model saved as a marble file: the teacher."""
    from marble.checkpoints.checkpoint import from_model
    from marble.checkpoints.marble_format import write_marble
    from marble.checkpoints.resolve import random_model
    root = tmp_path_factory.mktemp("lcm")
    path = write_marble(from_model(random_model()), root / "teacher.safetensors")
    return path, make_folder(root / "data")


def write_config(tmp, name, teacher, steps=6, lr=1e-3, sample_every=0):
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(run_dir=tmp / name, steps=steps, init=teacher[0], folder=teacher[1],
                                  lr=lr, sample_every=sample_every))
    return path


def test_training_resumes_after_sigkill_at_the_same_weights(tmp_path, teacher, sigkill_after_checkpoint):
    finish(marble("train", "lcm", write_config(tmp_path, "straight", teacher)))
    cfg = write_config(tmp_path, "killed", teacher)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    sigkill_after_checkpoint(("train", "lcm", cfg), ckpt, 2)
    assert load_checkpoint(ckpt)["step"] < 6, "the run finished before it could be killed"
    finish(marble("train", "lcm", cfg, "--resume"))
    a, b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt"), load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 6
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])
    assert same_tensors(load_file(tmp_path / "straight" / "model.safetensors"),
                        load_file(tmp_path / "killed" / "model.safetensors"))
    log = [json.loads(line) for line in (tmp_path / "killed" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in log)
    # the student moved away from the teacher
    student, init = load_file(tmp_path / "straight" / "model.safetensors"), load_file(teacher[0])
    assert not torch.equal(student["unet.out.2.weight"], init["unet.out.2.weight"].half())


def test_the_student_file_loads_samples_and_carries_its_settings(tmp_path, teacher):
    from marble.checkpoints.resolve import load_model
    from marble.pipeline import Pipeline
    finish(marble("train", "lcm", write_config(tmp_path, "zero", teacher, steps=2, lr=0.0, sample_every=2)))
    out = tmp_path / "zero" / "model.safetensors"
    student, init = load_file(out), load_file(teacher[0])
    # learning rate 0: the student is the teacher (stored fp16), U-Net, VAE and text encoder alike
    assert student.keys() == init.keys()
    assert all(torch.equal(student[k], init[k].half()) for k in init)
    assert (tmp_path / "zero" / "snapshots" / "step-000002.safetensors").is_file()
    assert (tmp_path / "zero" / "samples" / "final.png").is_file()
    loaded = load_model(str(out))
    c = loaded.model.config
    assert (c.name, c.default_sampler, c.default_steps, c.default_cfg) == ("tiny-random-lcm", "LCM", 4, 1.0)
    card = c.few_step
    assert (card.sampler, card.spacing, card.steps, card.cfg, card.default_steps) == ("LCM", "lcm", (1, 4), (1.0, 1.0), 4)
    pipe = Pipeline(loaded)
    a, b = pipe.generate_image("a red square", seed=5), pipe.generate_image("a red square", seed=5)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_a_phased_student_carries_its_card_and_one_phase_is_the_plain_run(tmp_path, teacher):
    from marble.checkpoints.resolve import load_model
    cfg = write_config(tmp_path, "pcm", teacher, steps=2, lr=0.0)
    cfg.write_text(cfg.read_text().replace("solver_steps = 50", "solver_steps = 50\nphases = 4"))
    finish(marble("train", "lcm", cfg))
    c = load_model(str(tmp_path / "pcm" / "model.safetensors")).model.config
    assert (c.default_sampler, c.default_steps, c.default_cfg) == ("Euler", 4, 1.0)
    assert (c.few_step.sampler, c.few_step.spacing, c.few_step.steps) == ("Euler", "lcm", (2, 8))
    runs = {}
    for name, extra in [("plain", ""), ("one", "\nphases = 1"), ("four", "\nphases = 4")]:
        cfg = write_config(tmp_path, name, teacher, steps=2)
        cfg.write_text(cfg.read_text().replace("solver_steps = 50", "solver_steps = 50" + extra))
        finish(marble("train", "lcm", cfg))
        runs[name] = ([json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()],
                      load_checkpoint(tmp_path / name / "checkpoint.pt")["model"])
    assert runs["one"][0] == runs["plain"][0] and same_tensors(runs["one"][1], runs["plain"][1])
    assert runs["four"][0][0] != runs["plain"][0][0]      # same draws, another target


def test_bad_model_tables_are_one_line(tmp_path, teacher):
    cfg = write_config(tmp_path, "bad", teacher)
    cfg.write_text(cfg.read_text().replace("solver_steps = 50", "solver_steps = 30\nwhatever = 1"))
    p = marble("train", "lcm", cfg)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "whatever" in err and "Traceback" not in err
    cfg.write_text(cfg.read_text().replace("whatever = 1", ""))
    p = marble("train", "lcm", cfg, "--run-dir", tmp_path / "bad2")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "solver_steps" in err and "Traceback" not in err
    for extra, word in [("phases = 0", "phases"), ("phases = 4", "solver_steps = 50")]:
        cfg.write_text(cfg.read_text().replace("solver_steps = 30", f"solver_steps = 25\n{extra}"))
        p = marble("train", "lcm", cfg, "--run-dir", tmp_path / "bad3")
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and word in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        cfg.write_text(cfg.read_text().replace(f"solver_steps = 25\n{extra}", "solver_steps = 30"))


def test_staged_lr_is_lr_factor_without_a_heal_and_restarts_after_one():
    from marble.train.config import OptimConfig, TrainConfig
    from marble.train.lcm import staged_lr
    from marble.train.loop import lr_factor
    cfg = TrainConfig(kind="lcm", run_dir="x", steps=30, optim=OptimConfig(warmup=4, min_lr_ratio=0.1))
    assert [staged_lr(s, cfg, 0, 5.0) for s in range(30)] == [lr_factor(s, cfg) for s in range(30)]
    staged = [staged_lr(s, cfg, 10, 5.0) for s in range(30)]
    cosine = lambda progress: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # noqa: E731
    # the heal: warm-up over 4 steps to 5x, cosine over its 10 steps; then the same over the other 20
    assert staged[:4] == [5.0 * (s + 1) / 4 for s in range(4)] and staged[9] == pytest.approx(5.0 * cosine(5 / 6))
    assert staged[10:14] == [(s + 1) / 4 for s in range(4)] and staged[29] == pytest.approx(cosine(15 / 16))


def _student_config(tmp_path, name, teacher, extra, steps=3, lr=0.0):
    """A tiny run's config with `extra` lines in its model table."""
    cfg = write_config(tmp_path, name, teacher, steps=steps, lr=lr)
    cfg.write_text(cfg.read_text().replace("solver_steps = 50", "solver_steps = 50\n" + extra))
    return cfg


def test_a_cut_student_starts_as_the_teachers_kept_modules_and_loads(tmp_path, teacher):
    from marble.checkpoints.resolve import load_model
    from marble.pipeline import Pipeline
    from marble.train.block_removal import pruned_model
    finish(marble("train", "lcm", _student_config(
        tmp_path, "cut", teacher, "student = {decoder_blocks = 1, middle_block = false}\nheal_steps = 1")))
    out = load_file(tmp_path / "cut" / "model.safetensors")
    expected = pruned_model(load_model(str(teacher[0])).model, {"decoder_blocks": 1, "middle_block": False})
    want = {f"unet.{k}": v for k, v in expected.unet.state_dict().items()}
    assert {k for k in out if k.startswith("unet.")} == want.keys()     # lr 0: the kept modules, unchanged
    assert all(torch.equal(out[k], v.half()) for k, v in want.items())
    loaded = load_model(str(tmp_path / "cut" / "model.safetensors"))
    assert loaded.model.config.unet.pruned and not loaded.model.config.unet.middle_block
    pipe = Pipeline(loaded)
    a, b = pipe.generate_image("a red square", seed=5), pipe.generate_image("a red square", seed=5)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_the_heal_regresses_onto_the_teachers_own_prediction(tmp_path, teacher):
    losses = {}
    for name, student in [("whole", "{decoder_blocks = 2}"), ("cut", "{decoder_blocks = 1}")]:
        finish(marble("train", "lcm", _student_config(tmp_path, name, teacher,
                                                      f"student = {student}\nheal_steps = 2")))
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
    # lr 0: a student that removed nothing is the teacher, so its heal loss is exactly 0; the
    # consistency step after it is not
    assert losses["whole"][:2] == [0.0, 0.0] and losses["whole"][2] > 0
    assert all(v > 0 for v in losses["cut"])


@pytest.mark.parametrize("extra, word", [
    ("student = {decoders = 1}", "decoders"),
    ("student = {decoder_blocks = 5}", "decoder_blocks"),
    ("heal_steps = 2", "set model.student too"),
    ("student = {middle_block = false}\nheal_steps = 6", "fewer than steps"),
    ("student = {middle_block = false}\nheal_steps = 1\nheal_lr = 0", "heal_lr"),
])
def test_bad_student_tables_are_one_line(tmp_path, teacher, extra, word):
    p = marble("train", "lcm", _student_config(tmp_path, "bad", teacher, extra, steps=6, lr=1e-3))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and word in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
