"""How noisy the APS gradient is per GPU-second, for each way of drawing its expectations.

    python scripts/elbo_gradient_variance.py --flow checkpoints/mnist-sr-flow --device cuda --reps 16 \
        --out elbo_variance.json

For one fixed flow and one fixed batch of measurements, each estimator (flow samples z per y, ELBO draws
(t, eps) per x, how the times are stratified, antithetic noise) gives `--reps` independent estimates of
the gradient of the APS term (aps.objective, tempering off). Reported per estimator: the total variance
tr Cov(g) = E||g - mean g||^2, the seconds one estimate takes (device synchronised), and their product,
the variance of a gradient averaged over one second of such estimates: lower is better, and it is the
number to compare, since an estimator twice as costly must halve the variance to break even.
"""
import argparse
import json
import time

import torch


ESTIMATORS = {  # name: (n_z, n_elbo, strata, antithetic)
    "z4_t8": (4, 8, "item", False),
    "z2_t2": (2, 2, "item", False),
    "z1_t1": (1, 1, "item", False),
    "z1_t1_batch": (1, 1, "batch", False),
    "z1_t2": (1, 2, "item", False),
    "z1_t2_batch": (1, 2, "batch", False),
    "z1_t2_anti": (1, 2, "item", True),
    "z2_t1_batch": (2, 1, "batch", False),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flow", default="checkpoints/mnist-sr-flow", help="an image-flow checkpoint folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=64, help="measurements y in the fixed batch")
    p.add_argument("--reps", type=int, default=16, help="gradient estimates per estimator")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--bf16", action="store_true", help="the UNet under bf16 autocast, as training runs it")
    p.add_argument("--out", default="elbo_variance.json")
    args = p.parse_args()

    from aps import objective
    from aps.sampling import heldout_measurements, load

    torch.manual_seed(0)
    sampler = load(args.flow, device=args.device)
    flow = sampler.flow.train()
    y, _, _ = heldout_measurements(sampler, 0, args.batch_size)  # a fixed batch of held-out measurements
    prior, op = sampler.task.prior.load().to(args.device), sampler.operator.to(args.device)
    prior.autocast_bf16 = args.bf16
    y = y.to(args.device)
    params = [q for q in flow.parameters() if q.requires_grad]
    results = {"flow": args.flow, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "batch": args.batch_size, "reps": args.reps, "bf16": args.bf16,
               "estimators": []}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for name in args.estimators:
        n_z, n_elbo, strata, anti = ESTIMATORS[name]

        def grad():
            terms = objective.aps_terms(flow, prior, op, y, n_z=n_z, n_elbo=n_elbo, elbo_strata=strata,
                                        elbo_antithetic=anti)
            loss = objective.expectation(objective.aps_loss(terms), terms["weight"]).mean()
            g = torch.autograd.grad(loss, params)
            return torch.cat([v.flatten().float() for v in g]), float(loss)

        grad()  # warm-up (cuDNN autotuning, allocator)
        sync()
        t0 = time.perf_counter()
        grads, losses = [], []
        for _ in range(args.reps):
            g, loss = grad()
            grads.append(g)
            losses.append(loss)
        sync()
        seconds = (time.perf_counter() - t0) / args.reps
        g = torch.stack(grads)
        total_var = float((g - g.mean(0)).pow(2).sum(1).mean() * args.reps / (args.reps - 1))
        row = {"estimator": name, "n_z": n_z, "n_elbo": n_elbo, "strata": strata, "antithetic": anti,
               "seconds_per_estimate": seconds, "grad_total_variance": total_var,
               "variance_x_seconds": total_var * seconds, "grad_norm_mean": float(g.mean(0).norm()),
               "loss_mean": sum(losses) / len(losses), "loss_std": float(torch.tensor(losses).std())}
        results["estimators"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    base = results["estimators"][0]["variance_x_seconds"]
    print(f"{'estimator':14s} {'s/est':>8s} {'tr Cov g':>12s} {'var x s':>12s} {'rel':>6s} {'|E g|':>10s}")
    for r in results["estimators"]:
        print(f"{r['estimator']:14s} {r['seconds_per_estimate']:8.4f} {r['grad_total_variance']:12.4g} "
              f"{r['variance_x_seconds']:12.4g} {r['variance_x_seconds'] / base:6.2f} {r['grad_norm_mean']:10.4g}")


if __name__ == "__main__":
    main()
