"""Tuning an iterative solver's step size on measurements that are never scored.

Each value of the grid runs on the tuning measurements (cfg.n_tune of them, cfg.tune_samples samples each,
under the same per-run budget as the scored run); the value with the best tuning score (the target's
tune_key: sliced Wasserstein for mixtures, single-sample PSNR for images, class accuracy for a classifier)
is chosen. The flow's sampling temperature is chosen by calibration instead (`calibrated_coverage`): a lower
temperature always gives better single samples, so accuracy cannot choose it. The record says which
measurements, the grid and every candidate's score.
"""
from __future__ import annotations

import math


CALIBRATION_LEVEL = 0.9


def calibrated_coverage(calibration: dict) -> tuple[str, float]:
    """(name, value) of the 90% coverage that the temperature is chosen by, from a target's calibration (its
    rank-based coverage curves: unbiased at any number of samples): of the stroke pixels where the target has
    them (where an image posterior's uncertainty is; the background is covered almost whatever the spread),
    else of every coordinate."""
    cov = calibration["coverage"]
    region = "stroke" if "stroke" in cov["curves"] else "all"
    level = min(range(len(cov["levels"])), key=lambda i: abs(cov["levels"][i] - CALIBRATION_LEVEL))
    return f"coverage90_{region}", cov["curves"][region][level]


def tune(name: str, make, option: str, grid: list, target, x_tune, y_tune, cfg, by_calibration: bool = False) -> dict:
    """{"option", "grid", "candidates": [{value, score, seconds, stopped}], "chosen", "chosen_by"} for solver `name`;
    make(value) builds the solver with option = value. by_calibration: choose the value whose 90% coverage is
    nearest 0.9 (`calibrated_coverage`) instead of the target's tune_key."""
    from .runner import run_solver

    n = cfg.tune_samples or min(cfg.n_samples, 64)
    candidates = []
    for value in grid:
        x, stats, log_q = run_solver(make(value), target, y_tune, n, cfg, cfg.budget_s, f"{name} tune {option}={value}")
        x = target.solver_output(x)
        summary = target.score(x, x_tune, y_tune, log_q)["summary"]
        row = {"value": value, "seconds": stats["seconds"], "stopped": stats["stopped"],
               target.tune_key: summary[target.tune_key]["mean"]}
        if by_calibration:
            key, row[key] = calibrated_coverage(target.calibration(x, x_tune, y_tune))
            row["score"] = abs(row[key] - CALIBRATION_LEVEL)
        else:
            key, row["score"] = target.tune_key, row[target.tune_key]
        candidates.append(row)
    sign = -1 if by_calibration else 1 if target.higher_is_better else -1
    finite = [c for c in candidates if math.isfinite(c["score"])] or candidates
    best = max(finite, key=lambda c: sign * c["score"])
    what = f"|{key} - {CALIBRATION_LEVEL}| (lower is better)" if by_calibration else \
        f"{target.tune_key} ({'higher' if sign > 0 else 'lower'} is better)"
    return {"option": option, "grid": list(grid), "candidates": candidates, "chosen": best["value"],
            "chosen_by": f"{what}, {len(y_tune)} tuning measurements x {n} samples"}
