"""Tuning an iterative solver's step size on measurements that are never scored.

Each value of the grid runs on the tuning measurements (cfg.n_tune of them, cfg.tune_samples samples each,
under the same per-run budget as the scored run); the value with the best tuning score (the target's
tune_key: sliced Wasserstein for mixtures, single-sample PSNR for images, class accuracy for a classifier)
is chosen. The record says which measurements, the grid and every candidate's score.
"""
from __future__ import annotations

import math


def tune(name: str, make, option: str, grid: list, target, x_tune, y_tune, cfg) -> dict:
    """{"option", "grid", "candidates": [{value, score, seconds, stopped}], "chosen", "chosen_by"} for solver `name`;
    make(value) builds the solver with option = value."""
    from .runner import run_solver

    n = cfg.tune_samples or min(cfg.n_samples, 64)
    candidates = []
    for value in grid:
        x, stats, log_q = run_solver(make(value), target, y_tune, n, cfg, cfg.budget_s, f"{name} tune {option}={value}")
        x = target.solver_output(x)
        score = target.score(x, x_tune, y_tune, log_q)["summary"][target.tune_key]["mean"]
        candidates.append({"value": value, "score": score, "seconds": stats["seconds"], "stopped": stats["stopped"]})
    sign = 1 if target.higher_is_better else -1
    finite = [c for c in candidates if math.isfinite(c["score"])] or candidates
    best = max(finite, key=lambda c: sign * c["score"])
    return {"option": option, "grid": list(grid), "candidates": candidates, "chosen": best["value"],
            "chosen_by": f"{target.tune_key} ({'higher' if sign > 0 else 'lower'} is better), {len(y_tune)} "
                         f"tuning measurements x {n} samples"}
