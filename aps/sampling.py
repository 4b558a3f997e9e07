"""Posterior sampling from a trained flow: `aps.load(path).sample(y, n)`.

Sampling is seeded per measurement: the latents of measurement i come from a generator seeded with
(seed, i), so sample j of measurement i is the same whatever the chunk size or device count.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_flow
from .errors import ApsError, check_finite
from .problems import load_problem


class PosteriorSampler:
    """A trained flow with the prior and operator it was trained for."""

    def __init__(self, flow, operator, prior=None, meta: dict | None = None):
        self.flow, self.operator, self.prior, self.meta = flow, operator, prior, meta or {}

    @property
    def device(self):
        return next(itertools.chain(self.flow.parameters(), self.flow.buffers())).device

    def to(self, device) -> "PosteriorSampler":
        self.flow.to(device)
        self.operator.to(device)
        if self.prior is not None:
            self.prior.to(device)
        return self

    def latents(self, index: int, n: int, seed: int) -> torch.Tensor:
        """The n latents z of measurement `index`, (n, *event_shape), from its own generator."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.randn(n, *self.flow.event_shape, generator=g)

    @torch.no_grad()
    def sample(self, y: torch.Tensor, n: int, seed: int = 0, chunk: int = 65536, first_index: int = 0,
               progress: bool = False, autocast_dtype: torch.dtype | None = None):
        """n posterior samples per measurement: y (B, *y_shape) -> x (B, n, *event_shape), log_q (B, n).

        `chunk` bounds the flow evaluations per forward pass (memory). Measurement i of this call is
        measurement first_index + i for seeding, so a data set split into calls gives the same samples.
        """
        y = self.operator.check_y(torch.as_tensor(y)).to(self.device)
        y = y.float() if y.is_floating_point() else y  # class labels stay integers
        if n < 1:
            raise ApsError(f"the number of samples must be at least 1, got {n}")
        xs, lqs = [], []
        per = max(1, chunk // n)  # measurements per forward pass
        for start in tqdm(range(0, len(y), per), disable=not progress, desc="sampling"):
            yb = y[start:start + per]
            z = torch.cat([self.latents(first_index + start + i, n, seed) for i in range(len(yb))])
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                x, log_q = self.flow(z.to(self.device), yb)
            xs.append(x.float().reshape(len(yb), n, *self.flow.event_shape))
            lqs.append(log_q.float().reshape(len(yb), n))
        x, log_q = torch.cat(xs), torch.cat(lqs)
        check_finite("the flow's samples", x)
        return x, log_q


def load(path: str | Path, device: str | torch.device = "cpu") -> PosteriorSampler:
    """Load a trained flow checkpoint folder (what train.py writes) as a PosteriorSampler."""
    path = Path(path)
    flow, meta = load_flow(path)
    task = meta.get("task", {})
    if task.get("kind") == "mixture":
        problem = load_problem(path / task["problem"])
        sampler = PosteriorSampler(flow, problem.operator, problem.prior, meta)
    else:
        raise ApsError(f"{path}: unknown task kind {task.get('kind')!r}")
    if flow.y_shape != tuple(sampler.operator.y_shape):
        raise ApsError(f"{path}: the flow expects y of shape {flow.y_shape} but the operator makes {sampler.operator.y_shape}")
    return sampler.to(device)
