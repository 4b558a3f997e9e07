"""Scoring a sampler on a mixture problem against the exact posterior, per measurement.

For each held-out measurement y (made from fresh prior draws with a seed training never used):
exact KL(q || p(.|y)) (when the sampler gives log q), mode-weight TV, the number of modes holding
>= 1% of the mass, sliced Wasserstein to an exact sample set of the same size, and that SW's noise
floor (SW between two independent exact sample sets of that size). The prior's own samples are
scored the same way as the do-nothing baseline.
"""
from __future__ import annotations

import torch

from . import metrics


def held_out_measurements(problem, n_measurements: int, seed: int = 12345):
    """(x_true, y): measurements of fresh prior draws; the seed is disjoint from training's."""
    g = torch.Generator().manual_seed(seed)
    x = problem.prior.cpu().sample(n_measurements, generator=g)
    return x, problem.operator.cpu().measure(x, generator=g)


def score_samples(posterior, x: torch.Tensor, log_q: torch.Tensor | None = None, n_projections: int = 500,
                  seed: int = 0) -> list[dict]:
    """Per-measurement scores of samples x (B, n, d) against the exact posterior (a MixturePosterior)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[1]
    ref, ref2 = posterior.sample(n, generator=g), posterior.sample(n, generator=g)
    tv = metrics.mode_weight_tv(posterior, x)
    modes = metrics.mode_count(posterior)
    kl = metrics.exact_kl(posterior, x, log_q) if log_q is not None else None
    rows = []
    for i in range(x.shape[0]):
        rows.append({
            "tv": float(tv[i]), "modes": int(modes[i]),
            "kl": None if kl is None else float(kl[i]),
            "sw": metrics.sliced_wasserstein(x[i], ref[i], n_projections, seed=i),
            "sw_floor": metrics.sliced_wasserstein(ref2[i], ref[i], n_projections, seed=i),
        })
    return rows


def evaluate_mixture(sampler, problem, n_measurements: int = 8, n_samples: int = 4000, seed: int = 12345) -> dict:
    """Scores of a PosteriorSampler (and of the prior, as a baseline) on held-out measurements."""
    _, y = held_out_measurements(problem, n_measurements, seed)
    posterior = problem.prior.posterior(problem.operator, y)
    x, log_q = sampler.sample(y.to(sampler.device), n_samples, seed=seed)
    flow_rows = score_samples(posterior, x.cpu().double(), log_q.cpu().double())
    prior_x = problem.prior.cpu().sample(n_measurements * n_samples, generator=torch.Generator().manual_seed(seed))
    prior_rows = score_samples(posterior, prior_x.reshape(n_measurements, n_samples, -1).double())
    return {"flow": flow_rows, "prior": prior_rows, "summary": {
        "flow": summarize_rows(flow_rows), "prior": summarize_rows(prior_rows)}}


def summarize_rows(rows: list[dict]) -> dict:
    """Mean/median/max of each score over measurements, plus SW relative to its floor."""
    out = {}
    for key in ("tv", "kl", "sw", "sw_floor", "modes"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            out[key] = metrics.summarize(vals)
    out["sw_over_floor"] = metrics.summarize([r["sw"] / r["sw_floor"] for r in rows])
    return out
