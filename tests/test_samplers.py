"""Samplers against the exact oracle: a Gaussian mixture whose denoiser E[x0 | x, σ] is closed-form,
so every deviation from the mixture is the sampler's own (discretisation) error."""
import math

import pytest
import torch

from diffusion_reference import noise_from_seed, sample
from gmm import standard_mixture
from marble.diffusion.denoiser import discrete_denoiser
from marble.diffusion.few_step import PRESETS
from marble.diffusion.noise import NoiseSource
from marble.diffusion.samplers import (
    SAMPLERS, UnknownSampler, get_sampler, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler,
    sample_euler_ancestral, sample_heun, sample_lcm,
)
from marble.diffusion.schedule import (
    alphas_cumprod_from_betas, betas_linear, make_schedule, spacing, spacing_karras, spacing_leading, timesteps_leading,
)

F64 = torch.float64
GMM = standard_mixture()
SD = make_schedule("scaled_linear")  # Stable Diffusion's trained levels, σ in [0.0292, 14.6146]


# --- the mixture test -----------------------------------------------------------------------------
#
# Setup: SD1.5's DiscreteSchedule with each sampler's registered spacing and default step count, as
# a user runs it. The start is the exact noisy marginal p_σmax: x = x0 + σmax·eps, x0 drawn from the
# mixture (σmax = 14.6 is not ≫ the data scale ~3.5, so pure σmax·eps would add a prior-mismatch
# bias that is not the sampler's). Samples are assigned to their most likely component; with
# these means and covariances that mislabels 5e-6 of exact draws (2·10^6 draws), negligible.
#
# Tolerance per statistic: 4 standard errors of the estimator at the sample count used
#   weight: sqrt(w(1 − w)/n);  mean_i: sqrt(Σ_ii/n_k);  cov_ij: sqrt((Σ_ii·Σ_jj + Σ_ij²)/n_k)
# plus the sampler's discretisation bias at that step count. The bias was measured with 10^6
# samples against the exact mixture (max over components and entries) and is allowed at 1.5×:
#                      weights  means   covs        measured: weights  means   covs
ALLOWANCE = {
    "DDPM":            (0.017, 0.11, 0.15),   #            0.011    0.072   0.099
    "Euler a":         (0.017, 0.11, 0.15),   # = DDPM, the same posterior step (test below)
    "Euler":           (0.006, 0.12, 0.06),   #            0.004    0.078   0.040
    "DDIM":            (0.006, 0.12, 0.06),   # = Euler for eta = 0 (test below)
    "Heun":            (0.003, 0.012, 0.008),  #           0.0019   0.0081  0.0054
    "DPM++ 2M":        (0.0015, 0.009, 0.15),  #           0.0008   0.0056  0.102
    "DPM++ 2M Karras": (0.0015, 0.02, 0.035),  #           0.0009   0.0134  0.0236
    "LCM":             (0.0, 0.003, 0.003),    # exact up to the consistency function's ODE error
}
# Why so different: first-order samplers carry an O(Δt) bias, and "normal" spacing on SD has its
# last gap from t = 52.6 (σ = 0.23) to t = 0 (σ = 0.029), where σ² is not small against the
# component covariances (0.2–0.5). An ancestral step uses the posterior mean of x0 in place of a
# draw and so drops (1 − σ_next²/σ²)²·Var(x0 | x_σ) ≈ σ² of variance, so DDPM/Euler a
# under-disperse (covariances −0.10). DPM++ 2M
# extrapolates x0 over that last gap with r = h_prev/h = 0.21, i.e. 2.4× the last change, and
# over-disperses (+0.10); Karras spacing avoids the gap.
N_BATCH, N_PER_ITEM = 4, 25_000    # 10^5 samples, as 4 batch items of 25 000 points each
Z = 4.0


def exact_start(sigma_max: float, seed: int, batch=N_BATCH, per_item=N_PER_ITEM) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0, _ = GMM.sample(batch * per_item, g)
    return (x0 + sigma_max * torch.randn(x0.shape, generator=g, dtype=F64)).reshape(batch, per_item, 2)


