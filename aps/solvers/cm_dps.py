"""CM solver I: DPS with a consistency-model x0 (Xu et al. 2024, "Consistency Model is an Effective
Posterior Sample Approximation for Diffusion Inverse Solvers", sec. 4.1, "Proposed I").

Euler-ancestral sampling on the Karras grid in EDM coordinates, where the guidance gradient is taken
through the consistency model's x0 (a sample of p(x0 | x_t) on the data manifold) instead of
Tweedie's mean:

    x = 80 n;  for sigma_i on the Karras grid (then 0):
        x0_hat = D(x; sigma_i)                                   (no grad: drives the ancestral step)
        x0_cm  = CM(x, sigma_i)                                  (grad wrt x)
        L      = ||y - A(x0_cm)||_2        or   CE(A(x0_cm + tau n), y) for a neural operator
        x      = EulerAncestral(x, x0_hat, sigma_i -> sigma_{i+1}) - zeta * sigma_i * grad_x L

The CM output is not clamped inside the guidance (a clamped -1 background kills the gradient).
Cost per sample: N denoiser forwards + N CM forwards and backwards.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import Solver, measurement_loss, prior_dtype, randn, randn_like
from .edm import SIGMA_MAX, SIGMA_MIN, karras_sigmas
from .exact_cm import fast_denoiser


def euler_ancestral(x, x0, sigma: float, sigma_next: float, generator):
    """One Euler-ancestral step of the EDM ODE/SDE from sigma to sigma_next (k-diffusion's sample_euler_ancestral)."""
    if sigma_next == 0:
        return x0
    sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return x0 + (x - x0) * (sigma_down / sigma) + sigma_up * randn_like(x, generator)


class CMDPS(Solver):
    """CM solver I. Args: cm (CM(x, sigma) -> x0), zeta, steps (Karras grid size, 1000 in the paper),
    tau (noise on x0_cm for neural operators), sigma_min/sigma_max of the grid."""

    name = "cm1"

    def __init__(self, cm, zeta: float = 1.0, steps: int = 1000, tau: float = 0.2, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, progress: bool = False):
        super().__init__(progress)
        self.cm, self.zeta, self.steps, self.tau = cm, float(zeta), int(steps), float(tau)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def _sample(self, prior, operator, y, generator):
        D = fast_denoiser(prior)  # the prior's D(x; sigma) (closed form for an isotropic mixture)
        sigmas = karras_sigmas(self.steps, self.sigma_min, self.sigma_max).tolist() + [0.0]
        dtype = prior_dtype(prior)
        x = self.sigma_max * randn((y.shape[0], *prior.event_shape), generator, dtype, y.device)
        for i in tqdm(range(self.steps), disable=not self.progress, desc="cm1"):
            s, s_next = sigmas[i], sigmas[i + 1]
            with torch.no_grad():
                x0_hat = D(x, s)
            x = x.detach().requires_grad_(True)
            loss = measurement_loss(operator, y, self.cm(x, s), tau=self.tau, generator=generator)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            self.count("eps_fwd")
            self.count("cm_fwd")
            self.count("cm_bwd")
            self.count("ode_eps", getattr(self.cm, "eps_per_call", 0))
            with torch.no_grad():
                if i + 1 < self.steps and self.out_of_time(f"step {i + 1}/{self.steps}"):
                    return self.cm(x.detach(), s)  # the CM's x0 at this step: the best estimate the run has
                x = euler_ancestral(x, x0_hat, s, s_next, generator) - self.zeta * s * grad
        return x.detach()

    def config(self):
        return {"name": self.name, "zeta": self.zeta, "steps": self.steps, "tau": self.tau,
                "cm": getattr(self.cm, "config", lambda: {"type": type(self.cm).__name__})()}
