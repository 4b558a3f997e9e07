"""CM solver II: consistency-model inversion (Xu et al. 2024, sec. 4.2, "Proposed II").

GAN-inversion style, with the CM as the generator, in two stages:

    x_T = 80 n;  Adam(lr_1) on x_T for K_1 steps:  min l(A(CM(x_T, 80)), y);    x0 = CM(x_T, 80)
    z ~ N(0, I); Adam(lr_2) on z for K_2 steps:    min l(A(CM(x0 + sqrt(t_s^2 - s_min^2) z, t_s)), y)
    return CM(x0 + sqrt(t_s^2 - s_min^2) z, t_s)

The second stage re-noises x0 to t_s ~ 4.36 and searches near it, which keeps the result on the CM's
image of the data manifold. l is ||y - A(x)||_2 for Gaussian operators, the cross-entropy (with tau
noise on x) for a neural one. Cost per sample: K_1 + K_2 CM forwards and backwards (+2 forwards).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .base import Solver, measurement_loss, prior_dtype, randn
from .edm import SIGMA_MAX, SIGMA_MIN


class CMInversion(Solver):
    """CM solver II. Args: cm, k1/k2 (Adam steps), lr1/lr2, t_s, tau (neural operators), sigma_min/max."""

    name = "cm2"

    def __init__(self, cm, k1: int = 50, k2: int = 50, lr1: float = 0.1, lr2: float = 1e-3, t_s: float = 4.36,
                 tau: float = 0.2, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, progress: bool = False):
        super().__init__(progress)
        self.cm, self.k1, self.k2, self.lr1, self.lr2 = cm, int(k1), int(k2), float(lr1), float(lr2)
        self.t_s, self.tau, self.sigma_min, self.sigma_max = float(t_s), float(tau), float(sigma_min), float(sigma_max)

    def _fit(self, param, make_x, operator, y, sigma, lr, k, generator, desc, deadline=None):
        opt = torch.optim.Adam([param], lr=lr)
        for i in tqdm(range(k), disable=not self.progress, desc=desc):
            if self.out_of_time(f"{desc} step {i}/{k}") or (deadline is not None and time.perf_counter() > deadline):
                self._stopped = self._stopped or f"{desc} step {i}/{k}"
                return
            opt.zero_grad(set_to_none=True)
            # Summed per-row losses: Adam's update is per coordinate, so rows stay independent.
            measurement_loss(operator, y, self.cm(make_x(param), sigma), tau=self.tau, generator=generator).sum().backward()
            opt.step()
            self.count("cm_fwd")
            self.count("cm_bwd")
            self.count("ode_eps", getattr(self.cm, "eps_per_call", 0))

    def _sample(self, prior, operator, y, generator):
        dtype = prior_dtype(prior)
        shape = (y.shape[0], *prior.event_shape)
        x_T = (self.sigma_max * randn(shape, generator, dtype, y.device)).requires_grad_(True)
        # under a budget, stage 1 gets its share by steps (k1 of k1 + k2), so that stage 2 still runs
        half = None if self._deadline is None else (
            time.perf_counter() + (self._deadline - time.perf_counter()) * self.k1 / max(self.k1 + self.k2, 1))
        self._fit(x_T, lambda v: v, operator, y, self.sigma_max, self.lr1, self.k1, generator, "cm2 stage 1", half)
        with torch.no_grad():
            x0 = self.cm(x_T.detach(), self.sigma_max)
        c = (self.t_s ** 2 - self.sigma_min ** 2) ** 0.5
        z = randn(shape, generator, dtype, y.device).requires_grad_(True)
        self._fit(z, lambda v: x0 + c * v, operator, y, self.t_s, self.lr2, self.k2, generator, "cm2 stage 2")
        with torch.no_grad():
            out = self.cm(x0 + c * z.detach(), self.t_s)
        self.count("cm_fwd", 2)
        self.count("ode_eps", 2 * getattr(self.cm, "eps_per_call", 0))
        return out

    def config(self):
        return {"name": self.name, "k1": self.k1, "k2": self.k2, "lr1": self.lr1, "lr2": self.lr2, "t_s": self.t_s,
                "tau": self.tau, "cm": getattr(self.cm, "config", lambda: {"type": type(self.cm).__name__})()}
