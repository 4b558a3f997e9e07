"""Draw N posterior samples per measurement from a trained flow, in one batch (or chunks).

    python sample.py runs/d2 --y 1.3 --n 5000 --out samples.safetensors
    python sample.py runs/d2 --y-file measurements.npz --n 10000 --out samples.npz
    python sample.py runs/d2 --from-prior 8 --n 4000 --out samples.safetensors   # fresh y, truth kept
Writes samples (B, N, ...), mean and std (B, ...), log_q (B, N), y, and x_true when known.
"""
import argparse

from aps.cli import one_line_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="folder written by train.py")
    src = p.add_argument_group("measurements (one of)")
    src.add_argument("--y", help="one measurement as comma-separated numbers")
    src.add_argument("--y-file", help=".npz or .safetensors with an array 'y' of shape (B, *y_shape)")
    src.add_argument("--from-prior", type=int, metavar="B", help="make B measurements of fresh prior samples")
    p.add_argument("--n", type=int, default=1000, help="posterior samples per measurement (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed: sample j of measurement i depends only on it (default: 0)")
    p.add_argument("--chunk", type=int, default=65536, help="flow evaluations per forward pass (default: 65536)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", default="samples.safetensors", help=".safetensors or .npz output file")
    args = p.parse_args()
    with one_line_errors("sample.py"):
        import torch

        import aps
        from aps.errors import ApsError
        from aps.io import read_tensors, write_tensors

        sampler = aps.load(args.checkpoint, device=args.device)
        if sum(v is not None for v in (args.y, args.y_file, args.from_prior)) != 1:
            raise ApsError("give exactly one of --y, --y-file, --from-prior")
        out = {}
        if args.y is not None:
            try:
                y = torch.tensor([[float(v) for v in args.y.split(",")]])
            except ValueError:
                raise ApsError(f"--y wants comma-separated numbers, got {args.y!r}") from None
        elif args.y_file is not None:
            tensors = read_tensors(args.y_file)
            if "y" not in tensors:
                raise ApsError(f"{args.y_file} has no array named 'y' (it has: {', '.join(tensors) or 'none'})")
            y = tensors["y"].float()
        else:
            if args.from_prior < 1 or sampler.prior is None:
                raise ApsError("--from-prior needs a positive count and a checkpoint whose prior can sample")
            g = torch.Generator().manual_seed(args.seed)
            out["x_true"] = sampler.prior.cpu().sample(args.from_prior, generator=g).float()
            y = sampler.operator.cpu().measure(out["x_true"], generator=g)
            sampler.to(args.device)
        x, log_q = sampler.sample(y, args.n, seed=args.seed, chunk=args.chunk, progress=True)
        out.update(samples=x, log_q=log_q, mean=x.mean(1), std=x.std(1), y=y)
        path = write_tensors(args.out, out)
        print(f"wrote {x.shape[1]} samples for each of {x.shape[0]} measurements to {path}")


if __name__ == "__main__":
    main()
