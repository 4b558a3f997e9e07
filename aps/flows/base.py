"""The conditional-flow interface: q_phi(x | y) as one normflows ConditionalNormalizingFlow.

Direction, stated once for all of aps: a normflows layer's `forward(z, context)` maps the latent z to
the sample x (the sampling direction) and returns (x, log|det dx/dz|); `inverse` maps x to z. So

    log q(x | y) = log N(z; 0, I) - sum_layers log|det d(layer)/d(input)|   along z -> x.

Subclasses build `self.nf` (the normflows model, whose base q0 is a standard normal) and
`encode(y)`, which turns a measurement batch into the context every layer receives.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over all but the batch axis, (B,)."""
    return -0.5 * (z.flatten(1).pow(2).sum(1) + z[0].numel() * math.log(2 * math.pi))


def _repeat(context, n: int):
    """Repeat each item of a context (a tensor, or a tuple/list of tensors) n times along the batch."""
    if n == 1:
        return context
    if isinstance(context, (tuple, list)):
        return type(context)(_repeat(c, n) for c in context)
    return context.repeat_interleave(n, dim=0)


class ConditionalFlow(nn.Module):
    """q_phi(x | y) with x of shape `event_shape` and measurements of shape `y_shape`."""

    event_shape: tuple
    y_shape: tuple
    nf: nn.Module  # normflows.ConditionalNormalizingFlow

    def encode(self, y: torch.Tensor):
        """Context for the flow layers from y (B, *y_shape)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, y: torch.Tensor):
        """Sampling direction: z (B * n, *event_shape), y (B, *y_shape) -> x (B * n, *event_shape), log_q (B * n,).

        The n latents of measurement i are rows i*n .. i*n + n - 1 of z; y is encoded once and its
        context repeated. Written as `forward` so that DDP and autocast wrap it (LIBRARY-NOTES).
        """
        n = z.shape[0] // y.shape[0]
        context = _repeat(self.encode(y), n)
        x, log_det = self.nf.forward_and_log_det(z, context=context)
        return x, standard_normal_log_prob(z) - log_det

    def sample(self, y: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """n samples per measurement: y (B, *y_shape) -> x (B, n, *event_shape), log_q (B, n)."""
        b = y.shape[0]
        ref = next(itertools.chain(self.parameters(), self.buffers()))  # device and dtype
        z = torch.randn(b, n, *self.event_shape, generator=generator, device=ref.device, dtype=ref.dtype)
        x, log_q = self(z.flatten(0, 1), y)
        return x.reshape(b, n, *self.event_shape), log_q.reshape(b, n)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q(x | y) for x (B, *event_shape), y (B, *y_shape) -> (B,)."""
        return self.nf.log_prob(x, context=self.encode(y))

    def config(self) -> dict:
        """The constructor arguments (JSON-able): enough to rebuild the flow before loading weights."""
        raise NotImplementedError