def assert_reproduces_mixture(samples: torch.Tensor, allowance: tuple[float, float, float]):
    x = samples.reshape(-1, 2)
    n = len(x)
    labels = GMM.assign(x)
    a_w, a_mean, a_cov = allowance
    for k in range(len(GMM.weights)):
        w, mu, cov = GMM.weights[k].item(), GMM.means[k], GMM.covs[k]
        xs = x[labels == k]
        nk = len(xs)
        assert abs(nk / n - w) <= Z * math.sqrt(w * (1 - w) / n) + a_w, f"weight {k}: {nk / n:.4f} vs {w}"
        se_mean = (cov.diagonal() / nk).sqrt()
        assert ((xs.mean(0) - mu).abs() <= Z * se_mean + a_mean).all(), f"mean {k}: {xs.mean(0)} vs {mu}"
        se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov ** 2) / nk).sqrt()
        assert ((torch.cov(xs.T) - cov).abs() <= Z * se_cov + a_cov).all(), f"cov {k}: {torch.cov(xs.T)} vs {cov}"


@pytest.mark.unit
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_the_mixture(name):
    spec = SAMPLERS[name]
    sigmas = spacing(spec.spacing, SD, spec.default_steps)
    # LCM is exact when its denoiser is the consistency function (the ODE's endpoint), which is
    # what an LCM network learns; with the posterior mean it would return posterior means. Each of
    # its calls is a 64-step ODE solve, so it runs on 2·10^4 samples (the SEs grow to match).
    per_item = 5_000 if name == "LCM" else N_PER_ITEM
    denoiser = GMM.consistency_function(steps=64) if name == "LCM" else GMM.denoise
    x = exact_start(float(sigmas[0]), seed=1, per_item=per_item)
    out = spec.fn(denoiser, x, sigmas, noise=noise_from_seed(10, N_BATCH))
    assert out.dtype == F64 and torch.isfinite(out).all()
    assert_reproduces_mixture(out, ALLOWANCE[name])


# The bias goes away at the sampler's rate: 5× the steps shrinks the allowance by 1/5 (Euler,
# first order), 1/25 (Heun, second order) and (log N/N) / (log 20/20) = 0.31 for DDPM on normal
# spacing (its lost variance sums σ_i² ∝ t_i over the steps near t = 0: Δt·Σ1/i ∝ log N / N;
# measured 0.099 → 0.039 → 0.021 at 20, 80, 200 steps).
# Not in the unit tier (-m unit): its 100-step runs take ~12 s; make test runs it.
@pytest.mark.parametrize("name,shrink", [("Euler", 1 / 5), ("Heun", 1 / 25),
                                         ("DDPM", (math.log(100) / 100) / (math.log(20) / 20))])
def test_bias_shrinks_at_the_samplers_rate(name, shrink):
    spec = SAMPLERS[name]
    sigmas = spacing(spec.spacing, SD, 100)
    out = spec.fn(GMM.denoise, exact_start(float(sigmas[0]), seed=2), sigmas, noise=noise_from_seed(20, N_BATCH))
    assert_reproduces_mixture(out, tuple(a * shrink for a in ALLOWANCE[name]))


# --- few-step settings: the model cards' samplers on their spacings (marble.diffusion.few_step) -----
#
# An ideal few-step model is exact at any step count on its card's setup, so the allowance is the
# statistical one alone (4 SE), with no discretisation bias:
#  - SD-Turbo (Euler a on trailing timesteps, 1-4 steps): the ancestral step is exact when the
#    denoiser draws x0 from p(x0 | x, σ) (GaussianMixture.posterior_sampler says why), which is
#    what adversarial distillation trains the one-step generator towards.
#  - LCM-LoRA (LCM on LCMScheduler's timesteps, 2-8 steps): exact with the consistency function.

@pytest.mark.unit
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sd_turbo_setup_is_exact_with_a_posterior_sampling_model(steps):
    settings = PRESETS["sd-turbo"]
    sigmas = spacing(settings.spacing, SD, steps)
    assert float(sigmas[0]) == pytest.approx(SD.sigma_max, rel=1e-6)   # trailing starts at t = 999 for any count
    x = exact_start(float(sigmas[0]), seed=30 + steps)
    out = get_sampler(settings.sampler).fn(GMM.posterior_sampler(seed=steps), x, sigmas,
                                           noise=noise_from_seed(40, N_BATCH))
    assert_reproduces_mixture(out, (0.0, 0.0, 0.0))


