"""Mixture problems: a Gaussian-mixture prior and a matrix operator, from a file or the MCGdiff generator.

File format (.npz or .safetensors): `means` (K, d), `weights` (K,), `variances` (K,) or (K, d),
`A` (dy, d), `sigma_y` (scalar or (1,)). Nothing is unpickled.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ApsError
from .operators import MatrixOperator
from .priors import GaussianMixturePrior

KEYS = ("means", "weights", "variances", "A", "sigma_y")


@dataclass
class MixtureProblem:
    """A Gaussian-mixture prior with a linear Gaussian operator: the posterior is exact."""

    prior: GaussianMixturePrior
    operator: MatrixOperator

    def __post_init__(self):
        if self.operator.x_shape != self.prior.event_shape:
            raise ApsError(f"operator acts on {self.operator.x_shape} but the prior is on {self.prior.event_shape}")

    def arrays(self) -> dict[str, np.ndarray]:
        p, op = self.prior, self.operator
        return {"means": p.means.double().numpy(), "weights": p.log_weights.double().exp().numpy(),
                "variances": p.variances.double().numpy(), "A": op.A.double().numpy(),
                "sigma_y": np.array([op.sigma_y])}

    def save(self, path: str | Path) -> None:
        """Write the problem as .npz or .safetensors (by suffix)."""
        path = Path(path)
        arrays = self.arrays()
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
        elif path.suffix == ".npz":
            np.savez(path, **arrays)
        else:
            raise ApsError(f"problem files are .npz or .safetensors, not {path.suffix or 'no suffix'!r}")


def load_problem(path: str | Path) -> MixtureProblem:
    """Read a mixture problem file (.npz or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise ApsError(f"problem file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file
            arrays = load_file(str(path))
        else:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
    except Exception as err:  # any reader error means "not a problem file"
        raise ApsError(f"cannot read problem file {path}: {err}") from None
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise ApsError(f"{path} is not a mixture problem file: missing {', '.join(missing)} "
                       f"(expects {', '.join(KEYS)})")
    sigma_y = np.asarray(arrays["sigma_y"], dtype=np.float64).reshape(-1)
    if sigma_y.size != 1:
        raise ApsError(f"{path}: sigma_y must be a scalar")
    prior = GaussianMixturePrior(torch.from_numpy(np.asarray(arrays["means"], dtype=np.float64)),
                                 torch.from_numpy(np.asarray(arrays["weights"], dtype=np.float64)),
                                 torch.from_numpy(np.asarray(arrays["variances"], dtype=np.float64)))
    return MixtureProblem(prior, MatrixOperator(torch.from_numpy(np.asarray(arrays["A"], dtype=np.float64)),
                                                float(sigma_y[0])))


def mcgdiff_problem(d: int, dy: int, seed: int = 0, sigma_y: float = 0.1,
                    singular_values=None, spacing: float = 8.0) -> MixtureProblem:
    """The 25-component benchmark of Cardoso et al. 2023 (MCGdiff, sec. 5), made from a seed.

    Means (spacing*i, spacing*j, spacing*i, spacing*j, ...) for i, j in {-2..2}, unit variances, random
    weights; A = U diag(s) V^T[:dy] with Haar-random U, V and singular values s (default: sorted
    U(0, 1) draws, as in the paper), noise std sigma_y.
    """
    if not (d >= 2 and 1 <= dy <= d):
        raise ApsError(f"mcgdiff needs d >= 2 and 1 <= dy <= d, got d={d}, dy={dy}")
    rng = np.random.default_rng(seed)
    grid = np.array(list(itertools.product(range(-2, 3), repeat=2)), dtype=np.float64) * spacing
    means = np.tile(grid, (1, (d + 1) // 2))[:, :d]
    weights = rng.uniform(size=25)
    weights /= weights.sum()
    u, _ = np.linalg.qr(rng.standard_normal((dy, dy)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.sort(rng.uniform(size=dy))[::-1] if singular_values is None else np.asarray(singular_values, float)
    if s.shape != (dy,):
        raise ApsError(f"need {dy} singular values, got {s.shape[0] if s.ndim else 1}")
    a = u @ np.diag(s) @ v[:dy]
    prior = GaussianMixturePrior(torch.from_numpy(means), torch.from_numpy(weights), torch.ones(25, dtype=torch.float64))
    return MixtureProblem(prior, MatrixOperator(torch.from_numpy(a), sigma_y))
