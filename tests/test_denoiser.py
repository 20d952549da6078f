"""The denoiser contract: conversions, the forward process, and the network wrappers against the
exact Gaussian-mixture denoiser."""
import math

import pytest
import torch

from diffusion_reference import continuous_denoiser, edm_scalings, eps_from_x0, noise_from_seed
from gmm import standard_mixture
from marble.diffusion.denoiser import (
    add_noise, add_noise_vp, c_in, discrete_denoiser, sigma_batch, v_from_x0_eps, x0_from_eps, x0_from_v,
)
from marble.diffusion.schedule import alphas_cumprod_from_betas, betas_linear, make_schedule

pytestmark = pytest.mark.unit

F64 = torch.float64
GMM = standard_mixture()
SD = make_schedule("scaled_linear")


def _batch(seed=0, b=5, shape=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=F64)
    eps = torch.randn(b, *shape, generator=g, dtype=F64)
    sigma = torch.exp(torch.empty(b, dtype=F64).uniform_(math.log(0.002), math.log(80), generator=g))
    return x0, eps, sigma


# --- conversions ---------------------------------------------------------------------------------

def test_eps_and_x0_round_trip():
    x0, eps, sigma = _batch()
    x = add_noise(x0, sigma, eps)
    assert torch.allclose(x0_from_eps(x, sigma, eps), x0, rtol=0, atol=1e-12 * 80)
    assert torch.allclose(eps_from_x0(x, sigma, x0), eps, rtol=0, atol=1e-12)
    assert torch.allclose(x0_from_eps(x, sigma, eps_from_x0(x, sigma, x0)), x0, rtol=0, atol=1e-12 * 80)


def test_v_round_trip_and_vp_definition():
    x0, eps, sigma = _batch(1)
    x = add_noise(x0, sigma, eps)
    v = v_from_x0_eps(x0, eps, sigma)
    assert torch.allclose(x0_from_v(x, sigma, v), x0, rtol=0, atol=1e-12 * 80)
    # Salimans & Ho: v = sqrt(ā)·eps − sqrt(1 − ā)·x0, with ā = 1/(1 + σ²)
    abar = (1 / (1 + sigma ** 2)).reshape(-1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=0, atol=1e-14)
    assert torch.allclose(c_in(sigma) ** 2, abar.flatten(), rtol=1e-14)


def test_conversions_accept_float_and_0d_sigma():
    x0, eps, _ = _batch(2)
    x = add_noise(x0, 3.0, eps)
    for sigma in (3.0, torch.tensor(3.0, dtype=F64), torch.full((5,), 3.0, dtype=F64)):
        assert torch.allclose(x0_from_eps(x, sigma, eps), x0, atol=1e-13)
        assert torch.allclose(x0_from_v(x, sigma, v_from_x0_eps(x0, eps, sigma)), x0, atol=1e-13)
    assert sigma_batch(3.0, x).shape == (5,) and sigma_batch(torch.tensor(3.0), x).shape == (5,)


def test_x0_matches_the_vp_formulas_diffusers_uses():
    # DDIM/DDPM schedulers: x0 = (z − sqrt(1 − ā)·eps)/sqrt(ā) and x0 = sqrt(ā)·z − sqrt(1 − ā)·v
    g = torch.Generator().manual_seed(3)
    z, pred = torch.randn(2, 4, 3, generator=g, dtype=F64)
    for t in (0, 500, 999):
        abar = SD.alphas_cumprod[t].item()
        sigma = SD.sigmas[t].item()
        x = z / math.sqrt(abar)
        assert torch.allclose(x0_from_eps(x, sigma, pred), (z - math.sqrt(1 - abar) * pred) / math.sqrt(abar), atol=1e-12)
        assert torch.allclose(x0_from_v(x, sigma, pred), math.sqrt(abar) * z - math.sqrt(1 - abar) * pred, atol=1e-12)


