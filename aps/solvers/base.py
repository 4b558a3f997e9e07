"""The solver interface: posterior samples from a frozen prior for measurements y, with their cost.

    x = solver.sample(prior, operator, y, n, generator)      # y (B, *y_shape) -> x (B, n, *event)
    solver.stats                                             # NFE per sample and seconds, of the last call
    solver.sample(..., budget_s=60)                          # stop after ~60 s with the best x so far

A budget is checked once per step: a solver past it stops, returns its current estimate of x0 (Tweedie's
for DPS, the CM's for the CM solvers) and records where it stopped in `stats["stopped"]`.

Cost is counted per sample (every sample of the batch is one evaluation): `eps_fwd` network (eps or
denoiser) forwards, `eps_bwd` backward passes through it, `cm_fwd`/`cm_bwd` consistency-model
forwards and backwards (a learned CM is one network; the exact mixture CM hides an ODE solve, whose
eps evaluations are counted separately as `ode_eps`). `nfe` is the headline: forward plus backward
network evaluations (a backward pass costs about as much as a forward one).

Randomness comes from one generator for the whole batch, so sample j of measurement i depends on
the batch it ran in (not yet seeded per sample, as the flow sampler is; the rows' dynamics are
independent, only their noise draws are shared out of one stream).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


class Solver:
    """Base class: subclasses implement `_sample(prior, operator, y, generator) -> x (M, *event)`,
    where y has been repeated n times (M = B * n rows); `sample` does the bookkeeping."""

    name = "solver"

    def __init__(self, progress: bool = False):
        self.progress = progress
        self.stats: dict = {}
        self._counts: dict = {}
        self._deadline: float | None = None
        self._stopped: str | None = None

    def count(self, key: str, k: int = 1) -> None:
        """Add k evaluations per sample to counter `key` (eps_fwd, eps_bwd, cm_fwd, cm_bwd, ode_eps)."""
        self._counts[key] = self._counts.get(key, 0) + k

    def sample(self, prior, operator, y: torch.Tensor, n: int, generator: torch.Generator | None = None,
               budget_s: float | None = None):
        """n posterior samples per measurement: y (B, *y_shape) -> x (B, n, *prior.event_shape).

        The rows of the batch are independent: every per-sample loss is summed before its gradient, so
        the gradient of row j depends on row j alone. budget_s: wall-clock seconds after which the solver
        stops early with what it has (stats["stopped"] says where); None: no limit.
        """
        y = operator.check_y(y)
        b = y.shape[0]
        y_rep = y.repeat_interleave(n, dim=0)  # (B * n, *y_shape): row i*n + j is sample j of measurement i
        self._counts, self._stopped = {}, None
        t0 = time.perf_counter()
        self._deadline = None if budget_s is None else t0 + float(budget_s)
        x = self._sample(prior, operator, y_rep, generator)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # the clock stops when the samples exist, not when they are queued
        seconds = time.perf_counter() - t0
        c = dict(self._counts)
        nfe = c.get("eps_fwd", 0) + c.get("eps_bwd", 0) + c.get("cm_fwd", 0) + c.get("cm_bwd", 0)
        self.stats = {**c, "nfe": nfe, "seconds": seconds, "seconds_per_sample": seconds / (b * n),
                      "batch": b * n, "stopped": self._stopped}
        return x.detach().reshape(b, n, *prior.event_shape)

    def out_of_time(self, where: str) -> bool:
        """True once the budget of this call is spent; records `where` ("step 40/1000") as the stopping point."""
        if self._deadline is None or time.perf_counter() < self._deadline:
            return False
        self._stopped = self._stopped or where
        return True

    def _sample(self, prior, operator, y, generator):
        raise NotImplementedError

    def config(self) -> dict:
        """The solver's name and options (recorded beside results)."""
        return {"name": self.name}


def randn(shape, generator, dtype, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (a CPU generator may drive a GPU run), moved to device."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=source).to(device)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


def measurement_loss(operator, y: torch.Tensor, x0: torch.Tensor, squared: bool = False, tau: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample data misfit of an x0 estimate, (M,).

    Gaussian operators (sigma_y set): ||y - A(x0)||_2 (or its square). A neural operator with a
    categorical likelihood (sigma_y None, e.g. the classifier): the cross-entropy -log p(y | x0 + tau n),
    with tau n fresh Gaussian noise (Xu et al. 2024, sec. 4.1: the noise keeps a network operator from
    being fooled by an adversarial x0; tau = 0.2 in their code).
    """
    if getattr(operator, "sigma_y", None) is None:
        if tau > 0:
            x0 = x0 + tau * randn_like(x0, generator)
        y = (y.round() if y.is_floating_point() else y).long()
        return F.cross_entropy(operator(x0), y, reduction="none")
    r = (y - operator(x0)).flatten(1).pow(2).sum(1)
    return r if squared else r.clamp_min(1e-30).sqrt()


def prior_dtype(prior) -> torch.dtype:
    """The floating dtype the prior computes in (its first floating buffer or parameter)."""
    for t in list(prior.buffers()) + list(prior.parameters()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
