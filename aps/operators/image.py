"""The common ground of image operators (x of shape (C, H, W)), and the simplest one: denoising.

Every image operator is built from `image_shape=(C, H, W)`, its own parameters and `sigma_y`, and
its `config()` holds all of them, so `build(**op.config())` rebuilds it. Derived tensors (masks,
kernels, matrices) are non-persistent buffers: they follow `.to(device)` but are rebuilt from the
config, never stored in a state dict.
"""
from __future__ import annotations

import torch

from ..errors import ApsError
from .base import LinearOperator, Operator, register


def parse_image_shape(image_shape) -> tuple[int, int, int]:
    """(C, H, W) as ints, or ApsError."""
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ApsError(f"image_shape must be (channels, height, width) of positive ints, got {image_shape!r}")
    return shape


class ImageOperator(Operator):
    """An operator on images x of shape (B, C, H, W); subclasses set y_shape and `hparams` (their own parameters)."""

    def __init__(self, image_shape, sigma_y: float | None = 0.05):
        super().__init__()
        self.x_shape = parse_image_shape(image_shape)
        if sigma_y is not None:
            sigma_y = float(sigma_y)
            if not sigma_y > 0:
                raise ApsError(f"{self.name}: sigma_y must be positive, got {sigma_y}")
        self.sigma_y = sigma_y
        self.hparams: dict = {}

    def config(self) -> dict:
        return {"name": self.name, "image_shape": list(self.x_shape), "sigma_y": self.sigma_y, **self.hparams}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")

    def _shape(self, what: str, v: torch.Tensor, shape: tuple) -> torch.Tensor:
        # Shape only, no NaN test: this runs on every training step and isfinite().all() would sync the GPU.
        if v.ndim != len(shape) + 1 or tuple(v.shape[1:]) != tuple(shape):
            hint = ""
            if what == "x" and v.ndim == 4 and v.shape[1] != shape[0]:
                hint = f" (wrong number of channels: {v.shape[1]} instead of {shape[0]})"
            elif what == "x" and v.ndim == 4:
                hint = f" (wrong image size: {v.shape[2]}x{v.shape[3]} instead of {shape[1]}x{shape[2]})"
            elif v.ndim == len(shape):
                hint = " (missing batch dimension?)"
            raise ApsError(f"{self.name}: {what} must have shape (batch, {', '.join(map(str, shape))}), "
                           f"got {tuple(v.shape)}{hint}")
        return v

    def check_x(self, x):
        return super().check_x(self._shape("x", torch.as_tensor(x), self.x_shape))

    def check_y(self, y):
        return super().check_y(self._shape("the measurement y", torch.as_tensor(y), self.y_shape))


class LinearImageOperator(ImageOperator, LinearOperator):
    """A linear image operator: forward and adjoint."""


@register("denoise")
class Denoise(LinearImageOperator):
    """Denoising: y = x + sigma_y n, A = identity; x and y are (B, C, H, W)."""

    def __init__(self, image_shape=(1, 32, 32), sigma_y: float = 0.05):
        super().__init__(image_shape, sigma_y)
        self.y_shape = self.x_shape

    def forward(self, x):
        return self._shape("x", x, self.x_shape)

    def adjoint(self, y):
        return self._shape("y", y, self.y_shape)
