"""Calibration diagnostics of posterior samples, as simulation-based inference does them.

Each diagnostic takes n posterior samples per measurement, samples (B, n, D), and the truth that made
each measurement, truth (B, D) (images flattened to D pixels); the B pairs (truth, y) must be draws of
the joint p(x) p(y | x), as held-out measurements are. Under an exact sampler the truth is then one more
draw of the posterior, so every statistic below has a known distribution:

- SBC ranks (Talts et al. 2018, "Validating Bayesian inference algorithms with simulation-based
  calibration"; sbi's run_sbc): the rank of the truth among the n samples, per dimension, is uniform
  on {0, ..., n}. `ranks` returns it as a randomised fractional rank u in (0, 1) (ties, such as a
  clamped background pixel equal to the truth, are split at random), which is Uniform(0, 1) exactly,
  whatever n and whether or not the posterior has atoms.
- Expected coverage (sbi's expected-coverage test; Hermans et al. 2022): the central credible interval
  of level a covers the truth iff |u - 1/2| <= a / 2, so the covered fraction is a for every a. Below
  the diagonal is over-confident, above under-confident. `expected_coverage` gives the curve over a
  grid of levels with a binomial band for the number of independent measurements; given the exact
  posterior's log density, `hpd_ranks` gives the same test for its highest-density regions (joint,
  not per dimension).
- TARP (Lemos et al. 2023, "Sampling-based accuracy testing of posterior estimators for general
  inference"): for a random reference point r per measurement, f = the fraction of samples closer to r
  than the truth is; f is Uniform(0, 1) for an exact sampler (and, as the paper shows, only then when r is
  random), so its empirical CDF, the expected-coverage probability ECP(a), lies on the diagonal within a
  Kolmogorov-Smirnov band.

These test the samples as a whole set of (truth, y) pairs: an over-confident sampler has too many
truths in the tails (u near 0 or 1; coverage below the diagonal); a biased one has ranks piled on one side.
"""
from __future__ import annotations

import math

import torch

LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # credible levels 0.05 .. 0.95
Z95 = 1.959964  # two-sided 95% normal quantile
KS95 = 1.358099  # asymptotic 95% quantile of sqrt(N) * sup |F_N - F| (Kolmogorov)