@pytest.mark.unit
def test_the_turbo_oracle_can_fail():
    # the same setup with the posterior mean (what a many-step teacher predicts) is far off at 4
    # steps: the first mean from σ = 14.6 lies between the modes, and too much mass lands in the
    # heaviest one (measured: weight 0.556 against 0.5, 35 SE), so the test above can fail
    sigmas = spacing("trailing", SD, 4)
    out = sample_euler_ancestral(GMM.denoise, exact_start(float(sigmas[0]), seed=5), sigmas,
                                 noise=noise_from_seed(50, N_BATCH))
    with pytest.raises(AssertionError, match="weight 0"):
        assert_reproduces_mixture(out, (0.0, 0.0, 0.0))


@pytest.mark.parametrize("steps", [pytest.param(2, marks=pytest.mark.unit), 8])   # 8 steps: ~5 s, make test
def test_lcm_lora_setup_is_exact_with_the_consistency_function(steps):
    settings = PRESETS["lcm-lora"]
    sigmas = spacing(settings.spacing, SD, steps)
    x = exact_start(float(sigmas[0]), seed=60 + steps, per_item=2_500)
    out = get_sampler(settings.sampler).fn(GMM.consistency_function(steps=64), x, sigmas,
                                           noise=noise_from_seed(70, N_BATCH))
    assert_reproduces_mixture(out, ALLOWANCE["LCM"])


# --- order of convergence of the ODE samplers -----------------------------------------------------
#
# VE setup, σ in [0.002, 80] with Karras spacing (ρ = 7), 512 starting points from p_80. The error
# is the median over points of |x_N − x_ref| against Heun with 2048 steps: the median ignores the
# few points near a basin boundary that switch mode at coarse N (an O(1) error that is not yet
# in the asymptotic regime). The order p is minus the slope of a least-squares fit of log error
# on log N over N = 32..256; pre-asymptotic terms make coarse steps look slightly better than
# N^-p, hence bands that reach above the nominal order. Measured: Euler 1.02, DDIM 1.02,
# Heun 2.09, DPM++ 2M 2.12.
ORDER_STEPS = [32, 64, 128, 256]


