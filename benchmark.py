"""APS against DPS, the CM solvers (and DDRM where installed) on one checkpoint: one table, a JSON file, figures.

    python benchmark.py runs/d2                                       # a mixture flow vs DPS, CM I, CM II
    python benchmark.py checkpoints/mnist-sr-flow --cm checkpoints/mnist-cm --device cuda --budget-s 60
    python benchmark.py runs/mnist-sr-cal --solvers aps --n-measurements 200 --n-samples 100   # APS alone

Every method sees the same held-out measurements (mixtures: fresh prior draws, scored against the exact
posterior; images: held-out digits 0..n-1, scored against the digit). Each iterative solver's step size is
first tuned on separate measurements over the grid given (a single value: no tuning), and the table says
which value won. Calibration: expected-coverage curves (per dimension or per pixel region), TARP and, for
mixtures, SBC ranks and the exact posterior's HPD coverage. --budget-s bounds each method's scored run (and
each tuning candidate): a solver past it stops with what it has, and the table says where.
Writes OUT/benchmark.json after every method (a killed run keeps what it has) and OUT/figures/*.png.
"""
import argparse
import sys

from aps.benchmark.config import BenchmarkConfig
from aps.cli import one_line_errors

D = BenchmarkConfig()


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main")
    g.add_argument("checkpoint", help="APS flow folder (train.py's); its prior and operator are the benchmark's")
    g.add_argument("--solvers", nargs="+", default=D.solvers, metavar="NAME",
                   help="methods by name: aps, prior, dps, cm1, cm2, ddrm (default: %(default)s)")
    g.add_argument("--n-measurements", type=int, help="held-out measurements scored (default: 32 mixture, 16 image)")
    g.add_argument("--n-samples", type=int, help="samples per measurement (default: 256 mixture, 32 image)")
    g.add_argument("--n-tune", type=int, default=D.n_tune, help="separate measurements for tuning (default: %(default)s)")
    g.add_argument("--tune-samples", type=int, default=D.tune_samples, help="samples per tuning measurement (0: n-samples, at most 64)")
    g.add_argument("--tune-first", type=int, default=D.tune_first, help="images: first tuning digit (default: %(default)s)")
    g.add_argument("--heldout-data", help="images: score on the held-out images of this data set (mnist, digits8) "
                                          "instead of the checkpoint's own: needed for flows trained with --data prior")
    g.add_argument("--budget-s", type=positive_float, help="seconds per method's run (default: no limit)")
    g = p.add_argument_group("solvers (a list is a tuning grid)")
    g.add_argument("--aps-temperature", type=positive_float, nargs="+", default=D.aps_temperature, metavar="T",
                   help="the flow's latent temperature (default: 1, the flow itself); a list is chosen on the tuning "
                        "measurements by calibration: the T whose 90%% stroke coverage (mixtures: coverage) is "
                        "nearest 0.9")
    g.add_argument("--dps-zeta", type=positive_float, nargs="+", default=D.dps_zeta)
    g.add_argument("--dps-steps", type=int, default=D.dps_steps, help="DPS steps (default: every prior timestep)")
    g.add_argument("--cm1-zeta", type=positive_float, nargs="+", default=D.cm1_zeta)
    g.add_argument("--cm1-steps", type=int, default=D.cm1_steps, help="CM I Karras steps (default: %(default)s)")
    g.add_argument("--cm2-lr1", type=positive_float, nargs="+", default=D.cm2_lr1, help="CM II stage-1 Adam lr")
    g.add_argument("--cm2-k", type=int, default=D.cm2_k, help="CM II Adam steps per stage (default: %(default)s)")
    g.add_argument("--ddrm-eta", type=positive_float, nargs="+", default=D.ddrm_eta)
    g.add_argument("--ddrm-steps", type=int, default=D.ddrm_steps)
    g.add_argument("--cm", default=D.cm, help="images: consistency model folder (default: %(default)s)")
    g.add_argument("--cm-ode-steps", type=int, default=D.cm_ode_steps, help="mixtures: RK4 steps of the exact CM")
    g = p.add_argument_group("performance and I/O")
    g.add_argument("--device", default=D.device)
    g.add_argument("--threads", type=int, default=D.threads, help="torch CPU threads (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=D.batch_size, help="rows per solver call (default: %(default)s)")
    g.add_argument("--throughput-batch", type=int, default=D.throughput_batch)
    g.add_argument("--seed", type=int, default=D.seed)
    g.add_argument("--judge", default=D.judge, help="classifier operators: a second classifier ('' = none)")
    g.add_argument("--out", default=D.out, help="folder for benchmark.json and figures/ (default: %(default)s)")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    with one_line_errors("benchmark.py"):
        from aps.benchmark import footer, run_benchmark, table
        from aps.errors import ApsError

        for key in ("dps_steps", "cm1_steps", "cm2_k", "ddrm_steps", "cm_ode_steps", "threads"):
            v = getattr(args, key)
            if v is not None and v < 1:
                raise ApsError(f"--{key.replace('_', '-')} must be at least 1, got {v}")
        if args.tune_first < 0:
            raise ApsError(f"--tune-first must be >= 0, got {args.tune_first}")
        cfg = BenchmarkConfig(
            checkpoint=args.checkpoint, solvers=args.solvers, n_measurements=args.n_measurements,
            n_samples=args.n_samples, n_tune=args.n_tune, tune_samples=args.tune_samples, tune_first=args.tune_first,
            aps_temperature=args.aps_temperature,
            dps_zeta=args.dps_zeta, dps_steps=args.dps_steps, cm1_zeta=args.cm1_zeta, cm1_steps=args.cm1_steps,
            cm2_lr1=args.cm2_lr1, cm2_k=args.cm2_k, ddrm_eta=args.ddrm_eta, ddrm_steps=args.ddrm_steps, cm=args.cm,
            cm_ode_steps=args.cm_ode_steps, budget_s=args.budget_s, device=args.device, threads=args.threads,
            batch_size=args.batch_size, throughput_batch=args.throughput_batch, seed=args.seed, out=args.out,
            heldout_data=args.heldout_data, judge=args.judge, figures=not args.no_figures, progress=not args.no_progress,
            command="python " + " ".join(sys.argv))
        report = run_benchmark(cfg)
        print(table(report))
        print()
        print(footer(report))
        print(f"wrote {args.out}/benchmark.json" + (f" and {len(report.get('figures', []))} figures" if cfg.figures else ""))


if __name__ == "__main__":
    main()
