"""Diffusion posterior sampling (Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy
Inverse Problems", Algorithm 1) on an aps Prior.

Ancestral DDPM steps on the prior's VP schedule, each followed by a step down the gradient, taken
through the network, of the misfit of Tweedie's estimate:

    x0_hat = (x_t - s_t eps(x_t, t)) / a_t
    x_{t-1} = ancestral step(x_t, x0_hat) - zeta * grad_{x_t} ||y - A(x0_hat)||_2

The paper writes the last term as zeta_t grad ||y - A(x0_hat)||^2 with zeta_t = zeta' / ||y - A(x0_hat)||;
since grad ||r||^2 = 2 ||r|| grad ||r||, that is zeta = 2 zeta' times the gradient of the unsquared norm,
which is what the authors' code (guided_diffusion/condition_methods.py, PosteriorSampling) computes.
For a categorical operator (the classifier) the misfit is the cross-entropy -log p(y | x0_hat).

Grid: every timestep of a discrete schedule (1000 for DDPM) or `steps` of them evenly spaced; a
uniform grid of `steps` times for a continuous schedule. Cost per sample: `steps` eps forwards and
as many backwards.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..schedules import ContinuousSchedule, DiscreteSchedule
from .exact_cm import MixtureEDMDenoiser, fast_denoiser
from .base import Solver, measurement_loss, prior_dtype, randn, randn_like


def vp_time_grid(schedule, steps: int | None) -> torch.Tensor:
    """Decreasing native times (N,) from the noise end to the data end (float64)."""
    if isinstance(schedule, DiscreteSchedule):
        n_t = schedule.num_timesteps
        steps = n_t if steps is None else int(steps)
        return torch.linspace(n_t - 1, 0, steps, dtype=torch.float64).round()
    steps = 1000 if steps is None else int(steps)
    return torch.linspace(schedule.t_noise, schedule.t_data, steps, dtype=torch.float64)


class DPS(Solver):
    """DPS sampler. Args: zeta (step size on grad ||y - A(x0_hat)||_2), steps (None: 1000 / every timestep)."""

    name = "dps"

    def __init__(self, zeta: float = 1.0, steps: int | None = None, progress: bool = False):
        super().__init__(progress)
        self.zeta, self.steps = float(zeta), steps

    def _sample(self, prior, operator, y, generator):
        sched = prior.schedule
        times = vp_time_grid(sched, self.steps)
        alphas, sigmas = sched.alpha_sigma(times)
        dtype = prior_dtype(prior)
        fast = fast_denoiser(prior) if isinstance(sched, ContinuousSchedule) else None
        fast = fast if isinstance(fast, MixtureEDMDenoiser) else None
        x = randn((y.shape[0], *prior.event_shape), generator, dtype, y.device)
        for i in tqdm(range(len(times)), disable=not self.progress, desc="dps"):
            a_t, s_t = float(alphas[i]), float(sigmas[i])
            x = x.detach().requires_grad_(True)
            if fast is not None:  # Tweedie in EDM coordinates: x0_hat = D(x_t / a_t; s_t / a_t), the same function
                x0 = fast(x / a_t, s_t / a_t)
            else:
                eps = prior.eps(x, times[i].to(x.dtype).expand(x.shape[0]))
                x0 = (x - s_t * eps) / a_t
            loss = measurement_loss(operator, y, x0)
            (grad,) = torch.autograd.grad(loss.sum(), x)  # rows are independent: row j's gradient is its own
            self.count("eps_fwd")
            self.count("eps_bwd")
            with torch.no_grad():
                if i + 1 < len(times) and self.out_of_time(f"step {i + 1}/{len(times)}"):
                    return x0.detach()  # Tweedie's estimate at this step: the best x0 the run has
                if i + 1 < len(times):
                    # DDPM posterior q(x_s | x_t, x0) with x0 := x0_hat (Ho et al. 2020, eq. 6-7, any s < t).
                    a_s, s_s = float(alphas[i + 1]), float(sigmas[i + 1])
                    a_ts = a_t / a_s
                    s2_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
                    mean = a_ts * s_s ** 2 / s_t ** 2 * x + a_s * s2_ts / s_t ** 2 * x0
                    x_next = mean + (s2_ts * s_s ** 2 / s_t ** 2) ** 0.5 * randn_like(x, generator)
                else:
                    x_next = x0  # the last DDPM step returns the posterior mean at t = 0
                x = x_next - self.zeta * grad
        return x.detach()

    def config(self):
        return {"name": self.name, "zeta": self.zeta, "steps": self.steps}