def test_edm_scalings_table_1():
    # at σ = σ_data: c_skip = 1/2, c_out = σd/√2, c_in = 1/(σd·√2)
    c_skip, c_out, c_in_edm = edm_scalings(0.5, 0.5)
    assert (c_skip, c_out, c_in_edm) == pytest.approx((0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2))), rel=1e-15)
    # the training target F = (x0 − c_skip·x)/c_out has unit variance for data of variance σd² (EDM B.6)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        c_skip, c_out, _ = edm_scalings(sigma, 0.5)
        assert ((1 - c_skip) ** 2 * 0.25 + c_skip ** 2 * sigma ** 2) / c_out ** 2 == pytest.approx(1.0, rel=1e-12)


# --- forward process -----------------------------------------------------------------------------

def _ks_normal(z: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance of a sample to N(0, 1)."""
    z = z.flatten().sort().values.to(F64)
    n = len(z)
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=F64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


N_FORWARD = 40_000
# Moment tolerances are 4.5 standard errors (mean: s/√n; variance: s²·√(2/n)); the KS critical
# value at α = 1e-3 is 1.95/√n. All draws are seeded, so the outcome is fixed.
KS_CRIT = 1.95 / math.sqrt(N_FORWARD)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 14.6])
def test_forward_noising_ve_and_vp_closed_forms(sigma):
    x0 = torch.tensor([[1.5, -2.0]], dtype=F64).expand(N_FORWARD, 2)
    eps = noise_from_seed(11, 1).randn((1, N_FORWARD, 2), dtype=F64)[0]
    x = add_noise(x0, torch.full((N_FORWARD,), sigma, dtype=F64), eps)
    se_mean, se_var = sigma / math.sqrt(N_FORWARD), sigma ** 2 * math.sqrt(2 / N_FORWARD)
    assert torch.allclose(x.mean(0), x0[0], atol=4.5 * se_mean, rtol=0)
    assert torch.allclose(x.var(0), torch.full((2,), sigma ** 2, dtype=F64), atol=4.5 * se_var, rtol=0)
    assert _ks_normal((x - x0) / sigma) < KS_CRIT
    # VP: z ~ N(sqrt(ā)·x0, (1 − ā)·I)
    abar = 1 / (1 + sigma ** 2)
    z = add_noise_vp(x0, sigma, eps)
    sd = math.sqrt(1 - abar)
    assert torch.allclose(z.mean(0), math.sqrt(abar) * x0[0], atol=4.5 * sd / math.sqrt(N_FORWARD), rtol=0)
    assert torch.allclose(z.var(0), torch.full((2,), 1 - abar, dtype=F64), atol=4.5 * sd ** 2 * math.sqrt(2 / N_FORWARD))
    assert _ks_normal((z - math.sqrt(abar) * x0) / sd) < KS_CRIT


def test_vp_closed_form_matches_the_ddpm_markov_chain():
    # Ho et al. 2020: running z_t = sqrt(1 − β_t)·z_{t−1} + sqrt(β_t)·ξ for t = 0..k gives
    # q(z_k | x0) = N(sqrt(ā_k)·x0, (1 − ā_k)I), the closed form add_noise_vp draws from directly
    betas = betas_linear()
    abar = alphas_cumprod_from_betas(betas)
    g = torch.Generator().manual_seed(5)
    x0 = torch.full((N_FORWARD,), 2.0, dtype=F64)
    z = x0.clone()
    for k in range(300):
        z = (1 - betas[k]).sqrt() * z + betas[k].sqrt() * torch.randn(N_FORWARD, generator=g, dtype=F64)
    a = abar[299].item()
    assert z.mean().item() == pytest.approx(math.sqrt(a) * 2.0, abs=4.5 * math.sqrt((1 - a) / N_FORWARD))
    assert _ks_normal((z - math.sqrt(a) * 2.0) / math.sqrt(1 - a)) < KS_CRIT
    sigma = math.sqrt((1 - a) / a)
    closed = add_noise_vp(x0, sigma, torch.randn(N_FORWARD, generator=g, dtype=F64))
    assert closed.var().item() == pytest.approx(1 - a, abs=4.5 * (1 - a) * math.sqrt(2 / N_FORWARD))


# --- wrappers: a network that returns the exact eps / v / x0 reproduces the exact denoiser -------

def _points(seed=7):
    g = torch.Generator().manual_seed(seed)
    x0, _ = GMM.sample(4 * 64, g)
    sigma = torch.tensor([0.03, 0.4, 2.0, 14.0], dtype=F64)  # inside SD's trained range
    x = x0.reshape(4, 64, 2) + sigma[:, None, None] * torch.randn(4, 64, 2, generator=g, dtype=F64)
    return x, sigma


def _exact_discrete_network(prediction):
    """A VP network trained to perfection on the mixture: recovers σ from t and x from c_in·x."""

    def network(x_in, t, shift=None):
        assert t.shape == (x_in.shape[0],) and t.dtype == F64
        sigma = SD.t_to_sigma(t)
        x = x_in / c_in(sigma)[:, None, None]
        x0 = GMM.denoise(x, sigma)
        eps = eps_from_x0(x, sigma, x0)
        out = {"eps": eps, "v": v_from_x0_eps(x0, eps, sigma), "x0": x0}[prediction]
        return out if shift is None else out + shift

    return network


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_discrete_wrapper_reproduces_exact_denoiser(prediction):
    x, sigma = _points()
    denoiser = discrete_denoiser(_exact_discrete_network(prediction), SD, prediction)
    assert torch.allclose(denoiser(x, sigma), GMM.denoise(x, sigma), rtol=0, atol=1e-9)
    # keyword conditioning reaches the network
    shifted = denoiser(x, sigma, shift=torch.ones_like(x))
    assert not torch.allclose(shifted, denoiser(x, sigma))


def test_discrete_wrapper_feeds_vp_input_and_trained_timestep():
    seen = {}

    def network(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in)

    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([999, 500, 0])
    x0 = discrete_denoiser(network, SD, "eps")(x, SD.sigmas[t])
    assert torch.equal(seen["t"], t.to(F64))                         # nodes map to their timesteps
    assert torch.allclose(seen["x_in"], x * SD.alphas_cumprod[t].sqrt()[:, None, None, None], rtol=1e-14)
    assert torch.equal(x0, x)                                         # eps = 0 ⇒ x0 = x
    # a float or 0-d sigma is broadcast to the batch
    discrete_denoiser(network, SD, "eps")(x, 2.0)
    assert seen["t"].shape == (3,) and torch.allclose(seen["t"], SD.sigma_to_t(torch.full((3,), 2.0, dtype=F64)))


@pytest.mark.parametrize("prediction", ["edm", "eps", "v", "x0"])
def test_continuous_wrapper_reproduces_exact_denoiser(prediction):
    sigma_data = 0.5
    x, sigma = _points(8)

    def network(x_in, c_noise):
        sigma = torch.exp(4 * c_noise)                               # EDM c_noise = ln(σ)/4
        if prediction == "edm":
            c_skip, c_out, c_in_edm = edm_scalings(sigma[:, None, None], sigma_data)
            x = x_in / c_in_edm
            return (GMM.denoise(x, sigma) - c_skip * x) / c_out       # the EDM training target F
        x = x_in / c_in(sigma)[:, None, None]
        x0 = GMM.denoise(x, sigma)
        eps = eps_from_x0(x, sigma, x0)
        return {"eps": eps, "v": v_from_x0_eps(x0, eps, sigma), "x0": x0}[prediction]

    denoiser = continuous_denoiser(network, prediction, sigma_data=sigma_data)
    assert torch.allclose(denoiser(x, sigma), GMM.denoise(x, sigma), rtol=0, atol=1e-9)


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError):
        discrete_denoiser(lambda x, t: x, SD, "score")
    with pytest.raises(ValueError):
        continuous_denoiser(lambda x, t: x, "score")
