"""Inpainting: a box or random pixels are missing; y carries the mask so that the flow sees it.

y has C + 1 channels: [the noisy image, zero where missing (C channels), the mask (1 channel)].
The mask channel is side information, not a function of x: A writes 0 there and `measure` writes
the mask. So A stays linear (A x = [m * x, 0], A^T y = m * y[:C], with m the mask), and every row of
A's matrix for a missing pixel or for the mask channel is zero: it adds a constant to
||y - A x||^2, and gradients in x or an exact Gaussian posterior built from `matrix()` are unchanged.
`log_likelihood` counts only the observed pixels, so it is a normalised density of the observed values.
"""
from __future__ import annotations

import math

import torch

from ..errors import ApsError
from .base import register
from .image import LinearImageOperator


class MaskedOperator(LinearImageOperator):
    """y = [m * (x + sigma_y n), m] for a pixel mask m (1 = observed) of shape (1, H, W), shared by the channels."""

    fixed = True

    def __init__(self, image_shape, sigma_y):
        super().__init__(image_shape, sigma_y)
        c, h, w = self.x_shape
        self.y_shape = (c + 1, h, w)

    def check_y(self, y):
        """y itself, after checking its shape (B, C + 1, H, W), that it is finite and that its last channel is a 0/1 mask."""
        y = super().check_y(y)
        if not ((y[:, -1] == 0) | (y[:, -1] == 1)).all():
            raise ApsError(f"{self.name}: the last channel of y must be the 0/1 mask of observed pixels")
        return y

    def _mask(self, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The mask, (1, 1, H, W) if fixed, else (B, 1, H, W) read from y's last channel."""
        if self.fixed:
            return self.mask.to(x.dtype)[None]
        if y is None:
            raise ApsError(f"{self.name}: with fixed=False the mask changes per measurement; "
                           "pass mask= or use log_likelihood(y, x)")
        return y[:, -1:].to(x.dtype)

    def forward(self, x, mask: torch.Tensor | None = None):
        """A x = [m * x, 0]: (B, C, H, W) -> (B, C + 1, H, W); `mask` (B or 1, 1, H, W) overrides the operator's."""
        x = self._shape("x", x, self.x_shape)
        m = self._mask(None, x) if mask is None else mask.to(x.dtype)
        return torch.cat([m * x, torch.zeros_like(x[:, :1])], 1)

    def adjoint(self, y):
        """A^T y = m * y[:C]: (B, C + 1, H, W) -> (B, C, H, W); the mask channel has zero rows in A."""
        y = self._shape("y", y, self.y_shape)
        return self._mask(y, y) * y[:, :-1]

    def log_likelihood(self, y, x):
        """log N(observed values of y; observed pixels of x, sigma_y^2 I), (B,): missing pixels count for nothing."""
        y, x = self._shape("the measurement y", y, self.y_shape), self._shape("x", x, self.x_shape)
        m = self._mask(y, x)
        sq = (m * (y[:, :-1] - x)).pow(2).flatten(1).sum(1)
        n_obs = m.flatten(1).sum(1) * self.x_shape[0]  # observed values per item
        return -0.5 * sq / self.sigma_y ** 2 - 0.5 * n_obs * math.log(2 * math.pi * self.sigma_y ** 2)

    def draw_mask(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Masks for n measurements, (n or 1, 1, H, W)."""
        return self.mask[None].to(device)

    def measure(self, x, generator=None):
        """y = [m * (x + sigma_y n), m], (B, C + 1, H, W)."""
        x = self.check_x(x)
        m = self.draw_mask(len(x), generator, x.device).to(x.dtype)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.cat([m * (x + self.sigma_y * noise), m.expand(len(x), -1, -1, -1)], 1)


@register("inpaint_box")
class InpaintBox(MaskedOperator):
    """Box inpainting: the pixels of one box are missing (default: centered, half the side).

    box: [top, left, height, width] in pixels.
    """

    def __init__(self, image_shape=(1, 32, 32), box=None, sigma_y: float = 0.05):
        super().__init__(image_shape, sigma_y)
        _, h, w = self.x_shape
        box = [h // 4, w // 4, h // 2, w // 2] if box is None else [int(b) for b in box]
        top, left, bh, bw = box if len(box) == 4 else (-1, -1, -1, -1)
        if min(top, left) < 0 or min(bh, bw) < 1 or top + bh > h or left + bw > w:
            raise ApsError(f"inpaint_box: box must be [top, left, height, width] inside {h}x{w}, got {box}")
        mask = torch.ones(1, h, w)
        mask[:, top:top + bh, left:left + bw] = 0
        self.register_buffer("mask", mask, persistent=False)  # (1, H, W)
        self.hparams = {"box": box}


@register("inpaint_random")
class InpaintRandom(MaskedOperator):
    """Random-pixel inpainting: each pixel is observed with probability p.

    fixed=True: one mask drawn from `seed`, the same for every measurement (A is one linear map).
    fixed=False: `measure` draws a new mask per item from its generator; the mask travels in y.
    """

    def __init__(self, image_shape=(1, 32, 32), p: float = 0.3, fixed: bool = True, seed: int = 0,
                 sigma_y: float = 0.05):
        super().__init__(image_shape, sigma_y)
        p = float(p)
        if not 0 < p <= 1:
            raise ApsError(f"inpaint_random: keep probability p must be in (0, 1], got {p}")
        self.p, self.fixed = p, bool(fixed)
        _, h, w = self.x_shape
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("mask", (torch.rand(1, h, w, generator=gen) < p).float(), persistent=False)
        self.hparams = {"p": p, "fixed": self.fixed, "seed": int(seed)}

    def draw_mask(self, n, generator, device):
        if self.fixed:
            return super().draw_mask(n, generator, device)
        _, h, w = self.x_shape
        return (torch.rand(n, 1, h, w, generator=generator, device=device) < self.p).float()
