"""Tuning an iterative solver's step size on measurements that are never scored.

Each value of the grid runs on the tuning measurements (cfg.n_tune of them, cfg.tune_samples samples each,
under the same per-run budget as the scored run); the value with the best tuning score (the target's
tune_key: sliced Wasserstein for mixtures, single-sample PSNR for images, class accuracy for a classifier)
is chosen. The flow's sampling temperature is chosen by calibration instead (`calibration_score`): a lower
temperature always gives better single samples, so accuracy cannot choose it. The record says which
measurements, the grid and every candidate's score.
"""
from __future__ import annotations

import math


CALIBRATION_LEVEL = 0.9


def calibration_score(summary: dict) -> tuple[str, float]:
    """(what, |coverage - 0.9|) of a summary: the 90% coverage of the stroke pixels where the target has them
    (where an image posterior's uncertainty is; the background is covered almost whatever the spread), else of
    every coordinate."""
    key = "coverage90_stroke" if "coverage90_stroke" in summary else "coverage90"
    return key, abs(summary[key]["mean"] - CALIBRATION_LEVEL)


def tune(name: str, make, option: str, grid: list, target, x_tune, y_tune, cfg, by_calibration: bool = False) -> dict:
    """{"option", "grid", "candidates": [{value, score, seconds, stopped}], "chosen", "chosen_by"} for solver `name`;
    make(value) builds the solver with option = value. by_calibration: choose the value whose 90% coverage is
    nearest 0.9 (`calibration_score`) instead of the target's tune_key."""
    from .runner import run_solver

    n = cfg.tune_samples or min(cfg.n_samples, 64)
    candidates = []
    for value in grid:
        x, stats, log_q = run_solver(make(value), target, y_tune, n, cfg, cfg.budget_s, f"{name} tune {option}={value}")
        x = target.solver_output(x)
        summary = target.score(x, x_tune, y_tune, log_q)["summary"]
        key, score = calibration_score(summary) if by_calibration else (target.tune_key, summary[target.tune_key]["mean"])
        candidates.append({"value": value, "score": score, "seconds": stats["seconds"], "stopped": stats["stopped"],
                           **{k: summary[k]["mean"] for k in (target.tune_key, key) if k in summary}})
    sign = -1 if by_calibration else 1 if target.higher_is_better else -1
    finite = [c for c in candidates if math.isfinite(c["score"])] or candidates
    best = max(finite, key=lambda c: sign * c["score"])
    what = f"|{key} - {CALIBRATION_LEVEL}| (lower is better)" if by_calibration else \
        f"{target.tune_key} ({'higher' if sign > 0 else 'lower'} is better)"
    return {"option": option, "grid": list(grid), "candidates": candidates, "chosen": best["value"],
            "chosen_by": f"{what}, {len(y_tune)} tuning measurements x {n} samples"}
