"""Scores of posterior samples against the truth: exact posteriors (mixtures) and ground-truth images."""
from __future__ import annotations

import numpy as np
import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 500, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size sample sets a (n, d) and b (n, d).

    SW_2 = (E_theta W_2^2(theta#a, theta#b))^(1/2) over theta uniform on the sphere (Bonneel et al.
    2015), with `n_projections` random directions from `seed`. In 1-D, W_2 between two empirical
    measures of equal size pairs the sorted values. (Checked against POT's
    ot.sliced_wasserstein_distance in the tests; POT itself is a 33 MB wheel that the GPU image lacks.)
    """
    a, b = a.detach().double().reshape(len(a), -1), b.detach().double().reshape(len(b), -1).to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], n_projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = (theta / theta.norm(dim=0)).to(a.device)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values  # (n, n_projections)
    return float((pa - pb).pow(2).mean().sqrt())


def mode_weight_tv(posterior, x: torch.Tensor) -> torch.Tensor:
    """Mode-weight total variation per measurement, (B,).

    Each sample x (B, n, d) goes to its most responsible exact-posterior component; TV is
    1/2 sum_k |fraction of samples in k - w_k| against the exact weights w (B, K).
    """
    k = posterior.log_weights.shape[-1]
    comp = posterior.assign(x)  # (B, n)
    hist = torch.nn.functional.one_hot(comp, k).double().mean(1)
    return 0.5 * (hist - posterior.weights).abs().sum(-1)


def exact_kl(posterior, x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo KL(q || p(.|y)) = E_q[log q(x|y) - log p(x|y)] per measurement, (B,), for x ~ q (B, n, d)."""
    return (log_q.double() - posterior.log_prob(x)).mean(1)


def mode_count(posterior, threshold: float = 0.01) -> torch.Tensor:
    """Number of exact-posterior components holding at least `threshold` of the mass, (B,)."""
    return (posterior.weights >= threshold).sum(-1)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (B,), for images in a range of width data_range ([-1, 1]: 2)."""
    mse = (x.double() - ref.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def credible_interval_hits(samples: torch.Tensor, truth: torch.Tensor, level: float = 0.9) -> torch.Tensor:
    """Whether each pixel of the truth lies in the central `level` interval of the samples, (B, P) bool.

    samples (B, n, ...), truth (B, ...); P is the number of values per item.
    """
    lo, hi = torch.quantile(samples.flatten(2).double(), torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                                       dtype=torch.float64), dim=1)
    t = truth.flatten(1).double()
    return (t >= lo) & (t <= hi)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5), mean per image, (B,).

    x, ref: (B, C, H, W); channels are scored separately and averaged.
    """
    x, ref = x.double(), ref.double()
    c = x.shape[1]
    w = _gaussian_window().to(x.device).expand(c, 1, -1, -1)
    conv = lambda v: torch.nn.functional.conv2d(v, w, groups=c)  # noqa: E731  (valid windows only)
    mu_x, mu_r = conv(x), conv(ref)
    var_x = conv(x * x) - mu_x ** 2
    var_r = conv(ref * ref) - mu_r ** 2
    cov = conv(x * ref) - mu_x * mu_r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_r ** 2 + c1) * (var_x + var_r + c2))
    return s.flatten(1).mean(1)


def summarize(values) -> dict:
    """Mean, median and max of per-measurement numbers (a list or 1-D tensor)."""
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu())
    return {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max())}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (n, k) and b (m, k) (Heusel et al. 2017's FID
    formula, here on a classifier's features): ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).

    The matrix square root is taken through symmetric eigendecompositions in float64 (S_a^1/2 S_b S_a^1/2 is
    symmetric positive semi-definite, so its trace root is the sum of the roots of its eigenvalues)."""
    a, b = a.detach().double().reshape(len(a), -1), b.detach().double().reshape(len(b), -1).to(a.device)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs two sets of >= 2 feature rows of one width, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross)
