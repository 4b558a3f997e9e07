"""APS against the iterative solvers on the same prior and the same measurements: one table.

    python benchmark.py --checkpoint runs/d2                      # an APS flow (aps.load) vs DPS, CM I, CM II
    python benchmark.py --mcgdiff 2,1,0 --solvers prior dps cm1   # solvers only, on an MCGdiff problem
    python benchmark.py --checkpoint runs/d2 --cm1-steps 100 --cm1-zeta 3 --json out.json   # 10x cheaper CM I

Mixture problems only: every method is scored against the exact posterior on the 8 held-out
measurements of aps.evaluate (the ones scripts/mixture_benchmark.py uses), with mode-weight TV,
sliced Wasserstein (and its noise floor), KL where the method gives log q, NFE and seconds per sample.
The CM solvers use the mixture's exact consistency function (its PF-ODE, RK4 in log sigma).
"""
import argparse
import json
import sys

from aps.cli import one_line_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="APS flow checkpoint folder (its problem is the benchmark's)")
    src.add_argument("--mcgdiff", help="no flow: an MCGdiff problem d,dy,seed for the solvers alone")
    g.add_argument("--solvers", nargs="+", default=["prior", "dps", "cm1", "cm2"], choices=["prior", "dps", "cm1", "cm2"])
    g.add_argument("--n-samples", type=int, default=1000, help="samples per measurement")
    g.add_argument("--n-measurements", type=int, default=8, help="held-out measurements")
    g = p.add_argument_group("solver hyperparameters (defaults: tuned on MCGdiff 2,1,3; BENCHMARKS.md)")
    g.add_argument("--dps-zeta", type=float, default=1.0, help="DPS step on grad ||y - A(x0_hat)||_2")
    g.add_argument("--dps-steps", type=int, default=None, help="DPS steps (default 1000)")
    g.add_argument("--cm1-zeta", type=float, default=1.0, help="CM I step: zeta * sigma_i * grad L (3 was best at 100 steps)")
    g.add_argument("--cm1-steps", type=int, default=1000, help="CM I Karras steps (1000 as in the paper; 100 is 10x cheaper)")
    g.add_argument("--cm-ode-steps", type=int, default=24, help="RK4 steps of the exact ODE consistency function")
    g.add_argument("--cm2-k", type=int, default=50, help="CM II Adam steps per stage")
    g.add_argument("--cm2-lr1", type=float, default=1.0, help="CM II stage-1 Adam lr (the paper's 0.1 did worse here)")
    g = p.add_argument_group("performance and I/O")
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument("--progress", action="store_true", help="tqdm bars")
    g.add_argument("--json", help="write all per-measurement results here")
    args = p.parse_args()

    with one_line_errors("benchmark.py"):
        import torch

        from aps.solvers.compare import build_solver, run_aps, run_solver, table

        torch.set_num_threads(args.threads)
        if args.checkpoint:
            import aps
            from aps.problems import MixtureProblem

            sampler = aps.load(args.checkpoint)
            problem = MixtureProblem(sampler.prior, sampler.operator)
            label = args.checkpoint
        else:
            from aps.problems import mcgdiff_problem

            d, dy, seed = (int(v) for v in args.mcgdiff.split(","))
            problem, sampler, label = mcgdiff_problem(d, dy, seed), None, args.mcgdiff
        results = []
        if sampler is not None:
            results.append(run_aps(sampler, problem, args.n_samples, args.n_measurements))
        opts = dict(dps_zeta=args.dps_zeta, dps_steps=args.dps_steps, cm1_zeta=args.cm1_zeta, cm1_steps=args.cm1_steps,
                    cm_ode_steps=args.cm_ode_steps, cm2_k=args.cm2_k, cm2_lr1=args.cm2_lr1, progress=args.progress)
        for name in args.solvers:
            results.append(run_solver(build_solver(name, problem.prior, **opts), problem, args.n_samples,
                                      args.n_measurements))
        for r in results:
            r["problem"] = label
        print(table(results))
        print(f"(CPU, {args.threads} torch thread(s); {args.n_measurements} held-out y x {args.n_samples} samples; "
              f"command: {' '.join(sys.argv)})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
