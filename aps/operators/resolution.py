"""Super-resolution: y is the image average-pooled by an integer factor."""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import ApsError
from .base import register
from .image import LinearImageOperator


@register("sr")
class SuperResolution(LinearImageOperator):
    """y = avgpool_f(x) + sigma_y n: (B, C, H, W) -> (B, C, H/f, W/f); A^T = nearest upsampling / f^2."""

    def __init__(self, image_shape=(1, 32, 32), factor: int = 4, sigma_y: float = 0.05):
        super().__init__(image_shape, sigma_y)
        c, h, w = self.x_shape
        factor = int(factor)
        if factor < 1 or h % factor or w % factor:
            raise ApsError(f"sr: factor must be a positive divisor of the image size {h}x{w}, got {factor}")
        self.factor = factor
        self.y_shape = (c, h // factor, w // factor)
        self.hparams = {"factor": factor}

    def forward(self, x):
        return F.avg_pool2d(self._shape("x", x, self.x_shape), self.factor)

    def adjoint(self, y):
        f = self.factor
        y = self._shape("y", y, self.y_shape)
        return y.repeat_interleave(f, 2).repeat_interleave(f, 3) / f ** 2
