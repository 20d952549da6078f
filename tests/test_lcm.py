"""Latent consistency distillation: the loss against closed forms and the exact Gaussian-mixture
oracle, and `marble train lcm` on a tiny model (exact resume, a file that loads and samples)."""
import json
import math
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from gmm import standard_mixture
from marble.diffusion.guidance import cfg_denoiser
from marble.diffusion.schedule import make_schedule
from marble.train.checkpoint import load_checkpoint
from marble.train.consistency import boundary, consistency, huber, lcd_loss, skipping_grid
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


def test_training_resumes_after_sigkill_at_the_same_weights(tmp_path, teacher):
    finish(marble("train", "lcm", write_config(tmp_path, "straight", teacher)))
    cfg = write_config(tmp_path, "killed", teacher)
    p = marble("train", "lcm", cfg)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if ckpt.exists() and 2 <= load_checkpoint(ckpt)["step"] < 6:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
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
