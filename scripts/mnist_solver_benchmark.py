"""APS vs DPS, CM solver I and CM solver II on MNIST: one operator, the same held-out digits, one prior.

    python scripts/mnist_solver_benchmark.py --aps checkpoints/mnist-sr-flow --cm checkpoints/mnist-cm \
        --n-images 100 --device cuda --out results/mnist-solvers-sr.json
    python scripts/mnist_solver_benchmark.py --aps checkpoints/mnist-sr-flow --n-images 2 --n-tune 2 \
        --dps-zeta 1 --steps 5 --solvers dps --device cpu                                       # smoke

The operator (and its options) is the APS flow's own (`aps.load(--aps).operator`), so every method sees
the same A, noise level and measurements. Digits: held-out MNIST-5k indices 0..n-1 are scored; indices
--tune-first.. (--n-tune of them; no other benchmark scores them) tune each solver's step size.
Tuning is fair and cheap: every candidate setting runs on the tuning digits and the scored digits in one
batch (rows are independent), the setting with the best tuning score (PSNR; class accuracy for the
classifier) is chosen, and only its scored-digit rows are reported. One posterior sample per digit for every
method (single-sample PSNR/SSIM); APS also reports its posterior mean over --aps-mean samples.
Measurement noise from --seed; the solvers' noise from --seed as well (one generator per run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main")
    g.add_argument("--aps", required=True, help="an APS flow checkpoint: its operator is the benchmark's")
    g.add_argument("--prior", default="checkpoints/mnist-prior")
    g.add_argument("--cm", default="checkpoints/mnist-cm", help="distilled consistency model (CM I and CM II)")
    g.add_argument("--solvers", nargs="+", default=["dps", "cm1", "cm2"], choices=["dps", "cm1", "cm2"])
    g.add_argument("--n-images", type=int, default=100, help="held-out digits 0..n-1 scored")
    g.add_argument("--tune-first", type=int, default=400, help="first held-out digit of the tuning set")
    g.add_argument("--n-tune", type=int, default=20)
    g = p.add_argument_group("solver settings (each list is a tuning grid)")
    g.add_argument("--dps-zeta", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    g.add_argument("--steps", type=int, default=1000, help="DPS steps and CM I Karras steps (1000 in both papers)")
    g.add_argument("--cm1-zeta", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    g.add_argument("--cm2-lr1", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    g.add_argument("--cm2-k", type=int, default=50, help="Adam steps of each CM II stage")
    g.add_argument("--aps-mean", type=int, default=100, help="APS samples per digit for the posterior mean")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="results/mnist-solvers.json")
    args = p.parse_args(argv)

    import torch

    import aps
    from aps.data import load_mnist, load_mnist_labels
    from aps.metrics import psnr, ssim
    from aps.priors.diffusers_prior import DiffusersPrior
    from aps.solvers import CMDPS, DPS, CMInversion

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    sampler = aps.load(args.aps, device=device)
    op = sampler.operator
    prior = DiffusersPrior.from_pretrained(args.prior).to(device)
    n, nt = args.n_images, args.n_tune
    test = load_mnist("test", prior.event_shape[-1])
    x_true = torch.cat([test[:n], test[args.tune_first: args.tune_first + nt]]).to(device)
    labels = load_mnist_labels("test")
    y = op.measure(x_true, generator=torch.Generator(device).manual_seed(args.seed))
    is_class = getattr(op, "sigma_y", None) is None and hasattr(op, "n_classes")

    def scores(x):
        """Per-digit (psnr, ssim, class hit or None) of one sample per digit x (M, C, H, W)."""
        x = x.reshape(x_true.shape).clamp(-1, 1)
        hit = (op.net(x).argmax(1) == y.reshape(-1).long()).double() if is_class else None
        return psnr(x, x_true), ssim(x, x_true), hit

    def row(name, config, x, stats):
        ps, ss, hit = scores(x)
        r = {"solver": name, "config": config, "psnr": float(ps[:n].mean()), "psnr_se": float(ps[:n].std() / n ** 0.5),
             "ssim": float(ss[:n].mean()), "tune_psnr": float(ps[n:].mean()),
             "nfe": stats.get("nfe"), "seconds_per_sample": stats.get("seconds_per_sample")}
        if hit is not None:
            r["class_accuracy"], r["tune_class_accuracy"] = float(hit[:n].mean()), float(hit[n:].mean())
        print(json.dumps(r), flush=True)
        return r

    rows = []
    # APS: one flow pass per sample; timing of the 1-sample batch and of the posterior-mean batch.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sampler.sample(y[:2], 2, seed=args.seed)  # warm-up
    sync(); t0 = time.perf_counter()
    x1, _ = sampler.sample(y, 1, seed=args.seed)
    sync(); t1 = time.perf_counter()
    xm, _ = sampler.sample(y, args.aps_mean, seed=args.seed + 1)
    sync(); t2 = time.perf_counter()
    rows.append(row("aps", {"checkpoint": args.aps}, x1, {"nfe": 1, "seconds_per_sample": (t1 - t0) / len(y)}))
    rows.append(row("aps (posterior mean)", {"checkpoint": args.aps, "samples": args.aps_mean}, xm.mean(1),
                    {"nfe": args.aps_mean, "seconds_per_sample": (t2 - t1) / len(y)}))

    candidates = {"dps": [DPS(z, args.steps) for z in args.dps_zeta]} if "dps" in args.solvers else {}
    if {"cm1", "cm2"} & set(args.solvers):
        from aps.solvers.consistency_model import ConsistencyModel

        cm = ConsistencyModel.from_pretrained(args.cm).to(device)
        if "cm1" in args.solvers:
            candidates["cm1"] = [CMDPS(cm, z, args.steps) for z in args.cm1_zeta]
        if "cm2" in args.solvers:
            candidates["cm2"] = [CMInversion(cm, k1=args.cm2_k, k2=args.cm2_k, lr1=lr) for lr in args.cm2_lr1]
    tuning = []
    for name, solvers in candidates.items():
        best = None
        for solver in solvers:
            x = solver.sample(prior, op, y, 1, torch.Generator(device).manual_seed(args.seed))
            r = row(name, solver.config(), x, solver.stats)
            tuning.append(r)
            key = r["tune_class_accuracy"] if is_class else r["tune_psnr"]
            if best is None or key > best[0]:
                best = (key, r)
        rows.append({**best[1], "chosen_by": "tune_class_accuracy" if is_class else "tune_psnr"})

    summary = {"operator": op.config(), "n_images": n, "tune_digits": [args.tune_first, args.tune_first + nt],
               "seed": args.seed, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "command": " ".join(sys.argv), "rows": rows, "tuning": tuning,
               "digit_labels": labels[:n].tolist()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    return 0


def markdown(summary: dict) -> str:
    lines = ["| method | setting | PSNR (dB) | SSIM | class acc. | NFE / sample | s / sample |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in ("name", "cm", "checkpoint")) or "-"
        acc = f"{r['class_accuracy']:.2f}" if "class_accuracy" in r else "-"
        lines.append(f"| {r['solver']} | {opts} | {r['psnr']:.2f} ± {r['psnr_se']:.2f} | {r['ssim']:.3f} | {acc} | "
                     f"{r['nfe']} | {r['seconds_per_sample']:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
