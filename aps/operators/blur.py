"""Deblurring: y is the image convolved with a Gaussian kernel, zero padding (so A^T is exact)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ApsError
from .base import register
from .image import LinearImageOperator


def gaussian_kernel(kernel_size: int, width: float) -> torch.Tensor:
    """A normalised 2-D Gaussian of std `width` pixels, (kernel_size, kernel_size)."""
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (r / width) ** 2)
    k = torch.outer(g, g)
    return (k / k.sum()).float()


@register("deblur")
class Deblur(LinearImageOperator):
    """y = k * x + sigma_y n, per channel, 'same' size with zero padding: (B, C, H, W) -> (B, C, H, W).

    Zero padding (not reflect) keeps A a plain convolution, whose exact adjoint is conv_transpose2d.
    """

    def __init__(self, image_shape=(1, 32, 32), kernel_size: int = 9, width: float = 2.0, sigma_y: float = 0.05):
        super().__init__(image_shape, sigma_y)
        kernel_size, width = int(kernel_size), float(width)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ApsError(f"deblur: kernel_size must be a positive odd int, got {kernel_size}")
        if not (width > 0 and math.isfinite(width)):
            raise ApsError(f"deblur: width (std of the blur in pixels) must be positive, got {width}")
        c = self.x_shape[0]
        self.y_shape = self.x_shape
        # depthwise: one copy of the kernel per channel, (C, 1, k, k)
        self.register_buffer("kernel", gaussian_kernel(kernel_size, width).expand(c, 1, -1, -1).clone(),
                             persistent=False)
        self.hparams = {"kernel_size": kernel_size, "width": width}

    def forward(self, x):
        x = self._shape("x", x, self.x_shape)
        return F.conv2d(x, self.kernel.to(x.dtype), padding=self.kernel.shape[-1] // 2, groups=self.x_shape[0])

    def adjoint(self, y):
        y = self._shape("y", y, self.y_shape)
        return F.conv_transpose2d(y, self.kernel.to(y.dtype), padding=self.kernel.shape[-1] // 2,
                                  groups=self.x_shape[0])
