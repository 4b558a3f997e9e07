"""Compressed sensing: y is m seeded Gaussian random projections of the flattened image."""
from __future__ import annotations

import math

import torch

from ..errors import ApsError
from .base import register
from .image import LinearImageOperator


@register("cs")
class CompressedSensing(LinearImageOperator):
    """y = A vec(x) + sigma_y n, A of shape (m, C*H*W) with N(0, 1/m) entries drawn from `seed`: (B, C, H, W) -> (B, m).

    The 1/sqrt(m) scaling makes E||A v||^2 = ||v||^2, so sigma_y keeps its meaning whatever m is.
    """

    def __init__(self, image_shape=(1, 32, 32), m: int = 100, seed: int = 0, sigma_y: float = 0.05):
        super().__init__(image_shape, sigma_y)
        m, d = int(m), math.prod(self.x_shape)
        if m < 1:
            raise ApsError(f"cs: the number of measurements m must be positive, got {m}")
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("A", torch.randn(m, d, generator=gen) / math.sqrt(m), persistent=False)  # (m, d)
        self.y_shape = (m,)
        self.hparams = {"m": m, "seed": int(seed)}

    def forward(self, x):
        return self._shape("x", x, self.x_shape).flatten(1) @ self.A.to(x.dtype).T

    def adjoint(self, y):
        return (self._shape("y", y, self.y_shape) @ self.A.to(y.dtype)).reshape(-1, *self.x_shape)

    def matrix(self):
        return self.A