@pytest.fixture(scope="module")
def ode_problem():
    g = torch.Generator().manual_seed(3)
    x0, _ = GMM.sample(512, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    x_start = (x0 + 80.0 * eps)[None]

    def solve(sampler, steps):
        return sampler(GMM.denoise, x_start, spacing_karras(0.002, 80.0, steps))

    reference = solve(sample_heun, 2048)
    ref_error = (solve(sample_heun, 1024) - reference).norm(dim=-1).median().item()
    return solve, reference, ref_error


def _ddim_eta0(denoiser, x, sigmas):
    return sample_ddim(denoiser, x, sigmas, eta=0.0)


@pytest.mark.unit
@pytest.mark.parametrize("sampler,order,band,finest", [
    (sample_euler, 1, (0.9, 1.15), 0.03),
    (_ddim_eta0, 1, (0.9, 1.15), 0.03),
    (sample_heun, 2, (1.85, 2.3), 5e-4),
    (sample_dpmpp_2m, 2, (1.85, 2.3), 5e-4),
])
def test_ode_samplers_converge_at_their_order(ode_problem, sampler, order, band, finest):
    solve, reference, ref_error = ode_problem
    errors = [(solve(sampler, n) - reference).norm(dim=-1).median().item() for n in ORDER_STEPS]
    assert errors[-1] < finest                      # the same ODE solution as steps grow
    assert ref_error < 0.05 * errors[-1]            # the reference is far more accurate than any run
    log_n = torch.tensor(ORDER_STEPS, dtype=F64).log()
    log_e = torch.tensor(errors, dtype=F64).log()
    slope = ((log_n - log_n.mean()) * (log_e - log_e.mean())).sum() / ((log_n - log_n.mean()) ** 2).sum()
    assert band[0] <= -slope.item() <= band[1], f"order {-slope.item():.3f}, errors {errors}"


# --- the samplers are the formulas of their papers -------------------------------------------------

def _state(seed=0, batch=2, per_item=300, sigma=14.6):
    return exact_start(sigma, seed, batch, per_item)


@pytest.mark.unit
def test_ddim_eta0_is_euler_and_eta1_is_ddpm_is_euler_ancestral():
    # three derivations of the same steps (Karras et al. 2022 §3; Song et al. 2021 eq. 16)
    sigmas = spacing("normal", SD, 12)
    x = _state()
    assert torch.allclose(sample_ddim(GMM.denoise, x, sigmas), sample_euler(GMM.denoise, x, sigmas), rtol=0, atol=1e-12)
    ddpm = sample_ddpm(GMM.denoise, x, sigmas, noise=NoiseSource([5, 6]))
    ddim1 = sample_ddim(GMM.denoise, x, sigmas, noise=NoiseSource([5, 6]), eta=1.0)
    euler_a = sample_euler_ancestral(GMM.denoise, x, sigmas, noise=NoiseSource([5, 6]))
    assert torch.allclose(ddim1, ddpm, rtol=0, atol=1e-12) and torch.allclose(euler_a, ddpm, rtol=0, atol=1e-12)


def _fixed_x0(x0):
    return lambda x, sigma: x0


@pytest.mark.unit
def test_ddpm_step_is_hos_posterior_on_adjacent_timesteps():
    # Ho et al. 2020 eq. 7 in the VP variables, with β_t straight from the linear schedule
    betas = betas_linear()
    abar = alphas_cumprod_from_betas(betas)
    sigma = ((1 - abar) / abar).sqrt()
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(2, 3, 5, generator=g, dtype=F64)
    for t in (1, 400, 999):
        a_t, a_s, beta = abar[t].item(), abar[t - 1].item(), betas[t].item()
        z_t = math.sqrt(a_t) * x
        mean = math.sqrt(a_s) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * z_t
        var = (1 - a_s) / (1 - a_t) * beta                          # β̃_t
        xi = NoiseSource([7, 8, 9])(x)
        expected = (mean + math.sqrt(var) * xi) / math.sqrt(a_s)
        out = sample_ddpm(_fixed_x0(x0), x, sigma[[t, t - 1]], noise=NoiseSource([7, 8, 9]))
        assert torch.allclose(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.unit
def test_ddim_step_is_songs_update():
    abar = SD.alphas_cumprod
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(2, 3, 5, generator=g, dtype=F64)
    for t, s in ((999, 949), (500, 480), (20, 0)):
        a_t, a_s = abar[t].item(), abar[s].item()
        z_t = math.sqrt(a_t) * x
        eps = (z_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        for eta in (0.0, 0.5):
            s_eta = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))   # eq. 16
            xi = NoiseSource([1, 2, 3])(x)
            z_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - s_eta ** 2) * eps + s_eta * xi   # eq. 12
            out = sample_ddim(_fixed_x0(x0), x, SD.sigmas[[t, s]], noise=NoiseSource([1, 2, 3]), eta=eta)
            assert torch.allclose(out, z_s / math.sqrt(a_s), rtol=1e-9, atol=1e-9)


@pytest.mark.unit
def test_lcm_step_renoises_the_denoised_value():
    g = torch.Generator().manual_seed(4)
    x, x0 = torch.randn(2, 2, 6, generator=g, dtype=F64)
    out = sample_lcm(_fixed_x0(x0), x, torch.tensor([5.0, 1.5]), noise=NoiseSource([3, 4]))
    assert torch.equal(out, x0 + NoiseSource([3, 4])(x0) * 1.5)


# --- parity with diffusers, where installed --------------------------------------------------------

