"""The exact-posterior benchmark of MCGdiff (Cardoso et al., ICLR 2024) as published, every method, in one command.

    python scripts/mcgdiff_table.py --dims 8 80 800 --dys 1 2 4 --seeds 0 1 2 --workers 16 \\
        --out benchmarks/mcgdiff_published.jsonl
    python scripts/mcgdiff_table.py --table benchmarks/mcgdiff_published.jsonl      # the Markdown table of a file

For every problem (d, d_y, seed; aps.problems.mcgdiff_published_problem, or --generator variant) and method:
  aps   a flow trained by train.py's loop with the recipe --recipe names for its d (default mixture-highdim-fkl:
        forward KL on prior draws alone; mixture-highdim: APS term + forward KL), --aps-steps
        steps or --aps-seconds, whichever ends first), sampled once per sample;
  dps, ddrm, cm1, cm2   the iterative solvers of aps.solvers (the CM solvers on the mixture's exact consistency
        function), each first tuned over its grid on --n-tune measurements of other prior draws (seed 54321,
        never scored), by sliced Wasserstein to the exact posterior (aps.benchmark.tuning).
All are scored on the same --n-measurements held-out measurements (fresh prior draws, seed 12345) x --n-samples
samples against the exact posterior (aps.evaluate: mode-weight TV, exact KL for APS, sliced Wasserstein and its
noise floor). Jobs are (problem, method) pairs spread over --workers processes (one torch thread each), the
costliest first; each finished job appends one JSON line to --out at once, so a killed run keeps what it has,
and a rerun with the same --out skips the pairs already there. --max-seconds stops the run cleanly: no job
starts after it, and those running are given what is left as their budget (training time, solver budget).
--start-until only stops new jobs from starting, so a table can be split over several sittings with every
row at its full budget.

Per-d options take "d:value" pairs (e.g. --dps-steps 8:500 80:500 800:100); a bare value applies to every d.
The defaults are sized so that the full 27-problem table fits in about 14 minutes on 16 cores (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("aps", "dps", "ddrm", "cm1", "cm2")
# per-d defaults: d -> value (the nearest d given is used for any other d)
PER_D = {
    # forward KL on prior draws alone: the ELBO term moved mode weights (BENCHMARKS.md); per d, so a d can differ
    "recipe": {8: "mixture-highdim-fkl", 80: "mixture-highdim-fkl", 800: "mixture-highdim-fkl"},
    "aps_steps": {8: 8000, 80: 8000, 800: 3000},
    "aps_seconds": {8: 150.0, 80: 200.0, 800: 240.0},
    "dps_steps": {8: 500, 80: 500, 800: 100},
    "ddrm_steps": {8: 20, 80: 20, 800: 20},
    "cm1_steps": {8: 20, 80: 20, 800: 10},
    "cm2_k": {8: 10, 80: 10, 800: 5},
    "cm_ode_steps": {8: 8, 80: 8, 800: 4},
}
COST = {"aps": 3.0, "cm2": 2.0, "cm1": 1.5, "dps": 1.0, "ddrm": 0.2}  # rough relative cost, to start long jobs first


def per_d(text_values, name):
    """["8:500", "800:100"] or ["300"] -> {d: value} (a bare value: {0: value}, for every d)."""
    kind = {"aps_seconds": float, "recipe": str}.get(name, int)
    out = {}
    for item in text_values:
        key, sep, value = str(item).partition(":")
        try:
            if sep:
                out[int(key)] = kind(value)
            else:
                out[0] = kind(key)
        except ValueError:
            raise SystemExit(f"error: --{name.replace('_', '-')} wants d:value pairs or one value, got {item!r}")
    return out


def at(table: dict, d: int):
    """The value of a per-d table for d: d's own, the bare value, or the nearest d's."""
    if d in table:
        return table[d]
    if 0 in table:
        return table[0]
    return table[min(table, key=lambda k: (abs(k - d), k))]


def problem_for(d, dy, seed, generator):
    from aps.problems import GENERATORS

    return GENERATORS[generator](d, dy, seed)


def train_aps(job, a, budget):
    """Train the APS flow of one problem with the high-dimensional recipe; (sampler, train seconds, steps)."""
    import aps
    from aps.recipe import resolve
    from aps.training import train

    d, dy, seed, generator = job["d"], job["dy"], job["seed"], job["generator"]
    out = Path(a["run_dir"]) / f"{generator}-d{d}-dy{dy}-s{seed}"
    seconds = at(a["aps_seconds"], d)
    if budget is not None:
        seconds = max(1.0, min(seconds, budget))
    steps = at(a["aps_steps"], d)
    given = dict(recipe=at(a["recipe"], d), mcgdiff=f"{d},{dy},{seed},{generator}", out=str(out), steps=steps,
                 max_seconds=seconds, cpu=True, overwrite=True, checkpoint_every=steps, sample_every=0,
                 log_every=max(1, steps // 20), seed=a["train_seed"])
    cfg = resolve(given).cfg
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stderr = sys.stderr
    with open(out / "train.log", "w") as log:  # progress bars of parallel jobs would interleave
        sys.stderr = log
        try:
            train(cfg)
        finally:
            sys.stderr = stderr
    train_seconds = time.perf_counter() - t0
    meta = json.loads((out / "config.json").read_text())
    return aps.load(out), train_seconds, meta["step"], cfg


def run_job(job):
    """One (problem, method): tune (iterative solvers), run, score; the JSON row."""
    import torch

    torch.set_num_threads(1)
    from types import SimpleNamespace

    from aps.benchmark.config import BenchmarkConfig
    from aps.benchmark.runner import make_method, run_solver
    from aps.benchmark.scoring import MixtureTarget

    a = job["args"]
    d, method = job["d"], job["method"]
    deadline = a["deadline"]
    left = None if deadline is None else deadline - time.time()
    base = {k: job[k] for k in ("d", "dy", "seed", "generator", "method")}
    if left is not None and left <= 0:
        return {**base, "skipped": "--max-seconds reached before the job started"}
    if a["start_until"] is not None and time.time() > a["start_until"]:
        return {**base, "skipped": "--start-until passed before the job started"}
    t_job = time.perf_counter()
    cfg = BenchmarkConfig(
        solvers=[method], n_measurements=a["n_measurements"], n_samples=a["n_samples"], n_tune=a["n_tune"],
        tune_samples=a["tune_samples"], dps_zeta=a["dps_zeta"], dps_steps=at(a["dps_steps"], d),
        cm1_zeta=a["cm1_zeta"], cm1_steps=at(a["cm1_steps"], d), cm2_lr1=a["cm2_lr1"], cm2_k=at(a["cm2_k"], d),
        ddrm_eta=a["ddrm_eta"], ddrm_steps=at(a["ddrm_steps"], d), cm_ode_steps=at(a["cm_ode_steps"], d),
        threads=1, batch_size=a["batch_size"], seed=0, progress=False, figures=False, budget_s=left)
    row = dict(base)
    if method == "aps":
        sampler, train_seconds, steps, tcfg = train_aps(job, a, left)
        row.update(train_seconds=round(train_seconds, 1), train_steps=steps, batch_size=tcfg.batch_size,
                   recipe=at(a["recipe"], d))
        left = None if deadline is None else max(deadline - time.time(), 1.0)
    else:
        sampler = SimpleNamespace(prior=problem_for(d, job["dy"], job["seed"], job["generator"]).prior, operator=None)
        sampler.operator = problem_for(d, job["dy"], job["seed"], job["generator"]).operator
    target = MixtureTarget(sampler, cfg)
    x_test, y_test = target.measurements("test", cfg.n_measurements)
    tune_set = target.measurements("tune", cfg.n_tune)
    solver, tuning = make_method(method, target, sampler, cfg, {}, tune_set)
    if method == "aps":  # a mixture base evaluates K x d numbers per sample: about 2^24 of them per flow pass
        k = max(1, sampler.flow.config().get("base_components", 1))
        solver.chunk = max(64, 2 ** 24 // (k * (1 + 2 * d)))
    x, stats, log_q = run_solver(solver, target, y_test, cfg.n_samples, cfg, left, method)
    scored = target.score(x, x_test, y_test, log_q)
    s = scored["summary"]
    cfg_solver = solver.config()
    if method == "aps":
        cfg_solver = {"name": "aps", "step": cfg_solver.get("step"), "flow": sampler.meta.get("flow")}
    row.update(
        tv_mean=s["tv"]["mean"], tv_max=s["tv"]["max"], kl_mean=s["kl"]["mean"] if "kl" in s else None,
        kl_max=s["kl"]["max"] if "kl" in s else None, sw_mean=s["sw"]["mean"], sw_floor_mean=s["sw_floor"]["mean"],
        sw_over_floor_mean=s["sw_over_floor"]["mean"], sw_over_floor_max=s["sw_over_floor"]["max"],
        modes_mean=s["modes"]["mean"], seconds_per_sample=stats["seconds_per_sample"], nfe=stats.get("nfe"),
        ode_eps=stats.get("ode_eps"), stopped=stats.get("stopped"), setting=cfg_solver,
        tuning=None if tuning is None else {k: tuning[k] for k in ("option", "grid", "chosen", "chosen_by", "candidates")},
        n_measurements=cfg.n_measurements, n_samples=cfg.n_samples,
        test_measurements="fresh prior draws, seed 12345", tune_measurements=None if tuning is None else
        f"{cfg.n_tune} fresh prior draws, seed 54321",
        job_seconds=round(time.perf_counter() - t_job, 1), machine=a["machine"],
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return row


def done_keys(path: Path) -> set:
    keys = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if "skipped" not in r and "error" not in r:
                keys.add((r["d"], r["dy"], r["seed"], r["generator"], r["method"]))
    return keys


def safe_job(job):
    try:
        return run_job(job)
    except Exception as err:  # one failed job must not end the table: its row says what went wrong
        return {**{k: job[k] for k in ("d", "dy", "seed", "generator", "method")},
                "error": f"{type(err).__name__}: {err}".splitlines()[0]}


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(rows) -> str:
    """Markdown: one line per problem and method."""
    head = ["d", "d_y", "seed", "generator", "method", "TV mean / max", "KL (nats)", "SW / floor (ratio)",
            "NFE / sample", "s / sample", "train s (steps)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (r["d"], r["dy"], r["seed"], order.get(r["method"], 9))):
        if "tv_mean" not in r:
            continue
        nfe = "1" if r["method"] == "aps" else f"{r['nfe']:,}" + (f" (+{r['ode_eps']:,} ODE)" if r.get("ode_eps") else "")
        train = f"{r['train_seconds']:.0f} ({r['train_steps']})" if r["method"] == "aps" else "-"
        lines.append(f"| {r['d']} | {r['dy']} | {r['seed']} | {r['generator']} | {r['method']} | "
                     f"{r['tv_mean']:.3f} / {r['tv_max']:.3f} | {fmt(r.get('kl_mean'))} | {r['sw_mean']:.3f} / "
                     f"{r['sw_floor_mean']:.3f} ({r['sw_over_floor_mean']:.2f}x) | {nfe} | "
                     f"{r['seconds_per_sample']:.1e} | {train} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="mcgdiff_table.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[8, 80, 800])
    p.add_argument("--dys", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--generator", default="published", choices=["published", "variant"],
                   help="aps.problems generator (default: %(default)s, the paper's weights and noise)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--workers", type=int, default=1, help="processes, one torch thread each (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/mcgdiff_published.jsonl", help="JSON lines, appended per job")
    p.add_argument("--run-dir", default="runs/mcgdiff_table", help="APS run folders, one per problem (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop cleanly after this many seconds (0: no limit)")
    p.add_argument("--start-until", type=float, default=0.0,
                   help="start no job after this many seconds; those running finish with their full budgets, and a "
                        "rerun with the same --out does the rest (0: no limit)")
    p.add_argument("--n-measurements", type=int, default=8, help="held-out y per problem (default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=4000, help="samples per y (default: %(default)s)")
    p.add_argument("--n-tune", type=int, default=8, help="tuning y per problem (default: %(default)s)")
    p.add_argument("--tune-samples", type=int, default=64, help="samples per tuning y (default: %(default)s)")
    p.add_argument("--train-seed", type=int, default=0)
    for name, table_ in PER_D.items():
        default = " ".join(f"{k}:{v}" for k, v in table_.items())
        p.add_argument("--" + name.replace("_", "-"), nargs="+", default=None, metavar="D:VALUE",
                       help=f"per d (default: {default})")
    p.add_argument("--dps-zeta", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0, 3.0])
    p.add_argument("--cm1-zeta", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--cm2-lr1", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--ddrm-eta", type=float, nargs="+", default=[0.5, 0.85, 1.0])
    p.add_argument("--batch-size", type=int, default=4096, help="rows per solver call (default: %(default)s)")
    p.add_argument("--machine", default="", help="recorded in every row (default: the platform and core count)")
    p.add_argument("--table", metavar="JSONL", help="print the Markdown table of a results file and exit")
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(table(rows))
        return
    for name in ("n_measurements", "n_samples", "n_tune", "tune_samples", "workers", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if any(d < 2 for d in args.dims) or any(dy < 1 or dy > min(args.dims) for dy in args.dys):
        raise SystemExit("error: need d >= 2 and 1 <= d_y <= d")
    a = {k: v for k, v in vars(args).items() if k not in PER_D}
    for name, table_ in PER_D.items():
        a[name] = per_d(getattr(args, name), name) if getattr(args, name) else dict(table_)
    out = Path(args.out)
    a["run_dir"] = args.run_dir
    a["machine"] = args.machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                                   f"{args.workers} worker(s) x 1 thread"
    t0 = time.time()
    a["deadline"] = t0 + args.max_seconds if args.max_seconds > 0 else None
    a["start_until"] = t0 + args.start_until if args.start_until > 0 else None
    done = done_keys(out)
    jobs = [dict(d=d, dy=dy, seed=s, generator=args.generator, method=m, args=a)
            for d in args.dims for dy in args.dys for s in args.seeds for m in args.methods
            if (d, dy, s, args.generator, m) not in done]
    jobs.sort(key=lambda j: -(j["d"] * COST[j["method"]]))  # the longest first: the last ones to finish are short
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} jobs ({len(done)} already in {out}), {args.workers} worker(s)", file=sys.stderr)
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool, open(out, "a") as log:
        pending = pool.imap_unordered(safe_job, jobs, chunksize=1)
        for _ in jobs:
            try:
                timeout = None if a["deadline"] is None else max(a["deadline"] - time.time(), 0) + 120
                row = pending.next(timeout=timeout)
            except mp.TimeoutError:
                print(f"error: --max-seconds {args.max_seconds}: jobs still running 120 s past it were stopped",
                      file=sys.stderr)
                pool.terminate()
                break
            if "skipped" in row:
                continue
            log.write(json.dumps(row, default=float) + "\n")
            log.flush()
            rows.append(row)
            if "error" in row:
                print(f"{row['d']},{row['dy']},{row['seed']} {row['method']}: {row['error']}", file=sys.stderr)
            else:
                print(table([row]).splitlines()[-1], flush=True)
    print(f"{len(rows)} rows written to {out} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
