"""The operator interface: y = A(x) + sigma_y * n, and a registry of operators by name.

Shapes are per item: x is (B, *x_shape), y is (B, *y_shape). Every operator checks its inputs and
raises ApsError with one line that says what was expected.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ApsError

OPERATORS: dict[str, type["Operator"]] = {}


def register(name: str):
    """Class decorator: make an operator buildable by name (`build(name, **params)`)."""
    def wrap(cls):
        OPERATORS[name] = cls
        cls.name = name
        return cls
    return wrap


def build(name: str, **params) -> "Operator":
    """Build a registered operator from its name and parameters (as the CLI gives them)."""
    if name not in OPERATORS:
        raise ApsError(f"unknown operator {name!r}; known: {', '.join(sorted(OPERATORS))}")
    try:
        return OPERATORS[name](**params)
    except (TypeError, ValueError) as err:  # a parameter it does not take, or a value it cannot use
        given = ", ".join(f"{k}={v!r}" for k, v in params.items() if k != "image_shape")
        raise ApsError(f"operator {name!r} ({given}): {str(err).splitlines()[0]}") from None


class Operator(nn.Module):
    """A forward model with additive Gaussian noise. Subclasses set x_shape, y_shape, sigma_y and `forward`."""

    name = "operator"
    x_shape: tuple
    y_shape: tuple
    sigma_y: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(x): (B, *x_shape) -> (B, *y_shape), noiseless."""
        raise NotImplementedError

    def log_likelihood(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(y | x) = -||y - A(x)||^2 / (2 sigma_y^2) - dy/2 log(2 pi sigma_y^2), shape (B,)."""
        resid = (y - self(x)).flatten(1)
        dy = resid.shape[1]
        return -0.5 * resid.pow(2).sum(1) / self.sigma_y ** 2 - 0.5 * dy * math.log(2 * math.pi * self.sigma_y ** 2)

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A noisy measurement y = A(x) + sigma_y n, (B, *y_shape)."""
        ax = self(self.check_x(x))
        return ax + self.sigma_y * torch.randn(ax.shape, generator=generator, device=ax.device, dtype=ax.dtype)

    def _check(self, what: str, v: torch.Tensor, shape: tuple) -> torch.Tensor:
        v = torch.as_tensor(v)
        if v.ndim != len(shape) + 1 or tuple(v.shape[1:]) != tuple(shape):
            raise ApsError(f"{self.name}: {what} must have shape (batch, {', '.join(map(str, shape))}), "
                           f"got {tuple(v.shape)}")
        # The finite test reads the device (a sync); a CUDA graph being captured cannot, so it is skipped there.
        capturing = v.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.isfinite(v).all():
            raise ApsError(f"{self.name}: {what} contains NaN or inf")
        return v

    def check_x(self, x):
        """x itself, after checking its shape (B, *x_shape) and that it is finite."""
        return self._check("x", x, self.x_shape)

    def check_y(self, y):
        """y itself, after checking its shape (B, *y_shape) and that it is finite."""
        return self._check("the measurement y", y, self.y_shape)

    def config(self) -> dict:
        """Name and parameters: enough to rebuild the operator with `build` (stored in checkpoints)."""
        raise NotImplementedError


class LinearOperator(Operator):
    """A linear A with its adjoint A^T."""

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y: (B, *y_shape) -> (B, *x_shape)."""
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """A as a dense (dy, dx) matrix, built column by column from `forward` unless overridden."""
        dx = math.prod(self.x_shape)
        basis = torch.eye(dx).reshape(dx, *self.x_shape)
        return self(basis).reshape(dx, -1).T
