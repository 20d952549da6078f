"""Schedules and sigma spacings: closed forms, known Stable Diffusion numbers, diffusers' timesteps."""
import math

import numpy as np
import pytest
import torch

from diffusion_reference import ContinuousSchedule
from marble.diffusion.schedule import (
    SPACINGS, DiscreteSchedule, alphas_cumprod_from_betas, alphas_cumprod_from_sigmas,
    betas_cosine, betas_from_alphas_cumprod, betas_linear, betas_scaled_linear, make_schedule, sigmas_from_alphas_cumprod,
    spacing, spacing_exponential, spacing_karras, spacing_leading, spacing_normal, spacing_trailing, timesteps_leading,
    timesteps_trailing, timesteps_lcm,
)

pytestmark = pytest.mark.unit

F64 = torch.float64
SD = make_schedule("scaled_linear")


# --- betas and conversions -----------------------------------------------------------------------

def test_beta_schedules_closed_forms():
    lin = betas_linear()
    assert lin.dtype == F64 and len(lin) == 1000
    assert lin[0].item() == pytest.approx(1e-4, abs=1e-15) and lin[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(lin.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64), atol=1e-15)
    # scaled linear: sqrt(beta) is linear in t
    root = betas_scaled_linear().sqrt()
    assert torch.allclose(root.diff(), torch.full((999,), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999, dtype=F64), atol=1e-15)


def test_cosine_alphas_cumprod_follow_nichol_dhariwal():
    # ā_t = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2), eq. 17, wherever beta is not clipped
    n, s = 1000, 0.008
    ac = alphas_cumprod_from_betas(betas_cosine(n, s))
    t = torch.arange(1, n + 1, dtype=F64)
    f = lambda u: torch.cos((u / n + s) / (1 + s) * math.pi / 2) ** 2
    expected = f(t) / f(torch.zeros(1, dtype=F64))
    assert torch.allclose(ac[:-1], expected[:-1], rtol=1e-10, atol=0)
    betas = betas_cosine(n, s)
    assert betas[-1].item() == 0.999 and (betas[:-1] < 0.999).all()  # only the last one is clipped


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_conversions_round_trip(name):
    schedule = make_schedule(name)
    ac = schedule.alphas_cumprod
    assert torch.allclose(betas_from_alphas_cumprod(alphas_cumprod_from_betas(betas_from_alphas_cumprod(ac))),
                          betas_from_alphas_cumprod(ac), rtol=1e-9, atol=1e-15)
    assert torch.allclose(alphas_cumprod_from_sigmas(sigmas_from_alphas_cumprod(ac)), ac, rtol=1e-12, atol=0)
    assert torch.allclose(sigmas_from_alphas_cumprod(alphas_cumprod_from_sigmas(schedule.sigmas)), schedule.sigmas,
                          rtol=1e-9, atol=0)
    assert torch.allclose(DiscreteSchedule.from_betas(betas_from_alphas_cumprod(ac)).sigmas, schedule.sigmas, rtol=1e-9)


def test_known_stable_diffusion_and_ddpm_numbers():
    # SD1.x/2.x (scaled_linear, 0.00085..0.012): the sigma range every SD UI prints
    assert SD.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert SD.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert SD.alphas_cumprod[-1].item() == pytest.approx(0.004660, abs=1e-6)
    # DDPM's linear schedule (Ho et al. 2020): ā_T ≈ 4.04e-5, σ_max ≈ 157.4
    ddpm = make_schedule("linear")
    assert ddpm.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert ddpm.sigma_max == pytest.approx(157.407, abs=1e-3)


def test_schedule_validation():
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        make_schedule("quadratic")
    with pytest.raises(ValueError):
        ContinuousSchedule(1.0, 0.5)


# --- sigma <-> t ---------------------------------------------------------------------------------

def test_sigma_to_t_at_the_nodes_is_the_integer_timestep():
    t = torch.arange(1000, dtype=F64)
    assert torch.equal(SD.sigma_to_t(SD.sigmas), t)
    assert torch.allclose(SD.t_to_sigma(t), SD.sigmas, rtol=1e-14, atol=0)


