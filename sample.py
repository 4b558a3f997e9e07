"""Draw N posterior samples per measurement from a trained flow, in one batch (or chunks).

    python sample.py runs/d2 --y 1.3 --n 5000 --out samples.safetensors
    python sample.py runs/d2 --y-file measurements.npz --n 10000 --out samples.npz
    python sample.py runs/d2 --from-prior 8 --n 4000 --out samples.safetensors   # fresh y, truth kept
    python sample.py checkpoints/mnist-sr-flow --heldout 0:16 --n 2000 --out out/sr.safetensors
    python sample.py checkpoints/mnist-denoise-flow --png noisy1.png noisy2.png --n 1000 --out out/dn.safetensors
    python sample.py checkpoints/mnist-classifier-flow --y 3,7 --n 1000 --out out/cls.safetensors
Writes samples (B, N, ...), mean and std (B, ...), log_q (B, N), y, and x_true when known; for image
checkpoints also one PNG per measurement (measurement | samples | mean | std | truth) in --png-dir.

Several GPUs (or CPU processes): the measurements are split between the processes and gathered on the main
one, which writes the files. Sampling is seeded per measurement, so the output is the same for any number
of processes:
    accelerate launch --multi_gpu --num_processes 4 sample.py checkpoints/mnist-sr-flow --heldout 0:500 --n 10000 ...
    accelerate launch --cpu --num_processes 2 sample.py runs/d2 --from-prior 64 --n 5000 --out s.safetensors
"""
import argparse

