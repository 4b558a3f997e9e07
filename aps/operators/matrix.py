"""A dense matrix operator on vectors: y = A x + sigma_y n."""
from __future__ import annotations

import torch

from ..errors import ApsError
from .base import LinearOperator, register


@register("matrix")
class MatrixOperator(LinearOperator):
    """y = A x + sigma_y n for x in R^d, A of shape (dy, d)."""

    def __init__(self, A, sigma_y: float):
        super().__init__()
        a = torch.as_tensor(A, dtype=torch.get_default_dtype())
        if a.ndim != 2:
            raise ApsError(f"matrix operator: A must be (dy, d), got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise ApsError("matrix operator: A contains NaN or inf")
        sigma_y = float(sigma_y)
        if not sigma_y > 0:
            raise ApsError(f"matrix operator: sigma_y must be positive, got {sigma_y}")
        self.register_buffer("A", a)
        self.sigma_y = sigma_y
        self.x_shape, self.y_shape = (a.shape[1],), (a.shape[0],)

    def forward(self, x):
        return x @ self.A.T

    def adjoint(self, y):
        return y @ self.A

    def matrix(self):
        return self.A

    def config(self):
        return {"name": self.name, "A": self.A.tolist(), "sigma_y": self.sigma_y}