def test_sigma_to_t_and_t_to_sigma_are_inverse_and_log_linear():
    t = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=F64) * 999
    assert torch.allclose(SD.sigma_to_t(SD.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    # halfway between timesteps is the geometric mean of the neighbours (log-linear interpolation)
    k = torch.arange(999)
    mid = SD.t_to_sigma(k.to(F64) + 0.5)
    assert torch.allclose(mid, (SD.sigmas[:-1] * SD.sigmas[1:]).sqrt(), rtol=1e-12)
    assert torch.allclose(SD.sigma_to_t(mid), k.to(F64) + 0.5, atol=1e-9)


def test_sigma_to_t_clamps_shapes_and_dtypes():
    assert SD.sigma_to_t(1000.0).item() == 999 and SD.sigma_to_t(1e-4).item() == 0
    assert SD.sigma_to_t(torch.tensor(2.0)).shape == ()
    assert SD.sigma_to_t(torch.full((2, 3), 2.0)).shape == (2, 3)
    assert SD.sigma_to_t(torch.tensor([2.0], dtype=torch.float16)).dtype == torch.float32  # t needs ≥ fp32
    assert SD.sigma_to_t(torch.tensor([2.0], dtype=F64)).dtype == F64
    assert SD.t_to_sigma(torch.tensor([5, 7])).dtype == F64


# --- spacings ------------------------------------------------------------------------------------

SCHEDULES = {"sd": SD, "ve": ContinuousSchedule(0.002, 80.0)}


@pytest.mark.parametrize("name", list(SPACINGS))
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_spacing_shape_order_and_final_zero(name, steps):
    sigmas = spacing(name, SD, steps)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    if name != "leading" and not (name == "linspace" and steps == 1):   # diffusers' 1 linspace step is t = 0
        assert sigmas[0].item() == pytest.approx(SD.sigma_max, rel=1e-6)
    if name in ("normal", "karras", "exponential") and steps > 1:
        assert sigmas[-2].item() == pytest.approx(SD.sigma_min, rel=1e-6)


def test_karras_and_exponential_closed_forms():
    s = spacing_karras(0.002, 80.0, 18).to(F64)
    assert s[0].item() == pytest.approx(80.0, rel=1e-7) and s[-2].item() == pytest.approx(0.002, rel=1e-6)
    # Karras eq. 5: σ^(1/ρ) is linear in the step index
    root = s[:-1] ** (1 / 7)
    assert torch.allclose(root.diff(), torch.full((17,), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17, dtype=F64), atol=1e-6)
    rho3 = spacing_karras(0.1, 10.0, 5, rho=3.0).to(F64)[:-1] ** (1 / 3)
    assert torch.allclose(rho3.diff(), torch.full((4,), (0.1 ** (1 / 3) - 10 ** (1 / 3)) / 4, dtype=F64), atol=1e-6)
    e = spacing_exponential(0.002, 80.0, 10).to(F64)[:-1].log()
    assert torch.allclose(e.diff(), torch.full((9,), (math.log(0.002) - math.log(80)) / 9, dtype=F64), atol=1e-6)
    # the registry takes the range from the schedule, continuous ones included
    assert torch.equal(spacing("karras", SCHEDULES["ve"], 18), spacing_karras(0.002, 80.0, 18))
    assert torch.equal(spacing("exponential", SD, 9), spacing_exponential(SD.sigma_min, SD.sigma_max, 9))


def test_normal_spacing_is_the_models_timesteps():
    # linspace(999, 0, 4) = 999, 666, 333, 0: all integer, so exactly the trained sigmas
    assert torch.equal(spacing_normal(SD, 4), torch.cat([SD.sigmas[[999, 666, 333, 0]], torch.zeros(1, dtype=F64)]).float())
    t = torch.linspace(999, 0, 20, dtype=F64)
    assert torch.allclose(spacing_normal(SD, 20)[:-1].to(F64), SD.t_to_sigma(t), rtol=1e-7)


# diffusers' set_timesteps (EulerDiscreteScheduler / DDIMScheduler), worked by hand:
#   leading:  k·(T // steps) + steps_offset for k = steps-1..0
#   trailing: round(T − k·T/steps) − 1 for k = 0..steps-1 (np.arange accumulation, round half even)
LEADING = {
    (20, 1): [951, 901, 851, 801, 751, 701, 651, 601, 551, 501, 451, 401, 351, 301, 251, 201, 151, 101, 51, 1],
    (7, 1): [853, 711, 569, 427, 285, 143, 1],       # T // 7 = 142
    (3, 0): [666, 333, 0],
    (1, 1): [1],
}
TRAILING = {
    20: [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 499, 449, 399, 349, 299, 249, 199, 149, 99, 49],
    7: [999, 856, 713, 570, 428, 285, 142],          # 1000 − k·142.857…: 857.14, 714.29, 571.43, 428.57, …
    3: [999, 666, 332],
    1: [999],
}


# LCMScheduler (original_inference_steps 50): of 999, 979, …, 19 (k·20 − 1), the entries at
# floor(linspace(0, 50, steps, endpoint=False)); for 8 steps indices 0, 6, 12, 18, 25, 31, 37, 43
LCM = {
    1: [999],
    2: [999, 499],
    4: [999, 759, 499, 259],
    8: [999, 879, 759, 639, 499, 379, 259, 139],
}


@pytest.mark.parametrize("steps", list(LCM))
def test_lcm_timesteps_golden(steps):
    assert timesteps_lcm(1000, steps).tolist() == LCM[steps]
    assert torch.equal(spacing("lcm", SD, steps), torch.cat([SD.sigmas[LCM[steps]], torch.zeros(1, dtype=F64)]).float())


def test_lcm_and_linspace_limits():
    assert timesteps_lcm(1000, 50).tolist() == list(range(999, 0, -20))
    with pytest.raises(ValueError):
        timesteps_lcm(1000, 51)                     # a subset of the 50 distillation timesteps
    # linspace interpolates σ linearly in t, normal log σ: the same at integer t, and elsewhere the
    # weighted arithmetic mean of the neighbouring levels is above their geometric mean
    assert torch.equal(spacing("linspace", SD, 4), spacing("normal", SD, 4))          # t = 999, 666, 333, 0
    lin, normal = spacing("linspace", SD, 20).double(), spacing("normal", SD, 20).double()
    assert (lin[1:-2] > normal[1:-2]).all() and lin[0] == normal[0] and lin[-2] == normal[-2]
    assert ((lin - normal) / normal.clamp(min=1e-9))[:-1].max() < 2e-3


@pytest.mark.parametrize("steps,offset", list(LEADING))
def test_leading_timesteps_golden(steps, offset):
    assert timesteps_leading(1000, steps, offset).tolist() == LEADING[(steps, offset)]


@pytest.mark.parametrize("steps", list(TRAILING))
def test_trailing_timesteps_golden(steps):
    assert timesteps_trailing(1000, steps).tolist() == TRAILING[steps]


def test_leading_and_trailing_sigmas_are_the_trained_ones():
    t = LEADING[(20, 1)]
    assert torch.equal(spacing_leading(SD, 20), torch.cat([SD.sigmas[t], torch.zeros(1, dtype=F64)]).float())
    assert torch.equal(spacing_trailing(SD, 7), torch.cat([SD.sigmas[TRAILING[7]], torch.zeros(1, dtype=F64)]).float())
    # 50 leading steps on SD1.5: 981, 961, …, 1 (the DDIM timesteps every SD1.5 pipeline uses)
    assert timesteps_leading(1000, 50).tolist() == list(range(981, 0, -20))
    # arange's rounding: for 48 steps 1000 − 3·20.833… lands just below 937.5, so t = 936
    assert timesteps_trailing(1000, 48)[:4].tolist() == [999, 978, 957, 936]
    assert len(timesteps_trailing(1000, 61)) == 61 and timesteps_trailing(1000, 61).min() >= 0


def test_spacing_validation():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            spacing("karras", SD, bad)
    with pytest.raises(ValueError):
        spacing("uniform", SD, 10)
    with pytest.raises(ValueError):
        spacing("normal", SCHEDULES["ve"], 10)       # a continuous model has no timesteps
    with pytest.raises(ValueError):
        timesteps_leading(1000, 1000, offset=1)     # t = 1000 does not exist


# --- parity with diffusers itself, where installed ------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 7, 20, 48, 50])
def test_timesteps_and_sigmas_match_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for kind, ours_t, ours_sigmas in [
        ("leading", timesteps_leading(1000, steps, 1), spacing_leading(SD, steps)),
        ("trailing", timesteps_trailing(1000, steps), spacing_trailing(SD, steps)),
    ]:
        euler = diffusers.EulerDiscreteScheduler(timestep_spacing=kind, steps_offset=1, **config)
        euler.set_timesteps(steps)
        ddim = diffusers.DDIMScheduler(timestep_spacing=kind, steps_offset=1, **config)
        ddim.set_timesteps(steps)
        assert np.array_equal(euler.timesteps.numpy(), ours_t) and np.array_equal(ddim.timesteps.numpy(), ours_t)
        # diffusers accumulates ā in float32: agreement to its precision
        assert torch.allclose(euler.sigmas.double(), ours_sigmas.double(), rtol=1e-5, atol=0)
    # "linspace" has our normal spacing's timesteps (except for 1 step, where diffusers takes t = 0);
    # diffusers interpolates σ linearly in t, k-diffusion (and we) log-linearly. They differ most
    # near t = 0, where σ(t) bends most: up to 7.7e-4 relative for 2..199 steps (1.5% at worst,
    # halfway between t = 0 and t = 1).
    if steps == 1:
        return
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace", **config)
    euler.set_timesteps(steps)
    assert np.allclose(euler.timesteps.numpy(), np.linspace(999, 0, steps), atol=1e-3)
    assert torch.allclose(euler.sigmas.double(), spacing_normal(SD, steps).double(), rtol=1e-3, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 20, 48, 50])
def test_few_step_spacings_match_diffusers(steps):
    """trailing (EulerAncestralDiscreteScheduler, SD-Turbo's), linspace and LCMScheduler's timesteps,
    integer for integer; σ to diffusers' float32 precision."""
    diffusers = pytest.importorskip("diffusers")
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ancestral = diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **config)
    ancestral.set_timesteps(steps)
    assert np.array_equal(ancestral.timesteps.numpy(), timesteps_trailing(1000, steps))
    assert torch.allclose(ancestral.sigmas.double(), spacing("trailing", SD, steps).double(), rtol=1e-5, atol=0)
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace", **config)
    euler.set_timesteps(steps)
    # linspace ends at t = 0, where diffusers' float32 ā_0 = 1 − β_0 keeps 1 − ā_0 = 8.5e-4 to ±6e-8
    # absolute, i.e. σ_min to ±3.5e-5 relative (measured 1.3e-5)
    assert torch.allclose(euler.sigmas.double(), spacing("linspace", SD, steps).double(), rtol=5e-5, atol=0)
    lcm = diffusers.LCMScheduler(**config)
    lcm.set_timesteps(steps)
    assert lcm.timesteps.tolist() == timesteps_lcm(1000, steps).tolist()


