"""Denoising diffusion restoration models (Kawar et al. 2022, "Denoising Diffusion Restoration Models",
eq. 7-8 and the authors' `efficient_generalized_steps`) for a linear operator with Gaussian noise.

DDRM works in the spectral coordinates of A = U diag(s) V^T: x_bar = V^T x, y_bar_i = (U^T y)_i / s_i,
where coordinate i of y_bar is x_bar_i plus noise of std c_i = sigma_y / s_i. In the variance-exploding
view of the prior (x_t = x0 + sigma_t n, sigma_t = s_t / alpha_t of its VP schedule) each step draws

    missing (s_i = 0):     x_bar' = x0_bar + sqrt(1 - eta^2) sigma' (x_bar - x0_bar) / sigma_t + eta sigma' n
    less noisy than y      x_bar' = x0_bar + sqrt(1 - eta^2) sigma' (y_bar - x0_bar) / c_i     + eta sigma' n
      (sigma' < c_i):
    noisier than y         x_bar' = (1 - eta_b) x0_bar + eta_b y_bar + sqrt(sigma'^2 - eta_b^2 c_i^2) n
      (sigma' > c_i):

with x0 = D(x; sigma_t) the prior's denoiser (Tweedie's E[x0 | x_t]), sigma' the next level and n fresh
N(0, 1) noise; it starts from x_bar_T = y_bar + sqrt(sigma_T^2 - c_i^2) n where sigma_T > c_i (else
sigma_T n) and returns the last denoiser output. The paper's defaults are eta = 0.85, eta_b = 1 on 20
steps of the DDPM schedule.

DDRM is not exact even for a Gaussian prior: the denoiser ignores y, so with noisy measurements its
samples are too narrow and their mean sits between y_bar and the posterior mean. It is exact in the
limit it was built for: an isotropic Gaussian prior (spectral coordinates independent) and noiseless y.

A is had as a dense matrix (`operator.matrix()`, built from the identity basis for an image operator),
so this suits vector problems and small images (32 x 32 x 3 = 3,072 pixels: a 3,072^2 SVD).
Cost per sample: `steps` denoiser (eps) forwards, no backward.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..errors import ApsError
from ..operators import LinearOperator
from .base import Solver, prior_dtype, randn
from .dps import vp_time_grid
from .exact_cm import MixtureEDMDenoiser, fast_denoiser


def spectral(operator, rtol: float = 1e-10):
    """(U (dy, dy), s (r,), V^T (D, D)) of the operator's dense matrix (float64), keeping the r singular
    values above rtol * s_max (the rest count as missing directions)."""
    if not isinstance(operator, LinearOperator) or getattr(operator, "sigma_y", None) is None:
        raise ApsError(f"DDRM needs a linear operator with Gaussian noise; {operator.name!r} is not one")
    a = operator.matrix().double()
    u, s, vt = torch.linalg.svd(a, full_matrices=True)
    r = int((s > rtol * s.max()).sum()) if s.numel() else 0
    return u, s[:r], vt


class DDRM(Solver):
    """DDRM sampler. Args: eta (noise of the missing and less-noisy-than-y coordinates, in [0, 1]),
    eta_b (weight of y_bar while the sample is noisier than y, in [0, 1]), steps (None: every timestep of
    a discrete schedule or 1000 of a continuous one; 20 in the paper)."""

    name = "ddrm"

    def __init__(self, eta: float = 0.85, eta_b: float = 1.0, steps: int | None = 20, progress: bool = False):
        super().__init__(progress)
        if not (0.0 <= eta <= 1.0 and 0.0 <= eta_b <= 1.0):
            raise ApsError(f"DDRM needs eta and eta_b in [0, 1], got eta={eta}, eta_b={eta_b}")
        self.eta, self.eta_b, self.steps = float(eta), float(eta_b), steps

    def _sample(self, prior, operator, y, generator):
        u, s, vt = spectral(operator)
        dtype, device = prior_dtype(prior), y.device
        r, dim = s.numel(), math.prod(prior.event_shape)
        m = y.shape[0]
        c = (operator.sigma_y / s).to(dtype=dtype, device=device)  # (r,) noise std of y_bar
        y_bar = ((y.flatten(1).double() @ u[:, :r].to(device)) / s.to(device)).to(dtype)  # (M, r)
        vt = vt.to(dtype=dtype, device=device)

        times = vp_time_grid(prior.schedule, self.steps)
        alphas, sigmas_vp = prior.schedule.alpha_sigma(times)
        sigmas = (sigmas_vp / alphas).tolist() + [0.0]  # VE noise levels, then 0 (return the denoiser output)
        fast = fast_denoiser(prior)
        fast = fast if isinstance(fast, MixtureEDMDenoiser) else None

        def denoise(x_bar, i):
            x = (x_bar @ vt).reshape(m, *prior.event_shape)  # V x_bar
            if fast is not None:
                x0 = fast(x, sigmas[i])
            else:  # the VP denoiser at x_vp = alpha_t x (EDM coordinates, edm.py)
                x0 = prior.denoise(float(alphas[i]) * x, times[i].to(dtype).expand(m).to(device))
            self.count("eps_fwd")
            return x0.reshape(m, dim) @ vt.T  # V^T x0

        # x_bar_T: y_bar plus the rest of the noise where y is less noisy than sigma_T, pure noise elsewhere.
        s_t = sigmas[0]
        noise = randn((m, dim), generator, dtype, device)
        x_bar = s_t * noise
        seen = c < s_t
        x_bar[:, :r] = torch.where(seen, y_bar + (s_t ** 2 - c ** 2).clamp_min(0).sqrt() * noise[:, :r],
                                   x_bar[:, :r])
        eta, eta_b = self.eta, self.eta_b
        for i in tqdm(range(len(times)), disable=not self.progress, desc="ddrm"):
            with torch.no_grad():
                x0 = denoise(x_bar, i)
                s_t, s_next = sigmas[i], sigmas[i + 1]
                if s_next == 0:
                    x_bar = x0
                    break
                n = randn((m, dim), generator, dtype, device)
                new = x0 + (1 - eta ** 2) ** 0.5 * s_next * (x_bar - x0) / s_t + eta * s_next * n  # missing
                x0_o, n_o = x0[:, :r], n[:, :r]
                after = x0_o + (1 - eta ** 2) ** 0.5 * s_next * (y_bar - x0_o) / c + eta * s_next * n_o
                before = ((1 - eta_b) * x0_o + eta_b * y_bar
                          + (s_next ** 2 - eta_b ** 2 * c ** 2).clamp_min(0).sqrt() * n_o)
                new[:, :r] = torch.where(s_next < c, after, before)
                x_bar = new
        return (x_bar @ vt).reshape(m, *prior.event_shape)

    def config(self):
        return {"name": self.name, "eta": self.eta, "eta_b": self.eta_b, "steps": self.steps}
