"""The EDM view of a VP eps-prior: noise level sigma, denoiser D(x; sigma), the Karras grid.

Consistency models and their solvers live in the variance-exploding coordinates of Karras et al.
2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM): x = x0 + sigma n.
A VP prior x_t = alpha_t x0 + s_t eps maps onto it by

    sigma = s_t / alpha_t = sqrt((1 - abar) / abar),   x_edm = x_vp / alpha_t,   alpha_t = 1 / sqrt(1 + sigma^2)
    D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))                 (Tweedie's E[x0 | x])

so D is the prior's VP denoiser read at the matching time. t(sigma) inverts log-SNR = -2 log sigma:
exactly for a ContinuousSchedule, by linear interpolation on log sigma between the integer timesteps
of a DiscreteSchedule (as diffusers' EulerDiscreteScheduler does; the discrete schedule's own
log-SNR is linear between integers, so this is its exact inverse). Outside the schedule's range t is
clamped to its ends: for the DDPM linear schedule sigma runs 0.0100 .. 157, so EDM's s_min = 0.002
is read at t = 0.
"""
from __future__ import annotations

import torch
from torch import nn

from ..schedules import ContinuousSchedule, DiscreteSchedule

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  dtype=torch.float64) -> torch.Tensor:
    """The Karras grid, (n,) decreasing from sigma_max to sigma_min (EDM eq. 5).

    sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i = 0..n-1.
    """
    if n < 2:
        raise ValueError(f"the Karras grid needs at least 2 steps, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((a + i / (n - 1) * (b - a)) ** rho).to(dtype)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma as a scalar or (B,) -> broadcastable against like (B, *event)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class EDMDenoiser(nn.Module):
    """D(x; sigma) of a VP eps-prior in EDM coordinates (Karras et al. 2022, sec. 2 and table 1, "VP").

    Args:
        prior: an aps Prior (eps(x_t, t) on a ContinuousSchedule or DiscreteSchedule).

    Every call of `forward` is one eps evaluation per sample; `nfe` counts them (per sample).

    Example:
        >>> from aps.priors import GaussianMixturePrior
        >>> prior = GaussianMixturePrior(torch.zeros(1, 2), torch.ones(1), torch.ones(1))
        >>> D = EDMDenoiser(prior)
        >>> D(torch.ones(3, 2), torch.tensor(1.0)).shape   # N(0, I) prior: D = x / (1 + sigma^2)
        torch.Size([3, 2])
    """

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        self.nfe = 0
        sched = prior.schedule
        if isinstance(sched, DiscreteSchedule):
            # log sigma_k = -lambda_k / 2, increasing in k: the table t(sigma) interpolates on.
            self.register_buffer("_log_sigmas", -0.5 * sched._lam.clone(), persistent=False)
        elif not isinstance(sched, ContinuousSchedule):
            raise TypeError(f"EDMDenoiser supports Continuous and Discrete schedules, not {type(sched).__name__}")

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(sigma at the data end, sigma at the noise end) of the prior's schedule."""
        s = self.prior.schedule
        return float(torch.exp(torch.tensor(-0.5 * s.lambda_max))), float(torch.exp(torch.tensor(-0.5 * s.lambda_min)))

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Native time t(sigma) of the prior's schedule, same shape as sigma (float64 in, float64 out)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        sched = self.prior.schedule
        lam = -2.0 * torch.log(sigma)
        if isinstance(sched, ContinuousSchedule):
            lam = lam.clamp(sched.lambda_min, sched.lambda_max)
            return sched._t_of_lambda(lam)
        log_s = self._log_sigmas.to(sigma.device)
        x = torch.log(sigma).clamp(float(log_s[0]), float(log_s[-1]))
        hi = torch.searchsorted(log_s, x.reshape(-1).contiguous()).clamp(1, len(log_s) - 1).reshape(x.shape)
        lo = hi - 1
        frac = (x - log_s[lo]) / (log_s[hi] - log_s[lo])
        return lo.to(torch.float64) + frac

    def vp_time_and_scale(self, sigma):
        """(t(sigma), alpha = 1/sqrt(1 + sigma^2)) for the conversion x_vp = alpha * x_edm."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.t_of_sigma(sigma), 1.0 / torch.sqrt(1.0 + sigma ** 2)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; sigma): x (B, *event) in EDM coordinates, sigma a scalar or (B,) -> (B, *event)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        t, alpha = self.vp_time_and_scale(sigma)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        eps = self.prior.eps(x * _bcast(alpha, x), t.to(x.dtype))
        self.nfe += 1
        return x - _bcast(sigma, x) * eps


def to_edm(x_vp: torch.Tensor, sigma) -> torch.Tensor:
    """x_edm = x_vp * sqrt(1 + sigma^2) (= x_vp / sqrt(abar))."""
    return x_vp * _bcast(torch.sqrt(1.0 + torch.as_tensor(sigma, dtype=torch.float64) ** 2), x_vp)


def to_vp(x_edm: torch.Tensor, sigma) -> torch.Tensor:
    """x_vp = x_edm / sqrt(1 + sigma^2)."""
    return x_edm / _bcast(torch.sqrt(1.0 + torch.as_tensor(sigma, dtype=torch.float64) ** 2), x_edm)
