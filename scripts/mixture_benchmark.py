"""The mixture benchmark: one amortized flow per MCGdiff problem and recipe, scored on held-out y.

    python scripts/mixture_benchmark.py --problems 2,1,0 2,1,1 8,2,0 --recipes reverse aps --steps 4000 \
        --workers 8 --out results/mixture

Each (problem, recipe) trains in its own process (several share one GPU: the flows are small), then
is scored against the exact posterior on 8 held-out measurements (aps.evaluate). Writes
<out>/results.json and prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import sys
import multiprocessing as mp
import time
from pathlib import Path

# Recipes: TrainConfig overrides. "reverse" is plain reverse KL; the others add one lever each.
RECIPES = {
    "reverse": dict(temper_start=1.0, n_z=1, fkl_weight=0.0),
    "reverse_nz4": dict(temper_start=1.0, n_z=4, fkl_weight=0.0),
    "tempered": dict(temper_start=0.02, n_z=4, fkl_weight=0.0),
    "fkl_only_ref": dict(temper_start=1.0, n_z=1, fkl_weight=1.0, aps_weight=0.0),
    "hybrid": dict(temper_start=0.02, n_z=4, fkl_weight=1.0),
    "hybrid_untempered": dict(temper_start=1.0, n_z=4, fkl_weight=1.0),
    "exact_prior_hybrid": dict(temper_start=0.02, n_z=4, fkl_weight=1.0, exact_prior=True),
    # a conditional Gaussian-mixture base q0(z|y) of K components, stratified: ceil(n_z/K) z per component
    "tempered_mixbase": dict(temper_start=0.02, n_z=4, fkl_weight=0.0, flow_base_components=8),
    "hybrid_fourier": dict(temper_start=0.02, n_z=4, fkl_weight=1.0, flow_fourier=16),
    # more and higher Fourier frequencies of y (the mode weights switch within ~sigma_y / spread(y) ~ 0.01)
    "hybrid_fourier64": dict(temper_start=0.02, n_z=4, fkl_weight=1.0, flow_fourier=64, flow_fourier_scale=30.0),
    # a diagnostic, not APS: hybrid_fourier with the mixture's exact -log p(x) in place of its ELBO, to see how much
    # of the remaining error the ELBO (its gap depends on x, so its optimum is not the posterior) accounts for
    "exact_prior_fourier": dict(temper_start=0.02, n_z=4, fkl_weight=1.0, flow_fourier=16, exact_prior=True),
    "hybrid_mixbase": dict(temper_start=0.02, n_z=4, fkl_weight=1.0, flow_base_components=8),
    "hybrid_mixbase25": dict(temper_start=0.02, n_z=4, fkl_weight=1.0, flow_base_components=25, batch_size=64),
    # a gated mixture base (Gaussian mixture regression: weights gated by y, means linear in y, full covariances),
    # fitted by EM to joint prior draws (z, y) before training; stratified: one z per component and y
    "hybrid_gate": dict(temper_start=1.0, n_z=1, fkl_weight=1.0, flow_base_components=25, flow_base_gate=True,
                        flow_fourier=16, batch_size=64),
    "reverse_gate": dict(temper_start=1.0, n_z=1, fkl_weight=0.0, flow_base_components=25, flow_base_gate=True,
                         flow_fourier=16, batch_size=64),
    # K = 25 is the MCGdiff prior's own component count: the same recipe with fewer and more components
    "hybrid_gate_k12": dict(temper_start=1.0, n_z=1, fkl_weight=1.0, flow_base_components=12, flow_base_gate=True,
                            flow_fourier=16, batch_size=64),
    "hybrid_gate_k40": dict(temper_start=1.0, n_z=1, fkl_weight=1.0, flow_base_components=40, flow_base_gate=True,
                            flow_fourier=16, batch_size=64),
}


def run_one(job):
    import torch

    import aps
    from aps.config import TrainConfig
    from aps.evaluate import evaluate_mixture
    from aps.problems import load_problem
    from aps.training import train

    spec, recipe, args = job
    torch.set_num_threads(args["threads"])  # many small jobs: one thread each beats oversubscription
    out = Path(args["out"]) / f"d{spec.replace(',', '_')}-{recipe}"
    fields = dict(mcgdiff=spec, out=str(out), steps=args["steps"], batch_size=args["batch_size"],
                  lr=args["lr"], log_every=100, checkpoint_every=args["steps"], cpu=args["device"] == "cpu",
                  flow_layers=args["flow_layers"], flow_hidden=args["flow_hidden"], max_seconds=args["max_seconds"])
    cfg = TrainConfig(**{**fields, **RECIPES[recipe]})  # a recipe may also set the batch size
    out.mkdir(parents=True, exist_ok=True)
    sys.stderr = open(out / "train.log", "w")  # progress bars of parallel jobs would interleave
    t0 = time.time()
    train(cfg)
    seconds = time.time() - t0
    sampler = aps.load(out, device=args["device"])
    res = evaluate_mixture(sampler, load_problem(out / "problem.safetensors"), n_measurements=8, n_samples=4000)
    steps_done = json.loads((out / "config.json").read_text())["step"]
    res.update(problem=spec, recipe=recipe, train_seconds=seconds, steps=steps_done, batch_size=cfg.batch_size)
    if args["machine"]:
        res["machine"] = args["machine"]
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def table(results) -> str:
    lines = ["| problem d,dy,seed | recipe | modes>=1% (mean) | TV mean / max | KL mean (nats) | SW / floor (mean) | prior TV | steps x batch | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, p = r["summary"]["flow"], r["summary"]["prior"]
        lines.append(f"| {r['problem']} | {r['recipe']} | {f['modes']['mean']:.2f} | {f['tv']['mean']:.3f} / "
                     f"{f['tv']['max']:.3f} | {f['kl']['mean']:.3f} | {f['sw']['mean']:.3f} / {f['sw_floor']['mean']:.3f} "
                     f"({f['sw_over_floor']['mean']:.2f}x) | {p['tv']['mean']:.3f} | {r['steps']}x{r['batch_size']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", nargs="+", default=["2,1,0", "2,1,1", "2,1,2"], help="MCGdiff specs d,dy,seed")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--flow-layers", type=int, default=8)
    p.add_argument("--flow-hidden", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=0.0, help="training time limit per job (0 = none)")
    p.add_argument("--workers", type=int, default=4, help="training processes at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the flows are small and launch-bound: "
                   "many CPU processes outrun one GPU)")
    p.add_argument("--out", default="results/mixture")
    p.add_argument("--machine", default="", help="recorded in each result row, e.g. 'dev CPU, 1 thread, 2026-11-25'")
    args = p.parse_args()
    jobs = [(spec, recipe, vars(args)) for spec in args.problems for recipe in args.recipes]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    with mp.get_context("spawn").Pool(args.workers) as pool, open(Path(args.out) / "results.jsonl", "a") as log:
        for res in pool.imap_unordered(run_one, jobs, chunksize=1):  # results land as they finish
            results.append(res)
            log.write(json.dumps(res) + "\n")
            log.flush()
            print(table([res]).splitlines()[-1], flush=True)
    results.sort(key=lambda r: (r["problem"], r["recipe"]))
    print(table(results))


if __name__ == "__main__":
    main()