from aps.cli import one_line_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="folder written by train.py")
    src = p.add_argument_group("measurements (one of)")
    src.add_argument("--y", help="measurements as comma-separated numbers (one vector y, or class labels)")
    src.add_argument("--y-file", help=".npz or .safetensors with an array 'y' of shape (B, *y_shape) [and 'x_true']")
    src.add_argument("--from-prior", type=int, metavar="B", help="mixtures: make B measurements of fresh prior samples")
    src.add_argument("--heldout", metavar="START:STOP", help="images: held-out images START..STOP-1 measured "
                     "with the checkpoint's operator (noise seeded by --seed and the image's index)")
    p.add_argument("--heldout-data", help="with --heldout: the held-out images of this data set (mnist, digits8) "
                   "instead of the checkpoint's own (a flow trained with --data prior has none)")
    src.add_argument("--png", nargs="+", metavar="FILE", help="images: measurement images (noisy, low-resolution, "
                     "or with the holes of a fixed inpainting mask)")
    p.add_argument("--n", type=int, default=1000, help="posterior samples per measurement (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed: sample j of measurement i depends only on it (default: 0)")
    p.add_argument("--chunk", type=int, default=8192, help="flow evaluations per forward pass (default: 8192)")
    p.add_argument("--device", default="auto", help="torch device (default: auto = this process's accelerate "
                   "device: its GPU under `accelerate launch`, else cuda if there is one, else cpu)")
    p.add_argument("--bf16", action="store_true", help="run the flow's coupling networks under bf16 autocast")
    p.add_argument("--out", default="samples.safetensors", help=".safetensors or .npz output file")
    p.add_argument("--no-samples", action="store_true", help="store mean, std and y only, not every sample")
    p.add_argument("--png-dir", help="images: folder for one PNG grid per measurement (default: next to --out, "
                   "named after it)")
    p.add_argument("--show", type=int, default=8, help="images: samples shown per PNG row (default: 8)")
    check = p.add_argument_group("checks (optional): fail unless the flow was trained for these")
    check.add_argument("--prior", help="the diffusion prior folder")
    check.add_argument("--operator", help="the operator's name")
    check.add_argument("--op-arg", action="append", default=[], metavar="KEY=VALUE", help="operator parameter (repeatable)")
    args = p.parse_args()
    with one_line_errors("sample.py"):
        from pathlib import Path

        import torch

        import aps
        from aps.config import TrainConfig
        from aps.errors import ApsError
        from aps.image_grid import posterior_grid, read_png, save_png
        from aps.io import read_tensors, write_tensors
        from aps.sampling import heldout_measurements, measurements_from_images

        if sum(v is not None for v in (args.y, args.y_file, args.from_prior, args.heldout, args.png)) != 1:
            raise ApsError("give exactly one of --y, --y-file, --from-prior, --heldout, --png")
        operator = None
        if args.operator:
            from aps.operators import build
            from aps.checkpoint import load_flow

            _, meta = load_flow(args.checkpoint)
            shape = meta["task"].get("operator", {}).get("image_shape")
            extra = {"image_shape": shape} if shape else {}
            operator = build(args.operator, **{**extra, **TrainConfig(op_arg=args.op_arg).operator_args()})
        from accelerate import PartialState
        from accelerate.utils import gather_object

        # cpu=True lets accelerate see several CPU processes (gloo); with cpu=False it looks for GPUs only.
        state = PartialState(cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()))
        device = state.device if args.device == "auto" else torch.device(args.device)
        sampler = aps.load(args.checkpoint, device=device, prior=args.prior, operator=operator)
        op = sampler.operator
        out = {}
        if args.y is not None:
            try:
                values = [float(v) for v in args.y.split(",")]
            except ValueError:
                raise ApsError(f"--y wants comma-separated numbers, got {args.y!r}") from None
            # class labels: one number per measurement; otherwise the numbers are one measurement
            y = torch.tensor(values) if tuple(op.y_shape) == () else torch.tensor([values])
        elif args.y_file is not None:
            tensors = read_tensors(args.y_file)
            if "y" not in tensors:
                raise ApsError(f"{args.y_file} has no array named 'y' (it has: {', '.join(tensors) or 'none'})")
            y = tensors["y"]
            y = y.float() if y.is_floating_point() else y
            if "x_true" in tensors:
                out["x_true"] = tensors["x_true"].float()
        elif args.heldout is not None:
            try:
                start, stop = (int(v) for v in args.heldout.split(":"))
            except ValueError:
                raise ApsError(f"--heldout wants START:STOP (e.g. 0:16), got {args.heldout!r}") from None
            y, out["x_true"], labels = heldout_measurements(sampler, start, stop, seed=args.seed,
                                                            data=args.heldout_data)
            if labels is not None:
                out["labels"] = labels
        elif args.png is not None:
            if op.x_shape is None or len(op.x_shape) != 3:
                raise ApsError("--png needs an image checkpoint")
            y = measurements_from_images(op, torch.stack([read_png(f, op.x_shape) for f in args.png]))
        else:
            if args.from_prior < 1 or getattr(sampler, "task", None) is None or sampler.task.kind != "mixture":
                raise ApsError("--from-prior needs a positive count and a mixture checkpoint (images: use --heldout)")
            g = torch.Generator().manual_seed(args.seed)
            out["x_true"] = sampler.prior.cpu().sample(args.from_prior, generator=g).float()
            y = sampler.operator.cpu().measure(out["x_true"], generator=g)
            sampler.to(device)
        # Each process samples a contiguous share of the measurements (seeded by their global index) and the
        # main process gathers the shares in order.
        y = torch.as_tensor(y)
        with state.split_between_processes(list(range(len(y)))) as mine:
            share = []
            if mine:
                x, log_q = sampler.sample(y[mine[0]: mine[-1] + 1], args.n, seed=args.seed, chunk=args.chunk,
                                          first_index=mine[0], progress=state.is_main_process,
                                          autocast_dtype=torch.bfloat16 if args.bf16 else None)
                share = [(mine[0], x.cpu(), log_q.cpu())]
        parts = sorted(gather_object(share) if state.num_processes > 1 else share, key=lambda part: part[0])
        if not state.is_main_process:
            return
        x, log_q = torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
        out.update(mean=x.mean(1), std=x.std(1), y=y.cpu())
        if not args.no_samples:
            out.update(samples=x, log_q=log_q)
        path = write_tensors(args.out, out)
        procs = f" ({state.num_processes} processes)" if state.num_processes > 1 else ""
        print(f"wrote {x.shape[1]} samples for each of {x.shape[0]} measurements to {path}{procs}")
        if sampler.task.kind == "image":
            folder = Path(args.png_dir) if args.png_dir else path.with_name(path.stem + "_png")
            truth = out.get("x_true")
            for i in range(len(x)):
                grid = posterior_grid(op, torch.as_tensor(y)[i:i + 1].cpu(), x[i:i + 1].cpu(),
                                      None if truth is None else truth[i:i + 1], n_show=args.show)
                save_png(grid, folder / f"y{i:04d}.png")
            print(f"wrote {len(x)} PNG grids (measurement | {min(args.show, args.n)} samples | mean | std"
                  f"{' | truth' if truth is not None else ''}) to {folder}")


if __name__ == "__main__":
    main()
