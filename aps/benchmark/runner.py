"""One benchmark run: every method on the same held-out measurements, scored, calibrated, timed, written.

    report = run_benchmark(BenchmarkConfig(checkpoint="runs/d2", solvers=["aps", "dps", "cm1", "cm2"]))

For each method in turn: the iterative solvers are first tuned on separate measurements (aps.benchmark.tuning),
then run on the test measurements in chunks of at most cfg.batch_size rows, under cfg.budget_s seconds in all
(a solver past it stops with what it has, and the table says so); the samples are scored and calibrated
(aps.benchmark.scoring) and the JSON file is rewritten, so a killed run keeps every finished method. Figures
(aps.benchmark.figures) are drawn at the end from the samples kept in memory.
"""
from __future__ import annotations

import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ApsError
from ..solvers.flow import FlowSolver
from ..solvers.registry import NAMES, REGISTRY, build
from .config import BenchmarkConfig
from .scoring import load_target
from .tuning import tune


def run_solver(solver, target, y: torch.Tensor, n: int, cfg: BenchmarkConfig, budget_s: float | None,
               desc: str) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """n samples per measurement of y (B, *y_shape) in chunks of <= cfg.batch_size rows: (x (B, n, ...), stats,
    log_q (B, n) or None). The budget is shared out over the chunks still to run; stats sum the chunks' seconds."""
    per = max(1, cfg.batch_size // n)
    starts = list(range(0, len(y), per))
    g = torch.Generator().manual_seed(cfg.seed)  # one stream for the whole run (CPU: the same draws on any device)
    t0 = time.perf_counter()
    xs, lqs, stats = [], [], {"seconds": 0.0, "stopped": None}
    for k, start in enumerate(tqdm(starts, desc=desc, disable=not cfg.progress or len(starts) == 1, leave=False)):
        left = None if budget_s is None else max(budget_s - (time.perf_counter() - t0), 0.0) / (len(starts) - k)
        if isinstance(solver, FlowSolver):
            solver.first_index = start  # per-measurement seeds of the flow
        yb = y[start:start + per].to(target.device)
        prior = None if isinstance(solver, FlowSolver) else target.prior  # the flow alone needs no prior network
        x = solver.sample(prior, target.operator, yb, n, g, budget_s=left)
        xs.append(x.cpu())
        if isinstance(solver, FlowSolver):
            lqs.append(solver.log_q.cpu())
        s = solver.stats
        stats["seconds"] += s["seconds"]
        stats["stopped"] = stats["stopped"] or (s["stopped"] and f"chunk {k + 1}/{len(starts)} {s['stopped']}")
        stats.update({key: v for key, v in s.items() if key not in ("seconds", "stopped", "seconds_per_sample")})
    stats["seconds_per_sample"] = stats["seconds"] / (len(y) * n)
    stats["samples_per_s"] = len(y) * n / max(stats["seconds"], 1e-12)
    stats["batch"] = min(per, len(y)) * n
    return torch.cat(xs), stats, (torch.cat(lqs) if lqs else None)


def make_method(name: str, target, sampler, cfg: BenchmarkConfig, cm_cache: dict, tune_set) -> tuple:
    """(solver, tuning record or None) for a registry name, tuned on tune_set = (x_tune, y_tune) when it has a grid."""
    if name == "aps":
        temperatures = [sampler.check_temperature(t) for t in cfg.aps_temperature]  # every value, before any runs

        def make_flow(t):
            return FlowSolver(sampler, seed=cfg.seed, temperature=t)

        if len(temperatures) > 1:
            record = tune(name, make_flow, "temperature", temperatures, target, *tune_set, cfg, by_calibration=True)
            return make_flow(record["chosen"]), record
        return make_flow(temperatures[0]), None
    entry = REGISTRY[name]
    if entry.needs_cm and "cm" not in cm_cache:
        cm_cache["cm"] = target.cm()
    fixed, grid = cfg.solver_options(name)

    def make(value):
        opts = dict(fixed, **({entry.tuned: value} if entry.tuned and value is not None else {}))
        return build(name, cm_cache.get("cm"), progress=cfg.progress, **opts)

    if entry.tuned and len(grid) > 1:
        record = tune(name, make, entry.tuned, grid, target, *tune_set, cfg)
        return make(record["chosen"]), record
    return make(grid[0] if grid else None), None


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Run, score and write the benchmark of cfg; returns the report dict (also in cfg.out/benchmark.json)."""
    import aps

    unknown = [s for s in cfg.solvers if s not in NAMES]
    if unknown:
        raise ApsError(f"unknown solver {unknown[0]!r}; choose from {', '.join(NAMES)}")
    for key in ("n_measurements", "n_samples", "n_tune", "batch_size", "throughput_batch"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise ApsError(f"--{key.replace('_', '-')} must be at least 1, got {v}")
    if cfg.budget_s is not None and not (cfg.budget_s > 0 and math.isfinite(cfg.budget_s)):
        raise ApsError(f"--budget-s must be a positive number of seconds, got {cfg.budget_s}")
    torch.set_num_threads(cfg.threads)
    sampler = aps.load(cfg.checkpoint, device=cfg.device)
    target = load_target(sampler, cfg)
    x_test, y_test = target.measurements("test", cfg.n_measurements)
    tune_set = target.measurements("tune", cfg.n_tune)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": cfg.checkpoint, "kind": target.kind, "operator": sampler.operator.config(),
              "machine": machine(cfg.device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__, "config": cfg.to_dict(), "command": cfg.command,
              "measurements": {"test": describe(target, "test", cfg.n_measurements),
                               "tune": describe(target, "tune", cfg.n_tune)},
              "n_samples": cfg.n_samples, "methods": []}
    if target.kind == "mixture":
        from ..problems import problem_source

        report["problem"] = problem_source(sampler.meta.get("train", {}))  # e.g. {"mcgdiff", "generator"}
    samples, cm_cache = {}, {}
    for name in cfg.solvers:
        solver, tuning = make_method(name, target, sampler, cfg, cm_cache, tune_set)
        x, stats, log_q = run_solver(solver, target, y_test, cfg.n_samples, cfg, cfg.budget_s, name)
        x = x if name == "aps" else target.solver_output(x)
        entry = {"method": name, "config": solver.config(), "stats": stats, "tuning": tuning,
                 **target.score(x, x_test, y_test, log_q), "calibration": target.calibration(x, x_test, y_test)}
        if target.kind == "image":
            entry["realism"] = target.realism(x, x_test)
            if "realism_floor" not in report:
                report["realism_floor"] = target.realism_floor(x_test)
        if name == "aps":
            from ..evaluate_images import throughput

            entry["throughput"] = throughput(sampler.flow, y_test[:1].float(), cfg.throughput_batch)
        report["methods"].append(entry)
        write_json(report, out / "benchmark.json")
        samples[name] = x
    if cfg.figures:
        from .figures import draw_all

        report["figures"] = [str(p) for p in draw_all(report, samples, target, x_test, y_test, out / "figures")]
        write_json(report, out / "benchmark.json")
    return report


def describe(target, split: str, n: int) -> str:
    if target.kind == "image":
        start = 0 if split == "test" else target.cfg.tune_first
        return f"held-out digits {start}..{start + n - 1} (noise seed {target.cfg.seed})"
    return f"{n} measurements of fresh prior draws (seed {target.seeds[split]})"


def machine(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch thread(s)"


def write_json(report: dict, path: Path) -> None:
    """Write atomically (a temporary file renamed), so a killed run never leaves half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
    tmp.replace(path)
