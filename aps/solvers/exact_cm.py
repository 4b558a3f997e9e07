"""The exact consistency function of a prior: its probability-flow ODE solved to tight tolerance.

A consistency model f(x, sigma) maps a point on a PF-ODE trajectory at noise level sigma to the
trajectory's end at sigma_min (Song et al. 2023, "Consistency Models", sec. 3). For a prior whose
denoiser is exact (the Gaussian mixture) the ODE itself is that function. In EDM coordinates
(Karras et al. 2022, eq. 1 with sigma(t) = t) and in u = log sigma the ODE reads

    dx/du = sigma dx/dsigma = x - D(x; sigma),

which is smooth in u (its Jacobian is bounded by about 1 for unit-variance components), so a
fixed-step classical RK4 on a uniform grid in u converges fast: 64 steps from 80 to 0.002 agree with
1024 steps to ~1e-6 on the MCGdiff mixtures (tests/test_solvers.py). The solve is differentiable
(plain autograd through the steps), which the CM solvers need.
"""
from __future__ import annotations

import math

import torch

from .edm import SIGMA_MIN, EDMDenoiser, _bcast


def pf_ode(denoiser: EDMDenoiser, x: torch.Tensor, sigma_from, sigma_to, steps: int) -> torch.Tensor:
    """Solve dx/du = x - D(x; e^u) from sigma_from to sigma_to (scalars or (B,)) with `steps` RK4 steps.

    x (B, *event) -> (B, *event). Each sample has its own uniform grid in log sigma; where
    sigma_from == sigma_to the step is 0 and x comes back unchanged (bit for bit).
    Cost: 4 * steps denoiser evaluations.
    """
    u0 = torch.log(torch.as_tensor(sigma_from, dtype=torch.float64, device=x.device))
    u1 = torch.log(torch.as_tensor(sigma_to, dtype=torch.float64, device=x.device))
    u0, u1 = torch.broadcast_tensors(u0, u1)
    h = (u1 - u0) / steps
    hb = _bcast(h, x)

    def f(x, u):
        return x - denoiser(x, torch.exp(u))

    u = u0
    for _ in range(steps):
        k1 = f(x, u)
        k2 = f(x + 0.5 * hb * k1, u + 0.5 * h)
        k3 = f(x + 0.5 * hb * k2, u + 0.5 * h)
        k4 = f(x + hb * k3, u + h)
        x = x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        u = u + h
    return x


class ExactConsistency:
    """CM(x, sigma) -> x0: the prior's PF-ODE from (x, sigma) to sigma_min, as a consistency model.

    Same call signature as a learned `ConsistencyModel`: x (B, *event) in EDM coordinates, sigma a
    scalar or (B,) -> (B, *event). The boundary condition CM(x, sigma_min) = x holds exactly.

    Args:
        prior: an aps Prior with an exact eps (the GaussianMixturePrior).
        steps: RK4 steps per call (4 * steps eps evaluations, `eps_per_call`).
        sigma_min: where trajectories end (0.002, as in Song et al. 2023).
    """

    def __init__(self, prior, steps: int = 64, sigma_min: float = SIGMA_MIN):
        self.denoiser = EDMDenoiser(prior)
        self.steps, self.sigma_min = int(steps), float(sigma_min)
        self.eps_per_call = 4 * self.steps

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return pf_ode(self.denoiser, x, sigma, self.sigma_min, self.steps)

    def config(self) -> dict:
        return {"type": "exact_ode", "steps": self.steps, "sigma_min": self.sigma_min, "solver": "rk4 in log sigma"}