def _flat(samples: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n = samples.shape[:2]
    s, t = samples.reshape(b, n, -1).double().cpu(), truth.reshape(b, -1).double().cpu()
    if s.shape[2] != t.shape[1]:
        raise ValueError(f"samples have {s.shape[2]} values per item but the truth has {t.shape[1]}")
    return s, t


def fractional_rank(below: torch.Tensor, ties: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """u = (#below + V (#ties + 1)) / (n + 1), V ~ U(0, 1): the randomised rank of one draw among n others,
    Uniform(0, 1) exactly when all n + 1 are exchangeable (ties included)."""
    v = torch.rand(below.shape, generator=generator, dtype=torch.float64)
    return (below.double() + v * (ties.double() + 1)) / (n + 1)


def ranks(samples: torch.Tensor, truth: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """SBC fractional ranks of the truth among the samples per dimension, (B, D) in (0, 1).

    samples (B, n, ...), truth (B, ...) with the same trailing size D. Uniform(0, 1) for an exact sampler.
    """
    s, t = _flat(samples, truth)
    below = (s < t[:, None]).sum(1)
    ties = (s == t[:, None]).sum(1)
    return fractional_rank(below, ties, s.shape[1], torch.Generator().manual_seed(seed))


def hpd_ranks(log_p_samples: torch.Tensor, log_p_truth: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Highest-density ranks with the exact posterior's log density: u = the fraction of samples denser than the
    truth, (B,). log_p_samples (B, n), log_p_truth (B,). Uniform(0, 1) for an exact sampler; covered at level a
    iff u <= a (the truth inside the sampler's a-HPD region of the exact density)."""
    lp, lt = log_p_samples.double().cpu(), log_p_truth.double().cpu()[:, None]
    return fractional_rank((lp > lt).sum(1), (lp == lt).sum(1), lp.shape[1], torch.Generator().manual_seed(seed))


def binomial_band(levels, n_units: int, z: float = Z95) -> list[float]:
    """Half-width of the band around the diagonal within which a calibrated sampler's coverage falls:
    z sqrt(a (1 - a) / N) for N independent (truth, y) pairs, per level a."""
    return [z * math.sqrt(a * (1 - a) / max(n_units, 1)) for a in levels]


def expected_coverage(u: torch.Tensor, masks: dict | None = None, levels=LEVELS, central: bool = True,
                      n_units: int | None = None) -> dict:
    """Coverage curves from fractional ranks u (B, D) (or HPD ranks (B,) with central=False).

    Each curve is the fraction of (measurement, dimension) pairs whose truth lies in the credible region of
    level a, for a in `levels`: the central interval (|u - 1/2| <= a / 2) or, central=False, the HPD region
    (u <= a). masks: {name: (B, D) bool} gives one curve per region (pixels chosen from y, e.g. stroke and
    background); None gives one curve per dimension (and "all"). The band is binomial for n_units
    independent pairs (default B: the pixels of one image are not independent, so this is the honest width).

    Returns {"levels", "band", "n_units", "curves": {name: [coverage per level]}}.
    """
    u = u.double()
    u = u[:, None] if u.ndim == 1 else u
    b, d = u.shape
    if masks is None:
        masks = {"all": torch.ones_like(u, dtype=torch.bool)}
        if d > 1:
            masks.update({f"x{j}": torch.zeros_like(u, dtype=torch.bool).index_fill_(1, torch.tensor([j]), True)
                          for j in range(d)})
    dist = (u - 0.5).abs() * 2 if central else u  # covered at level a iff dist <= a
    curves = {}
    for name, m in masks.items():
        m = m.reshape(b, d).cpu()
        curves[name] = [float((dist[m] <= a).double().mean()) if m.any() else float("nan") for a in levels]
    n_units = b if n_units is None else n_units
    return {"levels": list(levels), "band": binomial_band(levels, n_units), "n_units": n_units, "curves": curves}


def tarp(samples: torch.Tensor, truth: torch.Tensor, levels=LEVELS, seed: int = 0, n_references: int = 1,
         references: str = "box", standardise: bool = True) -> dict:
    """TARP (Lemos et al. 2023, Algorithm 2): expected-coverage probability of random-reference balls.

    samples (B, n, ...), truth (B, ...). For each measurement, n_references reference points r and
    f = the fraction of samples nearer r than the truth is (randomised on ties); an exact sampler has
    f ~ Uniform(0, 1) whatever the law of r, as long as r does not depend on this measurement's truth, so
    ECP(a) = P(f <= a) = a. references: "box" draws r uniform in the truths' bounding box (sbi's run_tarp;
    good in a few dimensions), "others" takes the truth of another measurement (a random cyclic shift:
    independent of this one, and a realistic image where a uniform box point is noise). standardise: divide
    each dimension by the truths' std first (parameters in different units; not for pixels).

    Returns {"levels", "ecp" (per level), "f" (B * n_references,), "ks" (sup |ECP - a|, over f's own jumps),
    "ks_bound" (the 95% Kolmogorov bound KS95 / sqrt(N)), "n_units"}.
    """
    s, t = _flat(samples, truth)
    if standardise:
        mu, sd = t.mean(0), t.std(0) if len(t) > 1 else torch.ones(t.shape[1], dtype=torch.float64)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        s, t = (s - mu) / sd, (t - mu) / sd
    g = torch.Generator().manual_seed(seed)
    lo, hi = t.min(0).values, t.max(0).values
    fs = []
    for _ in range(n_references):
        if references == "others" and len(t) > 1:
            shift = int(torch.randint(1, len(t), (1,), generator=g))
            r = t.roll(shift, 0)  # (B, D): another measurement's truth
        else:
            r = lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64)  # (B, D)
        d_s = (s - r[:, None]).norm(dim=2)  # (B, n)
        d_t = (t - r).norm(dim=1)[:, None]  # (B, 1)
        fs.append(fractional_rank((d_s < d_t).sum(1), (d_s == d_t).sum(1), s.shape[1], g))
    f = torch.cat(fs)
    return {"levels": list(levels), "ecp": [float((f <= a).double().mean()) for a in levels], "f": f.tolist(),
            "ks": ks_uniform(f), "ks_bound": KS95 / math.sqrt(len(f)), "n_units": len(f), "references": references}


def ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic sup_a |F_N(a) - a| of values u in (0, 1) against Uniform(0, 1)."""
    u = u.double().flatten().sort().values
    n = len(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


def rank_histogram(u: torch.Tensor, bins: int = 20, z: float = 2.575829) -> dict:
    """SBC rank histogram per dimension: counts of u (B, D) in `bins` equal bins, and the band of a uniform
    histogram (each count Binomial(B, 1 / bins): mean B / bins, 99% half-width z sqrt(B p (1 - p)))."""
    u = u.double()
    u = u[:, None] if u.ndim == 1 else u
    b = u.shape[0]
    idx = (u * bins).long().clamp(0, bins - 1)
    counts = torch.stack([torch.bincount(idx[:, j], minlength=bins) for j in range(u.shape[1])])  # (D, bins)
    p = 1.0 / bins
    return {"bins": bins, "counts": counts.tolist(), "expected": b * p, "band": z * math.sqrt(b * p * (1 - p)),
            "ks": [ks_uniform(u[:, j]) for j in range(u.shape[1])], "ks_bound": KS95 / math.sqrt(b)}
