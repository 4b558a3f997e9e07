"""Evaluate an MNIST diffusion prior folder: sample grid, memorisation check, held-out ELBO in bits/dim.

    python scripts/evaluate_prior.py checkpoints/mnist-prior --out checkpoints/mnist-prior
    python scripts/evaluate_prior.py /tmp/prior --n-samples 8 --sampling-steps 10 --n-draws 4 --n-test 8  # smoke

Writes samples.png (the first --grid samples), nearest.png (samples over their nearest training digits)
and eval.json (every number, and the settings that produced it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from aps.data import load_mnist
from aps.errors import ApsError
from aps.priors import DiffusersPrior
from aps.recipes.prior_eval import (elbo_bits_per_dim, image_grid, memorisation_report, nearest_distances,
                                    save_png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prior", help="prior folder (DDPMPipeline layout: unet/, scheduler/)")
    g = p.add_argument_group("samples")
    g.add_argument("--n-samples", type=int, default=1000, help="DDPM samples for the memorisation check")
    g.add_argument("--grid", type=int, default=64, help="samples shown in samples.png")
    g.add_argument("--sampling-steps", type=int, default=1000, help="DDPM ancestral steps (1000 = all)")
    g.add_argument("--sample-batch", type=int, default=1000, help="samples drawn at once")
    g = p.add_argument_group("ELBO")
    g.add_argument("--n-test", type=int, default=500, help="held-out digits scored (500 = all)")
    g.add_argument("--n-draws", type=int, default=1000, help="(t, eps, dequantisation) draws per digit")
    g.add_argument("--elbo-batch", type=int, default=4096, help="noised images per UNet call")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="", help="output folder (default: the prior folder)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16-sampling", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast while sampling (the ELBO is always fp32)")
    args = p.parse_args(argv)
    try:
        report = evaluate(args)
    except ApsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def evaluate(args) -> dict:
    if min(args.n_samples, args.grid, args.sampling_steps, args.n_test, args.n_draws) < 1:
        raise ApsError("--n-samples, --grid, --sampling-steps, --n-test and --n-draws must be at least 1")
    out = Path(args.out or args.prior)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    prior = DiffusersPrior.from_pretrained(args.prior).to(device)
    train, test = load_mnist("train").to(device), load_mnist("test")[: args.n_test].to(device)
    gen = torch.Generator(device).manual_seed(args.seed)
    report = {"prior": str(args.prior), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "settings": {k: v for k, v in vars(args).items() if k not in ("prior", "out")}}

    # (a) samples: DDPM ancestral sampling with the scheduler
    t0 = time.time()
    prior.autocast_bf16 = args.bf16_sampling and device.type == "cuda"
    samples = torch.cat([prior.sample(min(args.sample_batch, args.n_samples - i), generator=gen,
                                      num_inference_steps=args.sampling_steps)
                         for i in range(0, args.n_samples, args.sample_batch)])  # (N, 1, 32, 32)
    prior.autocast_bf16 = False
    report["sampling_seconds"] = round(time.time() - t0, 1)
    save_png(image_grid(samples[: args.grid], nrow=8), out / "samples.png")

    # (b) memorisation: nearest training digit of each sample vs. of each held-out digit
    report["memorisation"] = memorisation_report(samples, train, test)
    _, nn_idx = nearest_distances(samples[:16], train)
    save_png(image_grid(torch.cat([samples[:8], train[nn_idx[:8]], samples[8:16], train[nn_idx[8:16]]]), nrow=8),
             out / "nearest.png")

    # (c) ELBO of the held-out digits, dequantised, in bits/dim on the 0..256 scale
    t0 = time.time()
    bpd = elbo_bits_per_dim(prior, test, n_draws=args.n_draws, batch=args.elbo_batch, generator=gen)
    report["elbo"] = {"bits_per_dim": float(bpd.mean()), "std_err": float(bpd.std() / len(bpd) ** 0.5),
                      "n_test": len(bpd), "n_draws": args.n_draws, "seconds": round(time.time() - t0, 1)}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