def _toy_eps_network(z, t):
    """A smooth, t-dependent stand-in for a U-Net predicting eps from the VP input z."""
    t = torch.as_tensor(t, dtype=F64).reshape(-1, *([1] * (z.ndim - 1)))
    return 0.6 * torch.tanh(z.to(F64)) + 0.1 * torch.sin(z.to(F64) * (1 + t / 1000))


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ddim_matches_diffusers_on_the_sd15_config():
    diffusers = pytest.importorskip("diffusers")
    # SD1.5's scheduler config: leading spacing, steps_offset 1, set_alpha_to_one False, so the last
    # step lands on ā_0 (σ = 0.0292) instead of 0; we pass that level as the last one.
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(10)
    t = timesteps_leading(1000, 10, offset=1)
    sigmas = torch.cat([SD.sigmas[t], SD.sigmas[:1]])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = z.clone()
    for step_t in scheduler.timesteps:
        latents = scheduler.step(_toy_eps_network(latents, step_t).float(), step_t, latents).prev_sample
    x = z.to(F64) / SD.alphas_cumprod[t[0]].sqrt()                  # VP start → VE
    ours = sample_ddim(discrete_denoiser(_toy_eps_network, SD, "eps"), x, sigmas) * SD.alphas_cumprod[0].sqrt()
    # diffusers runs in float32 (ā too): allow ~30 float32 ulps of the largest value (measured 1.3e-5
    # on values up to 29, i.e. 4.5e-7 relative); a wrong coefficient shows at 1e-3 and above
    assert torch.allclose(ours.float(), latents, rtol=0, atol=4e-6 * latents.abs().max().item())


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_euler_matches_diffusers_leading():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", steps_offset=1,
                                                 timestep_spacing="leading")
    scheduler.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 14.6
    latents = x.clone()
    for step_t in scheduler.timesteps:
        eps = _toy_eps_network(scheduler.scale_model_input(latents, step_t), step_t).float()
        latents = scheduler.step(eps, step_t, latents).prev_sample
    ours = sample_euler(discrete_denoiser(_toy_eps_network, SD, "eps"), x.to(F64), spacing_leading(SD, 10))
    assert torch.allclose(ours.float(), latents, rtol=0, atol=4e-6 * latents.abs().max().item())  # as for DDIM


# --- edge cases ----------------------------------------------------------------------------------

def _run(name, x, sigmas, seeds=(5, 6), denoiser=GMM.denoise, callback=None):
    return SAMPLERS[name].fn(denoiser, x, sigmas, noise=NoiseSource(list(seeds)), callback=callback)


@pytest.mark.unit
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_last_step_to_zero_and_single_step_return_the_denoised_value(name):
    x = _state()
    assert torch.equal(_run(name, x, torch.tensor([2.0, 0.0])), GMM.denoise(x, torch.full((2,), 2.0, dtype=F64)))
    sigmas = spacing(SAMPLERS[name].spacing, SD, 1)               # steps = 1: [σmax, 0]
    assert sigmas.tolist() == [pytest.approx(SD.sigma_max, rel=1e-6), 0.0]
    expected = GMM.denoise(x, torch.full((2,), float(sigmas[0]), dtype=F64))
    assert torch.equal(_run(name, x, sigmas), expected)


@pytest.mark.unit
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_duplicate_sigmas_are_no_op_steps(name):
    x = _state()
    plain = spacing("karras", SD, 6)
    levels = plain.tolist()
    repeated = torch.tensor([levels[0], levels[0]] + levels[1:3] + [levels[2]] + levels[3:] + [0.0])
    calls = []
    out = _run(name, x, repeated, callback=lambda i, total, x0: calls.append((i, total)))
    assert torch.isfinite(out).all()
    assert torch.equal(out, _run(name, x, plain))                  # same steps, same draws, bit for bit
    assert calls == [(i, len(repeated) - 1) for i in range(len(repeated) - 1)]


@pytest.mark.unit
@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_callback_and_denoiser_calls(sampler):
    x = _state(batch=3, per_item=10)
    sigmas = spacing("normal", SD, 5)
    calls, reports = [], []

    def denoiser(x, sigma):
        out = GMM.denoise(x, sigma)
        calls.append((sigma.clone(), out))
        return out

    sampler(denoiser, x, sigmas, callback=lambda i, total, x0: reports.append((i, total, x0)))
    assert [(i, total) for i, total, _ in reports] == [(i, 5) for i in range(5)]
    for sigma, _ in calls:
        assert sigma.shape == (3,) and sigma.dtype == F64
    step_calls = calls if sampler is sample_euler else calls[::2]  # Heun: 2 calls a step, 1 on the last
    assert len(calls) == (5 if sampler is sample_euler else 9)
    for (i, _, x0), (sigma, out) in zip(reports, step_calls):
        assert x0 is out and torch.all(sigma == float(sigmas[i]))


