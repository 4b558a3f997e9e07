"""Where the 90% intervals of image posteriors miss: coverage by region, for APS flows and for DPS on the same prior.

    python scripts/image_calibration.py checkpoints/mnist-denoise-flow checkpoints/mnist-sr-flow \
        --dps-zeta 0.3 1.0 --n-heldout 40 --dps-digits 16 --dps-samples 32 --device cuda --out calib.json

A calibrated sampler covers 90% of the truth on any set of pixels chosen from y alone
(aps.evaluate_images.coverage_by_region: "stroke" = where the posterior mean is ink, "background", and for
masks "unobserved" / "observed"), so the aggregate coverage90 of scripts/image_benchmark.py can hide an
over-confident region behind a too-wide one. DPS (--dps-zeta, one per checkpoint: the step size tuned in
BENCHMARKS.md's solver comparison; 0 skips it) samples the same prior's posterior by another route: where it
covers and the flow does not, the flow is at fault, not the prior. Held-out digits 0..n-1, measured as in
sample.py --heldout; DPS on the first --dps-digits of them, --dps-samples chains each, and the flow again on those digits
with as many samples ("aps_matched": with few samples the empirical 90% interval covers less for any sampler).
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="APS image flow folders")
    p.add_argument("--prior", default="checkpoints/mnist-prior", help="the prior DPS samples (the flows' own)")
    p.add_argument("--dps-zeta", type=float, nargs="*", default=[], help="DPS step size per checkpoint (0 = no DPS)")
    p.add_argument("--steps", type=int, default=1000, help="DPS steps")
    p.add_argument("--n-heldout", type=int, default=40, help="held-out digits scored for the flows")
    p.add_argument("--n-samples", type=int, default=100, help="flow samples per digit")
    p.add_argument("--dps-digits", type=int, default=16, help="digits (the first ones) DPS samples")
    p.add_argument("--dps-samples", type=int, default=32, help="DPS chains per digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="image_calibration.json")
    args = p.parse_args(argv)

    from aps.cli import one_line_errors

    with one_line_errors("image_calibration.py"):
        import torch

        import aps
        from aps.errors import ApsError
        from aps.evaluate_images import coverage_by_region
        from aps.priors.diffusers_prior import DiffusersPrior
        from aps.sampling import heldout_measurements
        from aps.solvers import DPS

        zetas = args.dps_zeta or [0.0] * len(args.checkpoints)
        if len(zetas) != len(args.checkpoints):
            raise ApsError(f"--dps-zeta: give one step size per checkpoint ({len(args.checkpoints)}), got {len(zetas)}")
        prior = None
        results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "args": vars(args), "flows": {}}
        for ckpt, zeta in zip(args.checkpoints, zetas):
            sampler = aps.load(ckpt, device=args.device)
            y, x_true, _ = heldout_measurements(sampler, 0, args.n_heldout, seed=args.seed)
            x, _ = sampler.sample(y.to(args.device), args.n_samples, seed=args.seed)
            k = args.dps_digits
            entry = {"aps": coverage_by_region(x.cpu(), x_true, sampler.operator),
                     # the flow as DPS is scored: the same digits and as many samples (few samples narrow the interval)
                     "aps_matched": coverage_by_region(x[:k, : args.dps_samples].cpu(), x_true[:k], sampler.operator)}
            if zeta > 0:
                if prior is None:
                    prior = DiffusersPrior.from_pretrained(args.prior).to(args.device)
                g = torch.Generator(args.device).manual_seed(args.seed)
                xd = DPS(zeta, args.steps).sample(prior, sampler.operator, y[:k].to(args.device), args.dps_samples, g)
                xd = xd.clamp(-1, 1).cpu()  # (k, dps_samples, C, H, W)
                entry["dps"] = coverage_by_region(xd, x_true[:k], sampler.operator)
                entry["dps_zeta"] = zeta
            results["flows"][Path(ckpt).name] = entry
            print(Path(ckpt).name, json.dumps(entry), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| flow | sampler | all | stroke (share) | background | unobserved | observed |", "|---|---|---|---|---|---|---|"]
    for name, e in results["flows"].items():
        for who in ("aps", "aps_matched", "dps"):
            if who not in e:
                continue
            c = e[who]
            cell = lambda r: f"{c[r][0]:.3f}" if r in c else "-"  # noqa: E731
            lines.append(f"| {name} | {who} | {cell('all')} | {cell('stroke')} ({c['stroke'][1]:.2f}) | "
                         f"{cell('background')} | {cell('unobserved')} | {cell('observed')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
