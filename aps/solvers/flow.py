"""A trained APS flow behind the solver interface, so that one benchmark loop runs every method.

    solver = FlowSolver(aps.load("runs/d2"))
    x = solver.sample(prior, operator, y, n, generator)   # one flow pass per sample; solver.log_q (B, n)

The prior and generator are not used: the flow is seeded per measurement (aps.sampling), so sample j of
measurement i is the same in any batch.
"""
from __future__ import annotations

import time

import torch

from .base import Solver


class FlowSolver(Solver):
    """Samples of q(x | y) from a PosteriorSampler. Args: sampler, seed (the sampler's per-measurement seed),
    chunk (flow evaluations per pass), temperature (of the latents, aps.sampling; 1 = the flow itself)."""

    name = "aps"

    def __init__(self, sampler, seed: int = 0, chunk: int = 65536, progress: bool = False, temperature: float = 1.0):
        super().__init__(progress)
        self.sampler, self.seed, self.chunk = sampler, int(seed), int(chunk)
        self.temperature = sampler.check_temperature(temperature)
        self.log_q: torch.Tensor | None = None
        self.first_index = 0  # measurement index of y[0] for the per-measurement seeds

    def sample(self, prior, operator, y, n, generator=None, budget_s=None):
        device = self.sampler.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        x, self.log_q = self.sampler.sample(y.to(device), n, seed=self.seed, chunk=self.chunk,
                                            first_index=self.first_index, temperature=self.temperature)
        sync()
        seconds = time.perf_counter() - t0
        self.stats = {"nfe": 1, "seconds": seconds, "seconds_per_sample": seconds / (len(y) * n), "batch": len(y) * n,
                      "stopped": None}
        return x

    def config(self):
        return {"name": self.name, "step": self.sampler.meta.get("step"), "temperature": self.temperature,
                **self.sampler.meta.get("flow", {})}
