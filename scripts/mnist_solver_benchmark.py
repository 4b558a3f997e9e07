"""DPS with the shipped MNIST prior on a few held-out digits, CPU: PSNR / SSIM / NFE / seconds per sample.

    python scripts/mnist_solver_benchmark.py --operator sr --op-arg factor=4 --n-images 4 --zeta 1 \
        --steps 1000 --out results/mnist-solvers

The CM solvers need a distilled consistency model of this prior (scripts/distill_cm.py, a GPU recipe);
without one only DPS runs, beside the free baseline A^T y rescaled to the image (nearest upsampling for
sr, y itself for denoise), and an APS flow for the same operator if --aps names one. Digits: --n-images of the MNIST-5k held-out split from --first-image; measurement noise
from --seed. One posterior sample per digit (PSNR of a single sample, not of the posterior mean).
"""
import argparse
import json
import sys
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main")
    g.add_argument("--prior", default="checkpoints/mnist-prior")
    g.add_argument("--operator", default="sr", help="an image operator name (sr, denoise, deblur, ...)")
    g.add_argument("--op-arg", action="append", default=[], metavar="KEY=VALUE", help="operator parameter (JSON value)")
    g.add_argument("--n-images", type=int, default=4)
    g.add_argument("--first-image", type=int, default=0, help="index of the first held-out digit (tune on others)")
    g.add_argument("--aps", default=None, help="an APS flow checkpoint for the same operator (aps.load): adds its row")
    g.add_argument("--cm", default=None, help="a distilled consistency model folder: adds CM I and CM II")
    g = p.add_argument_group("solver hyperparameters")
    g.add_argument("--zeta", type=float, nargs="+", default=[1.0], help="DPS step size(s)")
    g.add_argument("--steps", type=int, default=1000, help="DPS steps (1000 = every DDPM timestep)")
    g.add_argument("--cm1-zeta", type=float, default=1.0)
    g.add_argument("--cm1-steps", type=int, default=1000)
    g = p.add_argument_group("performance and I/O")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="results/mnist-solvers")
    args = p.parse_args()

    import torch

    from aps.data import load_mnist
    from aps.metrics import psnr, ssim
    from aps.operators import build
    from aps.priors.diffusers_prior import DiffusersPrior
    from aps.solvers import CMDPS, DPS, CMInversion

    torch.set_num_threads(args.threads)
    prior = DiffusersPrior.from_pretrained(args.prior)
    params = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.op_arg)}
    op = build(args.operator, image_shape=list(prior.event_shape), **params)
    x_true = load_mnist("test", prior.event_shape[-1])[args.first_image: args.first_image + args.n_images]
    y = op.measure(x_true, generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def score(name, x, stats, config):
        x = x.reshape(x_true.shape)
        row = {"solver": name, "config": config, "psnr": float(psnr(x.clamp(-1, 1), x_true).mean()),
               "ssim": float(ssim(x.clamp(-1, 1), x_true).mean()), **stats}
        print(json.dumps(row), flush=True)
        return row

    rows = []
    if hasattr(op, "adjoint"):
        scale = op.adjoint(torch.ones_like(y)).reshape(len(y), -1).max(1).values  # A^T 1 = 1/f^2 for sr
        rows.append(score("A^T y (rescaled)", op.adjoint(y) / scale.reshape(-1, 1, 1, 1), {"nfe": 0, "seconds_per_sample": 0.0}, {}))
    if args.aps:
        import aps

        sampler = aps.load(args.aps)
        if sampler.operator.config() != op.config():
            raise SystemExit(f"{args.aps} was trained for {sampler.operator.config()}, not {op.config()}")
        t0 = time.perf_counter()
        x, _ = sampler.sample(y, 1, seed=args.seed)
        seconds = time.perf_counter() - t0
        rows.append(score("aps", x, {"nfe": 1, "seconds_per_sample": seconds / len(y)}, {"checkpoint": args.aps}))
    solvers = [DPS(z, args.steps, progress=True) for z in args.zeta]
    if args.cm:
        from aps.solvers.consistency_model import ConsistencyModel

        cm = ConsistencyModel.from_pretrained(args.cm)
        solvers += [CMDPS(cm, args.cm1_zeta, args.cm1_steps, progress=True), CMInversion(cm, progress=True)]
    for solver in solvers:
        x = solver.sample(prior, op, y, 1, torch.Generator().manual_seed(args.seed))
        rows.append(score(solver.name, x, solver.stats, solver.config()))
        torch.save(x, out / f"{solver.name}-{len(rows)}.pt")
    lines = ["| solver | options | PSNR (dB) | SSIM | NFE / sample | s / sample |", "|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "name") or "-"
        lines.append(f"| {r['solver']} | {opts} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nfe']} | {r['seconds_per_sample']:.3g} |")
    print("\n".join(lines))
    print(f"operator {args.operator} {params}, {args.n_images} held-out digits, 1 sample each; CPU, "
          f"{args.threads} thread(s); command: {' '.join(sys.argv)}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
