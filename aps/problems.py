"""Mixture problems: a Gaussian-mixture prior and a matrix operator, from a file or an MCGdiff generator.

Two generators of the 25-component benchmark of Cardoso et al. (MCGdiff, ICLR 2024), by name (GENERATORS):
"variant" (`mcgdiff_problem`: uniform weights, sigma_y = 0.1) and "published" (`mcgdiff_published_problem`:
the paper's weights and noise). `parse_mcgdiff("8,2,0,published")` reads the spec train.py's --mcgdiff takes.

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


def _check_dims(d: int, dy: int) -> None:
    if not (d >= 2 and 1 <= dy <= d):
        raise ApsError(f"mcgdiff needs d >= 2 and 1 <= dy <= d, got d={d}, dy={dy}")


def grid_means(d: int, spacing: float = 8.0) -> np.ndarray:
    """(25, d): component (i, j), i, j in {-2..2} (row 5 (i + 2) + j + 2), has mean (s i, s j, s i, s j, ...)."""
    grid = np.array(list(itertools.product(range(-2, 3), repeat=2)), dtype=np.float64) * spacing
    return np.tile(grid, (1, (d + 1) // 2))[:, :d]


def _grid_problem(means: np.ndarray, weights: np.ndarray, a: np.ndarray, sigma_y: float) -> MixtureProblem:
    """The 25 unit-variance components at `means` with `weights`, seen through A = a with noise std sigma_y."""
    prior = GaussianMixturePrior(torch.from_numpy(means), torch.from_numpy(weights), torch.ones(25, dtype=torch.float64))
    return MixtureProblem(prior, MatrixOperator(torch.from_numpy(a), sigma_y))


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix: QR of a Gaussian matrix, R's diagonal made positive."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def mcgdiff_published_problem(d: int, dy: int, seed: int = 0) -> MixtureProblem:
    """The benchmark as MCGdiff publishes it (Cardoso et al., ICLR 2024, sec. 5.1 and its code), from one seed.

    Draws, in this order, from numpy.random.default_rng(seed): 25 standard normals g (weights w = g^2 / sum g^2),
    U (dy x dy) and V (d x d) Haar-orthogonal (QR of Gaussian matrices), dy singular values s ~ U(0, 1) (sorted,
    largest first), then u ~ U(0, 1) for the noise std sigma_y = u * max(s). Means (8 i, 8 j, 8 i, 8 j, ...) for
    i, j in {-2..2}: the grid {-16, -8, 0, 8, 16}^2 tiled over d (`grid_means`, as the authors' code builds it),
    unit covariances, A = U diag(s) V[:dy] (V's first dy rows). Held-out y are measurements of prior draws.
    """
    _check_dims(d, dy)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(25)
    weights = g ** 2 / (g ** 2).sum()
    u, v = _orthogonal(rng, dy), _orthogonal(rng, d)
    s = np.sort(rng.uniform(size=dy))[::-1]
    sigma_y = float(rng.uniform() * s.max())
    return _grid_problem(grid_means(d), weights, u @ np.diag(s) @ v[:dy], sigma_y)


def mcgdiff_problem(d: int, dy: int, seed: int = 0, sigma_y: float = 0.1,
                    singular_values=None, spacing: float = 8.0) -> MixtureProblem:
    """A variant of the 25-component benchmark of Cardoso et al. 2023 (MCGdiff, sec. 5), made from a seed
    (the "variant" generator: `mcgdiff_published_problem` is the benchmark as published).

    Means (spacing*i, spacing*j, spacing*i, spacing*j, ...) for i, j in {-2..2}, unit variances, random
    weights; A = U diag(s) V^T[:dy] with Haar-random U, V and singular values s (default: sorted
    U(0, 1) draws, as in the paper), noise std sigma_y.
    """
    _check_dims(d, dy)
    rng = np.random.default_rng(seed)
    means = grid_means(d, spacing)
    weights = rng.uniform(size=25)
    weights /= weights.sum()
    u, _ = np.linalg.qr(rng.standard_normal((dy, dy)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.sort(rng.uniform(size=dy))[::-1] if singular_values is None else np.asarray(singular_values, float)
    if s.shape != (dy,):
        raise ApsError(f"need {dy} singular values, got {s.shape[0] if s.ndim else 1}")
    return _grid_problem(means, weights, u @ np.diag(s) @ v[:dy], sigma_y)


GENERATORS = {"variant": mcgdiff_problem, "published": mcgdiff_published_problem}


def parse_mcgdiff(spec: str) -> tuple[int, int, int, str]:
    """'d,dy,seed' or 'd,dy,seed,GENERATOR' (variant, the default, or published) -> (d, dy, seed, generator)."""
    parts = [p.strip() for p in str(spec).split(",")]
    generator = parts.pop() if len(parts) == 4 else "variant"
    try:
        if len(parts) != 3:
            raise ValueError
        d, dy, seed = (int(v) for v in parts)
    except ValueError:
        raise ApsError(f"--mcgdiff wants 'd,dy,seed' (three integers) and optionally ',published', got {spec!r}") from None
    if generator not in GENERATORS:
        raise ApsError(f"--mcgdiff: unknown generator {generator!r}; choose from {', '.join(GENERATORS)}")
    return d, dy, seed, generator


def make_mcgdiff(spec: str) -> MixtureProblem:
    """The problem of an --mcgdiff spec (`parse_mcgdiff`)."""
    d, dy, seed, generator = parse_mcgdiff(spec)
    return GENERATORS[generator](d, dy, seed)


def problem_source(train: dict) -> dict | None:
    """Where a mixture run's problem came from, from its saved train config (flat or by section): {"mcgdiff": spec,
    "generator": name} or {"problem": file}; None for an image run."""
    from .config import flatten

    t = flatten(train or {})
    if t.get("mcgdiff"):
        d, dy, seed, generator = parse_mcgdiff(t["mcgdiff"])
        return {"mcgdiff": f"{d},{dy},{seed}", "generator": generator}
    if t.get("problem"):
        return {"problem": t["problem"]}
    return None