@pytest.mark.unit
def test_bad_sigmas_and_options_are_rejected():
    x = _state(batch=1, per_item=4)
    for bad in ([1.0, 2.0, 0.0], [1.0, -0.5], [float("nan"), 0.0], [1.0], [[1.0, 0.0]]):
        with pytest.raises(ValueError):
            sample_euler(GMM.denoise, x, torch.tensor(bad))
    for stochastic in (sample_ddpm, sample_lcm, sample_euler_ancestral):
        with pytest.raises(ValueError):
            stochastic(GMM.denoise, x, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError):
        sample_ddim(GMM.denoise, x, torch.tensor([1.0, 0.0]), eta=1.5)


# --- reproducibility -------------------------------------------------------------------------------

def _elementwise_denoiser(x, sigma):
    """Exact denoiser of ½N(−1, ¼) + ½N(1, ¼) per coordinate; elementwise, so batch size cannot
    change its rounding (the batched linear algebra of the 2-D mixture can, by 1 ulp)."""
    var = 0.25 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    r = torch.sigmoid(2 * x / var)                                  # responsibility of +1
    shrink = 0.25 / var
    return r * (1 + shrink * (x - 1)) + (1 - r) * (-1 + shrink * (x + 1))


@pytest.mark.unit
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seeds_bit_identical_and_batch_equals_single_runs(name):
    sigmas = spacing(SAMPLERS[name].spacing, SD, 8)
    x = NoiseSource([100, 101]).randn((2, 3, 16, 16), dtype=torch.float32) * float(sigmas[0])
    run = lambda x, seeds: _run(name, x, sigmas, seeds=seeds, denoiser=_elementwise_denoiser)
    both = run(x, (7, 8))
    assert torch.equal(both, run(x, (7, 8)))
    assert torch.equal(both, torch.cat([run(x[:1], (7,)), run(x[1:], (8,))]))
    if SAMPLERS[name].stochastic:
        assert not torch.equal(both, run(x, (9, 10)))              # the seeds do matter


# --- registry --------------------------------------------------------------------------------------

@pytest.mark.unit
def test_registry():
    assert list(SAMPLERS) == ["DDPM", "DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "LCM"]
    assert {n for n, s in SAMPLERS.items() if s.stochastic} == {"DDPM", "Euler a", "LCM"}
    assert SAMPLERS["DPM++ 2M Karras"].spacing == "karras"
    assert SAMPLERS["LCM"].spacing == "trailing"
    assert all(s.spacing == "normal" for n, s in SAMPLERS.items() if n not in ("DPM++ 2M Karras", "LCM"))
    assert SAMPLERS["LCM"].default_steps == 4 and SAMPLERS["Euler"].default_steps == 20
    assert all(s.name == n and s.description for n, s in SAMPLERS.items())
    for alias, canonical in [("euler a", "Euler a"), ("EULER_A", "Euler a"), ("dpm++ 2m karras", "DPM++ 2M Karras"),
                             ("dpmpp_2m", "DPM++ 2M"), ("euler_ancestral", "Euler a"), ("lcm", "LCM")]:
        assert get_sampler(alias).name == canonical
    with pytest.raises(KeyError) as err:
        get_sampler("Euler b")
    assert isinstance(err.value, UnknownSampler)
    assert str(err.value) == ("unknown sampler 'Euler b'; choose from: DDPM, DDIM, Euler, Euler a, Heun, DPM++ 2M, "
                              "DPM++ 2M Karras, LCM")
    x = _state(batch=2, per_item=5)
    sigmas = spacing("normal", SD, 3)
    assert torch.equal(sample("euler a", GMM.denoise, x, sigmas, noise=NoiseSource([1, 2])),
                       sample_euler_ancestral(GMM.denoise, x, sigmas, noise=NoiseSource([1, 2])))
