"""The exact consistency function of a prior: its probability-flow ODE solved to tight tolerance.

A consistency model f(x, sigma) maps a point on a PF-ODE trajectory at noise level sigma to the
trajectory's end at sigma_min (Song et al. 2023, "Consistency Models", sec. 3). For a prior whose
denoiser is exact (the Gaussian mixture) the ODE itself is that function. In EDM coordinates
(Karras et al. 2022, eq. 1 with sigma(t) = t) and in u = log sigma the ODE reads

    dx/du = sigma dx/dsigma = x - D(x; sigma),

which is smooth in u except near the boundaries between the basins of two modes, where
trajectories separate. A fixed-step classical RK4 on a uniform grid in u converges at 4th order.
Measured from sigma = 80 on the MCGdiff d = 2 mixture (1,000 draws): 64 steps agree with 1,024 to
2e-3 at worst; 24 steps agree with 512 to a median 1.6e-3 and a 99th percentile 0.05 (closer from
lower sigma). The solve is differentiable (plain autograd through the steps), which the CM solvers need.
"""
from __future__ import annotations

import torch

from .edm import SIGMA_MIN, EDMDenoiser, _bcast


class MixtureEDMDenoiser(torch.nn.Module):
    """D(x; sigma) of a Gaussian mixture with isotropic components, in closed form in EDM coordinates.

    The same function as EDMDenoiser(GaussianMixturePrior) (checked in the tests), written for speed:
    p_sigma = sum_k w_k N(mu_k, (v_k + sigma^2) I), so with c_k = v_k / (v_k + sigma^2)

        D(x; sigma) = sum_k r_k(x) (c_k x + (1 - c_k) mu_k),   r = softmax_k(log w_k + log N(x; mu_k, (v_k + sigma^2) I))

    and the squared distances come from one matmul, (M, K) work instead of (M, K, d).
    """

    def __init__(self, prior):
        super().__init__()
        v = prior.variances
        if not torch.allclose(v, v[:, :1].expand_as(v)):
            raise ValueError("MixtureEDMDenoiser needs isotropic components (one variance per component)")
        self.register_buffer("mu", prior.means)
        self.register_buffer("mu_sq", prior.means.pow(2).sum(1))
        self.register_buffer("v", v[:, 0])
        self.register_buffer("log_w", prior.log_weights)
        self.d = prior.means.shape[1]
        self.nfe = 0

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s2 = sigma.reshape(-1, 1) ** 2 if sigma.ndim else sigma ** 2  # (M, 1) or scalar
        var = self.v + s2  # (M|1, K)
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.mu.T + self.mu_sq  # (M, K)
        r = torch.softmax(self.log_w - 0.5 * self.d * torch.log(var) - 0.5 * dist / var, dim=1)
        c = self.v / var
        self.nfe += 1
        return (r * c).sum(1, keepdim=True) * x + (r * (1 - c)) @ self.mu


def fast_denoiser(prior):
    """MixtureEDMDenoiser for a mixture of isotropic Gaussians, else the generic EDMDenoiser: the same D."""
    v = getattr(prior, "variances", None)
    if v is not None and getattr(prior, "means", None) is not None and torch.allclose(v, v[:, :1].expand_as(v)):
        return MixtureEDMDenoiser(prior)
    return EDMDenoiser(prior)


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
        fast: use MixtureEDMDenoiser when the prior is a mixture of isotropic Gaussians.
    """

    def __init__(self, prior, steps: int = 64, sigma_min: float = SIGMA_MIN, fast: bool = True):
        self.denoiser = fast_denoiser(prior) if fast else EDMDenoiser(prior)
        self.steps, self.sigma_min = int(steps), float(sigma_min)
        self.eps_per_call = 4 * self.steps

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return pf_ode(self.denoiser, x, sigma, self.sigma_min, self.steps)

    def config(self) -> dict:
        return {"type": "exact_ode", "steps": self.steps, "sigma_min": self.sigma_min, "solver": "rk4 in log sigma"}
