"""The prior interface: a frozen VP diffusion model seen through eps, the denoiser and the ELBO.

Everything that uses a prior (the objective, samplers, comparison solvers) goes through this class;
nothing else touches schedules or network internals (docs/priors.md).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..schedules import Schedule


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against like (B, *event_shape)."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class Prior(nn.Module):
    """A diffusion prior p_theta(x) on x of shape `event_shape`, with VP schedule `schedule`.

    Subclasses implement `eps(x_t, t)`; the denoiser, score and ELBO follow from it.
    """

    schedule: Schedule
    event_shape: tuple

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps-prediction at x_t (B, *event_shape) and native time t (B,) -> (B, *event_shape)."""
        raise NotImplementedError

    def denoise(self, x_t, t):
        """Tweedie's E[x_0 | x_t] = (x_t - sigma_t eps(x_t, t)) / alpha_t, (B, *event_shape)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        return (x_t - _expand(sigma, x_t) * self.eps(x_t, t)) / _expand(alpha, x_t)

    def score(self, x_t, t):
        """grad_x log p_t(x_t) = -eps(x_t, t) / sigma_t, (B, *event_shape)."""
        _, sigma = self.schedule.alpha_sigma(t)
        return -self.eps(x_t, t) / _expand(sigma, x_t)

    def elbo(self, x: torch.Tensor, n_draws: int = 1, sampling: str = "lambda",
             generator: torch.Generator | None = None, strata: str = "item", antithetic: bool = False) -> torch.Tensor:
        """Per-sample variational bound L(x) >= -log p_theta(x), in nats, shape (B,).

        L(x) = 1/2 E_{t,eps}[w(t) ||eps - eps_theta(x_t, t)||^2]       (diffusion term, docs/objective.md)
               + KL(q(x_T | x) || N(0, I))                              (noise end, closed form)
               + d/2 log(2 pi e sigma_0^2 / alpha_0^2)                  (Gaussian decoder, a constant)
        (Kingma et al. 2021, VDM.) With the exact eps and a wide log-SNR range it is tight.
        Gradients flow into x; the prior's weights are frozen by whoever owns them.

        strata: how the times are spread ("item": over each x's draws; "batch": over the whole batch).
        antithetic: draws in pairs (t, eps), (t, -eps) (n_draws even): the error's part odd in eps cancels
        within a pair, an unbiased estimate with less variance.
        """
        batch = x.shape[0]
        d = x[0].numel()
        x_rep = x.repeat_interleave(n_draws, dim=0)  # (B * n, *event_shape)
        if antithetic:
            if n_draws % 2:
                raise ValueError(f"antithetic ELBO draws come in pairs: n_draws must be even, got {n_draws}")
            t, w = self.schedule.sample_elbo_times(batch, n_draws // 2, sampling, generator, x.device, strata)
            t, w = t.repeat_interleave(2), w.repeat_interleave(2)
            half = torch.randn((batch * n_draws // 2, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            eps = torch.stack([half, -half], 1).flatten(0, 1)  # rows 2j, 2j + 1: eps_j, -eps_j
        else:
            t, w = self.schedule.sample_elbo_times(batch, n_draws, sampling, generator, x.device, strata)
            eps = torch.randn(x_rep.shape, generator=generator, device=x.device, dtype=x.dtype)
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = _expand(alpha, x_rep) * x_rep + _expand(sigma, x_rep) * eps
        err = (eps - self.eps(x_t, t)).pow(2).flatten(1).sum(1)  # (B * n,)
        diffusion = 0.5 * (w.to(err.dtype) * err).reshape(batch, n_draws).mean(1)

        lam_min = torch.tensor(self.schedule.lambda_min, dtype=torch.float64)
        a2, s2 = float(torch.sigmoid(lam_min)), float(torch.sigmoid(-lam_min))
        noise_end = 0.5 * (a2 * x.flatten(1).pow(2).sum(1) + d * (s2 - 1.0 - math.log(s2)))
        decoder = 0.5 * d * (math.log(2 * math.pi) + 1.0 - self.schedule.lambda_max)
        return diffusion + noise_end + decoder

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of the prior, (n, *event_shape)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample")
