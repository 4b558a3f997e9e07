"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) from an aps Prior.

For x0 from the data, n ~ U{0..N-2} on the Karras grid s_0 = s_min < ... < s_{N-1} = s_max:

    x_{n+1}  = x0 + s_{n+1} z
    x_hat_n  = Heun step of the teacher's PF-ODE dx/dsigma = (x - D(x; sigma)) / sigma, s_{n+1} -> s_n
    loss     = d(f_theta(x_{n+1}, s_{n+1}), f_target(x_hat_n, s_n))        (per sample; the loop reduces)

d is the squared L2 norm (per pixel mean) or the pseudo-Huber metric sqrt(||a - b||^2 + c^2) - c with
c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models").
f_target is the EMA of the student (mu = 0.95 in CD) or, with ema = 0, the student under stop-grad.
The teacher's D is the prior's EDM denoiser (aps.solvers.edm).
"""
from __future__ import annotations

import copy
import math

import torch

from .edm import SIGMA_MAX, SIGMA_MIN, EDMDenoiser, _bcast, karras_sigmas

METRICS = ("l2", "pseudo_huber")


def heun_step(D, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Heun step of the EDM PF-ODE from sigma to sigma_next (each (B,)) (Karras et al. 2022, Alg. 1)."""
    d = (x - D(x, sigma)) / _bcast(sigma, x)
    x_euler = x + _bcast(sigma_next - sigma, x) * d
    d2 = (x_euler - D(x_euler, sigma_next)) / _bcast(sigma_next, x)
    return x + _bcast(sigma_next - sigma, x) * 0.5 * (d + d2)


class ConsistencyDistillation:
    """CD loss and target network for a student ConsistencyModel distilled from a prior.

    Args:
        student: ConsistencyModel (trained). prior: the frozen teacher (aps Prior).
        n_steps: N of the Karras grid (18 for CIFAR-10 in the paper, 40 for ImageNet/LSUN).
        ema: target EMA rate mu (0.95; 0 = stop-grad of the student). metric: "l2" or "pseudo_huber".
    """

    def __init__(self, student, prior, n_steps: int = 18, ema: float = 0.95, metric: str = "l2",
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        self.student, self.teacher = student, EDMDenoiser(prior)
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.ema, self.metric, self.n_steps = float(ema), metric, int(n_steps)
        self.sigmas = karras_sigmas(n_steps, sigma_min, sigma_max).flip(0)  # ascending: s_0 = s_min

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a - b).flatten(1).pow(2)
        if self.metric == "l2":
            return sq.mean(1)
        c = 0.00054 * math.sqrt(sq.shape[1])
        return (sq.sum(1) + c ** 2).sqrt() - c

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample CD loss (B,) for clean data x0 (B, C, H, W)."""
        b = x0.shape[0]
        n = torch.randint(0, self.n_steps - 1, (b,), generator=generator)
        s_n, s_next = self.sigmas[n].to(x0.device), self.sigmas[n + 1].to(x0.device)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_next = x0 + _bcast(s_next, x0) * z
        with torch.no_grad():
            x_hat = heun_step(self.teacher, x_next, s_next, s_n)
            target = self.target(x_hat, s_n)
        return self.distance(self.student(x_next, s_next), target)

    @torch.no_grad()
    def update_target(self) -> None:
        """target <- mu * target + (1 - mu) * student (after each optimiser step)."""
        for p_t, p_s in zip(self.target.parameters(), self.student.parameters()):
            p_t.mul_(self.ema).add_(p_s.detach(), alpha=1 - self.ema)
        for b_t, b_s in zip(self.target.buffers(), self.student.buffers()):
            b_t.copy_(b_s)
