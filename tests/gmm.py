"""A Gaussian mixture with a closed-form denoiser: the exact oracle for schedules and samplers.

For p(x0) = Σ_k w_k N(μ_k, Σ_k) and x = x0 + σ·eps, the noisy marginal is
Σ_k w_k N(μ_k, Σ_k + σ²I), and the exact denoiser is the posterior mean
    E[x0 | x, σ] = Σ_k r_k(x) (μ_k + Σ_k (Σ_k + σ²I)^{-1} (x − μ_k)),
    r_k(x) ∝ w_k N(x; μ_k, Σ_k + σ²I).
Everything is float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from marble.diffusion.samplers import sample_heun
from marble.diffusion.schedule import spacing_karras

F64 = torch.float64


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor    # (K, d)
    covs: torch.Tensor     # (K, d, d), symmetric positive definite

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws (n, d) and their component labels (n,)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[labels] + (chol[labels] @ z[:, :, None])[:, :, 0], labels

    def _component_terms(self, x: torch.Tensor, sigma: torch.Tensor):
        """log w_k N(x; μ_k, Σ_k + σ²I) and the component posterior means, for x (B, M, d) and
        sigma (B,): shapes (B, K, M) and (B, K, M, d)."""
        d = self.dim
        noisy = self.covs[None] + (sigma ** 2)[:, None, None, None] * torch.eye(d, dtype=F64)
        chol = torch.linalg.cholesky(noisy)                                  # (B, K, d, d)
        diff = x[:, None] - self.means[None, :, None, :]                      # (B, K, M, d)
        solved = torch.cholesky_solve(diff.transpose(-1, -2), chol)           # (B, K, d, M)
        maha = (diff.transpose(-1, -2) * solved).sum(-2)                      # (B, K, M)
        logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)            # (B, K)
        log_p = (self.weights.log()[None, :, None] - 0.5 * maha
                 - 0.5 * logdet[..., None] - 0.5 * d * math.log(2 * math.pi))
        post = self.means[None, :, None, :] + (self.covs[None] @ solved).transpose(-1, -2)
        return log_p, post

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x0 | x, σ] for x of shape (B, ..., d) and σ of shape (B,) (or a scalar)."""
        shape = x.shape
        xb = x.to(F64).reshape(shape[0], -1, self.dim)
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(shape[0])
        log_p, post = self._component_terms(xb, sigma)
        r = torch.softmax(log_p, dim=1)                                       # (B, K, M)
        return (r[..., None] * post).sum(1).reshape(shape).to(x.dtype)

    def posterior_sampler(self, seed: int):
        """D(x, σ) that draws x0 from the posterior p(x0 | x, σ) instead of taking its mean: a
        component k with probability r_k(x), then N(μ_k + Σ_k(Σ_k + σ²I)⁻¹(x − μ_k),
        Σ_k − Σ_k(Σ_k + σ²I)⁻¹Σ_k). What a few-step model distilled to produce samples (ADD,
        SD-Turbo) aims at. An ancestral step on it is exact: with x0 ~ p(x0 | x), x − x0 = σ·eps
        and eps ~ N(0, I) independent of x0, so x0 + σ_down·eps + σ_up·z ~ p_σ_next. Its own
        generator: the sampler's NoiseSource stays the sampler's."""
        g = torch.Generator().manual_seed(seed)

        def draw(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            shape, d = x.shape, self.dim
            xb = x.to(F64).reshape(shape[0], -1, d)
            sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(shape[0])
            log_p, post = self._component_terms(xb, sigma)                   # (B, K, M), (B, K, M, d)
            r = torch.softmax(log_p, dim=1)
            u = torch.rand(r.shape[0], 1, r.shape[2], generator=g, dtype=F64)
            k = (r.cumsum(1) < u).sum(1).clamp(max=len(self.weights) - 1)   # (B, M)
            noisy = self.covs[None] + (sigma ** 2)[:, None, None, None] * torch.eye(d, dtype=F64)
            post_cov = self.covs[None] - self.covs[None] @ torch.linalg.solve(noisy, self.covs[None])
            chol = torch.linalg.cholesky(post_cov)                            # (B, K, d, d)
            b = torch.arange(shape[0])[:, None]
            mean = post.permute(0, 2, 1, 3)[b, torch.arange(xb.shape[1])[None], k]   # (B, M, d)
            z = torch.randn(xb.shape, generator=g, dtype=F64)
            return (mean + (chol[b, k] @ z[..., None])[..., 0]).reshape(shape).to(x.dtype)

        return draw

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """log p_σ(x) for x (n, d)."""
        log_p, _ = self._component_terms(x.to(F64)[None], torch.tensor([sigma], dtype=F64))
        return torch.logsumexp(log_p[0], dim=0)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each clean sample x (n, d)."""
        log_p, _ = self._component_terms(x.to(F64)[None], torch.zeros(1, dtype=F64))
        return log_p[0].argmax(dim=0)

    def consistency_function(self, steps: int = 200, sigma_end: float = 1e-4):
        """f(x, σ): the probability-flow ODE solved from σ to 0 with the exact denoiser (Heun on
        Karras levels from σ down to sigma_end, then the Euler step to 0). It maps p_σ to p_0:
        what a consistency/LCM network learns. Error O(steps⁻²) + O(sigma_end²)."""

        def f(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            level = float(sigma.reshape(-1)[0])
            return sample_heun(self.denoise, x, spacing_karras(sigma_end, level, steps).to(F64))

        return f


def standard_mixture() -> GaussianMixture:
    """Three well-separated 2-D components with distinct weights and full covariances.
    Assigning an exact draw to its most likely component mislabels 5e-6 of them (measured on
    2·10^6 draws), so per-component statistics of assigned samples are unbiased to that level."""
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        means=torch.tensor([[-3.0, -1.0], [3.0, -0.5], [0.0, 3.5]], dtype=F64),
        covs=torch.tensor([[[0.50, 0.20], [0.20, 0.30]],
                           [[0.25, -0.10], [-0.10, 0.40]],
                           [[0.30, 0.05], [0.05, 0.20]]], dtype=F64),
    )
