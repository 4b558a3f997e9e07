"""The comparison solvers (DPS, CM I, CM II, prior samples) on MCGdiff mixture problems, CPU.

    # 1. tune zeta on a problem seed the benchmark does not use (fewer samples), then fix it:
    python scripts/solver_benchmark.py --problems 2,1,3 --solvers dps cm1 --dps-zeta 0.1 0.3 1 3 10 \
        --cm1-zeta 0.01 0.03 0.1 0.3 1 --n-samples 250 --out results/solvers-tune
    # 2. the benchmark, with the chosen values:
    python scripts/solver_benchmark.py --problems 2,1,0 2,1,1 2,1,2 8,2,0 --dps-zeta Z --cm1-zeta Z \
        --out results/solvers

Each (problem, solver, zeta) runs in its own process (one torch thread each). Measurements are the
8 held-out y of aps.evaluate (default seed), the same as scripts/mixture_benchmark.py scores.
The CM solvers use the exact consistency function (aps.solvers.ExactConsistency: the PF-ODE by RK4
in log sigma). Writes <out>/results.jsonl and prints a Markdown table.
"""
import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path


def run_one(job):
    import torch

    from aps.problems import mcgdiff_problem
    from aps.solvers.compare import build_solver, run_solver

    spec, name, opts, args = job
    torch.set_num_threads(1)  # many small jobs on a shared CPU: one thread each
    d, dy, seed = (int(v) for v in spec.split(","))
    problem = mcgdiff_problem(d, dy, seed)
    solver = build_solver(name, problem.prior, **opts)
    res = run_solver(solver, problem, n_samples=args["n_samples"])
    res["problem"] = spec
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main")
    g.add_argument("--problems", nargs="+", default=["2,1,0", "2,1,1", "2,1,2", "8,2,0"], help="MCGdiff specs d,dy,seed")
    g.add_argument("--solvers", nargs="+", default=["prior", "dps", "cm1", "cm2"], choices=["prior", "dps", "cm1", "cm2"])
    g.add_argument("--n-samples", type=int, default=1000, help="samples per measurement (8 measurements)")
    g = p.add_argument_group("solver options (a list runs a grid)")
    g.add_argument("--dps-zeta", type=float, nargs="+", default=[1.0], help="DPS step on grad ||y - A(x0_hat)||")
    g.add_argument("--dps-steps", type=int, default=1000, help="DPS ancestral steps")
    g.add_argument("--cm1-zeta", type=float, nargs="+", default=[0.1], help="CM I step: zeta * sigma_i * grad L")
    g.add_argument("--cm1-steps", type=int, default=200, help="CM I Karras steps (1000 in the paper)")
    g.add_argument("--cm-ode-steps", type=int, default=24, help="RK4 steps of the exact ODE consistency function")
    g.add_argument("--cm2-k", type=int, default=50, help="CM II Adam steps per stage")
    g.add_argument("--cm2-lr1", type=float, nargs="+", default=[0.1], help="CM II stage-1 Adam lr (on x_T)")
    g.add_argument("--cm2-lr2", type=float, default=1e-3, help="CM II stage-2 Adam lr (on z)")
    g = p.add_argument_group("performance and I/O")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--out", default="results/solvers")
    g.add_argument("--table", nargs="+", metavar="JSONL", help="only print the BENCHMARKS.md table of these results files")
    args = p.parse_args()
    if args.table:
        from aps.solvers.compare import compact_table

        print(compact_table([json.loads(line) for f in args.table for line in open(f) if line.strip()]))
        return

    common = dict(cm_ode_steps=args.cm_ode_steps)
    grids = {
        "prior": [{}],
        "dps": [dict(dps_zeta=z, dps_steps=args.dps_steps) for z in args.dps_zeta],
        "cm1": [dict(cm1_zeta=z, cm1_steps=args.cm1_steps, **common) for z in args.cm1_zeta],
        "cm2": [dict(cm2_k=args.cm2_k, cm2_lr1=lr, cm2_lr2=args.cm2_lr2, **common) for lr in args.cm2_lr1],
    }
    # Slowest first, so the pool does not end waiting on one long job.
    order = {"cm1": 0, "cm2": 1, "dps": 2, "prior": 3}
    jobs = [(spec, name, opts, vars(args)) for name in sorted(args.solvers, key=order.get)
            for spec in args.problems[::-1] for opts in grids[name]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from aps.solvers.compare import table

    results = []
    with mp.get_context("spawn").Pool(args.workers) as pool, open(out / "results.jsonl", "a") as log:
        for res in pool.imap_unordered(run_one, jobs, chunksize=1):
            results.append(res)
            log.write(json.dumps(res) + "\n")
            log.flush()
            print(table([res]).splitlines()[-1], flush=True)
    results.sort(key=lambda r: (r["problem"], order[r["solver"]]))
    print(table(results))
    print(f"machine: CPU, {args.workers} worker process(es), 1 torch thread each; command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
