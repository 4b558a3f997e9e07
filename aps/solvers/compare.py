"""Running solvers (and an APS flow) on a mixture problem's held-out measurements, and their table.

The measurements are aps.evaluate.held_out_measurements(problem, 8) with its default seed, i.e. the
same y the APS mixture benchmark scores; scoring is aps.evaluate.score_samples against the exact
posterior (mode-weight TV, sliced Wasserstein and its noise floor, KL where log q is known).
"""
from __future__ import annotations

import time

import torch

from ..evaluate import held_out_measurements, score_samples, summarize_rows
from .cm_dps import CMDPS
from .cm_inversion import CMInversion
from .dps import DPS
from .exact_cm import ExactConsistency
from .prior_samples import PriorSamples

SOLVERS = ("prior", "dps", "cm1", "cm2")


def build_solver(name: str, prior, cm=None, dps_zeta: float = 1.0, dps_steps: int | None = None,
                 cm1_zeta: float = 1.0, cm1_steps: int = 1000, cm_ode_steps: int = 24, cm2_k: int = 50,
                 cm2_lr1: float = 0.1, cm2_lr2: float = 1e-3, cm2_ts: float = 4.36, progress: bool = False):
    """A solver by name (prior, dps, cm1, cm2); the CM solvers use `cm` or the prior's exact ODE CM."""
    if name == "prior":
        return PriorSamples(progress=progress)
    if name == "dps":
        return DPS(dps_zeta, dps_steps, progress=progress)
    cm = cm if cm is not None else ExactConsistency(prior, cm_ode_steps)
    if name == "cm1":
        return CMDPS(cm, cm1_zeta, cm1_steps, progress=progress)
    if name == "cm2":
        return CMInversion(cm, cm2_k, cm2_k, cm2_lr1, cm2_lr2, cm2_ts, progress=progress)
    raise ValueError(f"unknown solver {name!r}; choose from {SOLVERS}")


def score_mixture(problem, name: str, x: torch.Tensor, stats: dict, config: dict, log_q=None,
                  n_measurements: int = 8, seed: int = 12345) -> dict:
    """Scores of samples x (B, n, d) for the held-out y of `problem`, with their cost."""
    _, y = held_out_measurements(problem, n_measurements, seed)
    posterior = problem.prior.posterior(problem.operator, y)
    rows = score_samples(posterior, x.cpu().double(), None if log_q is None else log_q.cpu().double())
    return {"solver": name, "rows": rows, "summary": summarize_rows(rows), "stats": stats, "config": config,
            "n_samples": x.shape[1]}


def run_solver(solver, problem, n_samples: int = 1000, n_measurements: int = 8, seed: int = 12345,
               sample_seed: int = 0) -> dict:
    """Run one solver on the problem's held-out measurements and score it."""
    _, y = held_out_measurements(problem, n_measurements, seed)
    x = solver.sample(problem.prior, problem.operator, y.to(problem.prior.means.dtype), n_samples,
                      torch.Generator().manual_seed(sample_seed))
    return score_mixture(problem, solver.name, x, dict(solver.stats), solver.config(), None, n_measurements, seed)


def run_aps(sampler, problem, n_samples: int = 1000, n_measurements: int = 8, seed: int = 12345) -> dict:
    """Score an APS flow (aps.load(...)) the same way: one flow pass per sample (NFE 1)."""
    _, y = held_out_measurements(problem, n_measurements, seed)
    t0 = time.perf_counter()
    x, log_q = sampler.sample(y.to(sampler.device), n_samples, seed=seed)
    seconds = time.perf_counter() - t0
    stats = {"nfe": 1, "seconds": seconds, "seconds_per_sample": seconds / (n_samples * n_measurements)}
    return score_mixture(problem, "aps", x, stats, {"name": "aps", **sampler.meta.get("flow", {})}, log_q,
                         n_measurements, seed)


def table(results: list[dict]) -> str:
    """Markdown table: one row per (problem, solver)."""
    lines = ["| problem d,dy,seed | solver | options | modes>=1% | TV mean / max | SW mean / floor (ratio) | KL | NFE / sample | s / sample |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, st, c = r["summary"], r["stats"], r["config"]
        opts = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("name", "cm") and v is not None)
        if "cm" in c:
            opts += f", CM=ODE rk4x{c['cm'].get('steps')}" if c["cm"].get("type") == "exact_ode" else ", CM=learned"
        nfe = str(st["nfe"]) + (f" (+{st['ode_eps']} ODE eps fwd)" if st.get("ode_eps") else "")
        kl = f"{s['kl']['mean']:.3f}" if "kl" in s else "-"
        lines.append(f"| {r.get('problem', '-')} | {r['solver']} | {opts or '-'} | {s['modes']['mean']:.2f} | "
                     f"{s['tv']['mean']:.3f} / {s['tv']['max']:.3f} | {s['sw']['mean']:.3f} / {s['sw_floor']['mean']:.3f} "
                     f"({s['sw_over_floor']['mean']:.1f}x) | {kl} | {nfe} | {st['seconds_per_sample']:.2e} |")
    return "\n".join(lines)


def _options(r: dict) -> str:
    c = r["config"]
    if r["solver"] == "dps":
        return f"zeta {c['zeta']}, {c['steps'] or 1000} steps"
    if r["solver"] == "cm1":
        return f"zeta {c['zeta']}, {c['steps']} Karras steps"
    if r["solver"] == "cm2":
        return f"K {c['k1']}+{c['k2']}, lr {c['lr1']} / {c['lr2']}, t_s {c['t_s']}"
    return "-"


def compact_table(results: list[dict]) -> str:
    """BENCHMARKS.md table: rows sorted by problem then method (prior, aps, dps, cm1, cm2)."""
    order = {"prior": 0, "aps": 1, "dps": 2, "cm1": 3, "cm2": 4}
    key = lambda r: (int(r["problem"].split(",")[0]), r["problem"], order.get(r["solver"], 9),  # noqa: E731
                     str(r["config"].get("steps")))
    lines = ["| problem d,dy,seed | modes>=1% | method | options | TV mean / max | SW mean / floor (ratio) | NFE / sample | s / sample |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=key):
        s, st = r["summary"], r["stats"]
        nfe = str(st["nfe"]) + (f" (+{st['ode_eps']} ODE)" if st.get("ode_eps") else "")
        lines.append(f"| {r['problem']} | {s['modes']['mean']:.2f} | {r['solver']} | {_options(r)} | "
                     f"{s['tv']['mean']:.3f} / {s['tv']['max']:.3f} | {s['sw']['mean']:.2f} / {s['sw_floor']['mean']:.2f} "
                     f"({s['sw_over_floor']['mean']:.1f}x) | {nfe} | {st['seconds_per_sample']:.1e} |")
    return "\n".join(lines)