# --- zero terminal SNR (Lin et al. 2024) ------------------------------------------------------------

def test_zero_terminal_snr_keeps_the_first_level_and_ends_in_pure_noise():
    from marble.diffusion.schedule import ZERO_SNR_FLOOR, rescale_zero_terminal_snr
    betas = betas_scaled_linear()
    root = alphas_cumprod_from_betas(betas).sqrt()
    rescaled = alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas)).sqrt()
    # Alg. 1 is the affine map of sqrt(ā) fixing the first value and sending the last to 0
    first, last = root[0], root[-1]
    torch.testing.assert_close(rescaled, (root - last) * first / (first - last), rtol=0, atol=1e-15)
    assert abs(float(rescaled[-1])) < 1e-15 and float(rescaled[0]) == pytest.approx(float(first), abs=1e-15)
    zsnr = make_schedule("scaled_linear", zero_terminal_snr=True)
    assert float(zsnr.alphas_cumprod[-1]) == pytest.approx(ZERO_SNR_FLOOR, rel=1e-9)   # σ_max ≈ 4096, finite
    assert zsnr.sigma_max == pytest.approx((1 / ZERO_SNR_FLOOR - 1) ** 0.5, rel=1e-9)
    torch.testing.assert_close(zsnr.alphas_cumprod[:-1], rescaled[:-1] ** 2, rtol=1e-12, atol=0)
    assert zsnr.sigma_min == pytest.approx(SD.sigma_min, rel=1e-9)
    assert make_schedule("scaled_linear", zero_terminal_snr=False).sigma_max == SD.sigma_max


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_zero_terminal_snr_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs
    betas = betas_scaled_linear()
    from marble.diffusion.schedule import rescale_zero_terminal_snr
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), theirs(betas.clone()), rtol=0, atol=1e-12)
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  rescale_betas_zero_snr=True)
    ours = make_schedule("scaled_linear", zero_terminal_snr=True)
    for steps in (10, 25):
        euler = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", **config)
        euler.set_timesteps(steps)
        # diffusers accumulates ā in float32 and clamps ā_T to 2^-24 as we do
        torch.testing.assert_close(euler.sigmas.double(), spacing_trailing(ours, steps).double(), rtol=1e-5, atol=0)
