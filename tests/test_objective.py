"""The training objective is the exact inverse of the sampler's denoiser wrapper."""
import pytest
import torch

from marble.diffusion.denoiser import discrete_denoiser
from marble.diffusion.schedule import make_schedule
from marble.train.objective import diffusion_loss, diffusion_target, min_snr_weight


pytestmark = pytest.mark.unit


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_a_network_with_zero_training_loss_is_an_exact_denoiser(prediction):
    """If the network outputs exactly the training target, the loss is 0 and the sampler's
    wrapper, given the same noisy input at sigma(t), returns the clean x0."""
    schedule = make_schedule("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    sigma = schedule.sigmas[t]
    seen = {}

    def oracle(z, t_in, context):
        seen["z"], seen["t"] = z, t_in
        return diffusion_target(prediction, x0, eps, sigma)

    assert float(diffusion_loss(oracle, schedule, prediction, x0, None, t, eps)) == pytest.approx(0.0, abs=1e-20)
    z_train, t_train = seen["z"], seen["t"]
    # the sampler sees x = x0 + sigma * eps in the VE frame
    denoiser = discrete_denoiser(oracle, schedule, prediction)
    x0_hat = denoiser(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma, context=None)
    assert torch.allclose(seen["z"], z_train, atol=1e-12)
    assert torch.allclose(seen["t"].double(), t_train.double(), atol=1e-6)
    assert torch.allclose(x0_hat, x0, atol=1e-9)


def test_loss_is_the_mean_squared_error_of_the_target():
    schedule = make_schedule("scaled_linear")
    x0, eps = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([3, 700])
    loss = diffusion_loss(lambda z, t, context: torch.zeros_like(z), schedule, "eps", x0, None, t, eps)
    assert float(loss) == pytest.approx(1.0)


def test_min_snr_weights_golden():
    sigma = torch.tensor([0.1, 1.0, 10.0])   # SNR = 100, 1, 0.01
    gamma = 5.0
    assert torch.allclose(min_snr_weight("eps", sigma, gamma), torch.tensor([5 / 100, 1.0, 1.0]))
    assert torch.allclose(min_snr_weight("v", sigma, gamma), torch.tensor([5 / 101, 1 / 2, 0.01 / 1.01]))
    assert torch.allclose(min_snr_weight("x0", sigma, gamma), torch.tensor([5.0, 1.0, 0.01]))
