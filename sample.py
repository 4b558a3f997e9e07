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
import json

from aps.cli import one_line_errors

GRIDS = ".aps-grids.json"  # the PNG grids a sample.py run wrote into a folder (replaced whole by the next run)


def count(text: str) -> int:
    """A count of at least 1, written as 1000 or 1e6."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a whole number such as 1000 or 1e6, got {text!r}") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1, got {text}")
    return int(value)


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
    p.add_argument("--n", type=count, default=1000, help="posterior samples per measurement, e.g. 5000 or 1e6 "
                   "(streamed to --out: memory stays that of --chunk; default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed: sample j of measurement i depends only on it (default: 0)")
    p.add_argument("--chunk", type=count, default=8192, help="flow evaluations per forward pass; bounds the memory "
                   "(default: 8192)")
    p.add_argument("--device", default="auto", help="torch device (default: auto = this process's accelerate "
                   "device: its GPU under `accelerate launch`, else cuda if there is one, else cpu)")
    p.add_argument("--temperature", type=float, default=1.0, help="draw the latents from N(0, T^2 I): T < 1 gives "
                   "samples nearer the flow's mode (sharper single samples, narrower intervals; log_q is the "
                   "tempered sampler's density). 1 (the default) samples the trained flow itself")
    p.add_argument("--bf16", action="store_true", help="run the flow's coupling networks under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="run the flow's pass through torch.compile: worth it for "
                   "many samples on a GPU (2x in fp32 for an MNIST image flow on an H200), after a first pass that "
                   "compiles for a minute or more")
    p.add_argument("--out", default="samples.safetensors", help=".safetensors or .npz output file, written as the "
                   "samples come (under a temporary name until complete)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its PNG grids) if it exists")
    p.add_argument("--no-samples", action="store_true", help="store mean, std and y only, not every sample")
    p.add_argument("--png-dir", help="images: folder for one PNG grid per measurement (default: next to --out, "
                   "named after it)")
    p.add_argument("--show", type=int, default=8, help="images: samples shown per PNG row (default: 8)")
    p.add_argument("--figure", metavar="FILE", help="images: also a figure (.png, .pdf or .svg) of the first 8 "
                   "measurements' posterior mean, std and 90%% credible-interval width beside the truth")
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
        from aps.image_grid import enlarge, posterior_grid, read_png, save_png
        from aps.io import SUFFIXES, TensorFileWriter, read_tensors
        from aps.sampling import RunningMoments, heldout_measurements, measurements_from_images

        if sum(v is not None for v in (args.y, args.y_file, args.from_prior, args.heldout, args.png)) != 1:
            raise ApsError("give exactly one of --y, --y-file, --from-prior, --heldout, --png")
        out_path = Path(args.out)
        if out_path.suffix not in SUFFIXES:
            raise ApsError(f"--out must end in {' or '.join(SUFFIXES)}, not {out_path.name!r}")
        if out_path.is_dir():
            raise ApsError(f"--out {out_path} is a folder")
        if out_path.exists() and not args.overwrite:
            raise ApsError(f"{out_path} exists: pass --overwrite to replace it")
        if args.show < 0:
            raise ApsError(f"--show must be >= 0, got {args.show}")
        if args.figure and Path(args.figure).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise ApsError(f"--figure wants a .png, .pdf or .svg file, got {args.figure!r}")
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
        device = state.device if args.device == "auto" else parse_device(args.device)
        sampler = aps.load(args.checkpoint, device=device, prior=args.prior, operator=operator)
        sampler.check_temperature(args.temperature)  # before anything is written
        if args.compile:
            sampler.compile()
        op = sampler.operator
        if args.figure and sampler.task.kind != "image":
            raise ApsError("--figure needs an image checkpoint")
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
        y = torch.as_tensor(y)
        sampler.check_y(y)  # shape, finite, not empty: before anything is written
        is_image = sampler.task.kind == "image"
        names = grid_names(args, len(y)) if is_image else []
        folder = (Path(args.png_dir) if args.png_dir else out_path.with_name(out_path.stem + "_png")) if is_image else None
        old_grids = check_grid_folder(folder, names, args.overwrite) if is_image else []
        n, event = args.n, tuple(sampler.flow.event_shape)
        specs = {} if args.no_samples else {"samples": ((len(y), n, *event), torch.float32),
                                            "log_q": ((len(y), n), torch.float32)}
        specs.update(mean=((len(y), *event), torch.float32), std=((len(y), *event), torch.float32),
                     y=(tuple(y.shape), y.dtype), **{k: (tuple(v.shape), v.dtype) for k, v in out.items()})
        writer = TensorFileWriter(out_path, specs)
        check_disk_space(out_path, writer.nbytes * (2 if out_path.suffix == ".npz" else 1))
        if state.is_main_process:
            writer.create()
        state.wait_for_everyone()
        try:
            # Each process samples a contiguous share of the measurements (seeded by their global index) and writes
            # them into the file as they come; the main process gathers the moments (and the grids' first samples).
            per_sample = int(torch.Size(event).numel())
            with state.split_between_processes(list(range(len(y)))) as mine:
                share = []
                if mine:
                    lo, hi = mine[0], mine[-1] + 1
                    moments = RunningMoments(hi - lo, event)
                    first = torch.zeros(hi - lo, min(args.show, n), *event) if is_image else None
                    for i, j, x, log_q in sampler.stream(y[lo:hi], n, seed=args.seed, chunk=args.chunk, first_index=lo,
                                                         progress=state.is_main_process,
                                                         autocast_dtype=torch.bfloat16 if args.bf16 else None,
                                                         temperature=args.temperature):
                        if not args.no_samples:  # (m, k) samples from (i, j) on: contiguous in the file when k = n
                            for r in ([0] if x.shape[1] == n else range(len(x))):
                                rows = slice(None) if x.shape[1] == n else slice(r, r + 1)
                                writer.write("samples", ((lo + i + r) * n + j) * per_sample, x[rows])
                                writer.write("log_q", (lo + i + r) * n + j, log_q[rows])
                        moments.add(i, x)
                        if first is not None and j < first.shape[1]:
                            k = min(first.shape[1] - j, x.shape[1])
                            first[i:i + len(x), j:j + k] = x[:, :k].cpu()
                    share = [(lo, *moments.result(), first)]
            parts = sorted(gather_object(share) if state.num_processes > 1 else share, key=lambda part: part[0])
            state.wait_for_everyone()  # every share is in the file
            if not state.is_main_process:
                return
            mean, std = torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
            for name, value in dict(mean=mean, std=std, y=y.cpu(), **out).items():
                writer.write(name, 0, value)
            path = writer.finish()
        except BaseException:
            if state.is_main_process:
                writer.abort()
            raise
        procs = f" ({state.num_processes} processes)" if state.num_processes > 1 else ""
        print(f"wrote {n} samples for each of {len(y)} measurements to {path}{procs}")
        if is_image:
            first = torch.cat([part[3] for part in parts])
            truth = out.get("x_true")
            for name in old_grids:  # the previous run's grids go, so that none is left stale
                (folder / name).unlink(missing_ok=True)
            for i, name in enumerate(names):
                grid = posterior_grid(op, y[i:i + 1].cpu(), first[i:i + 1], None if truth is None else truth[i:i + 1],
                                      n_show=args.show, mean=mean[i:i + 1], std=std[i:i + 1])
                save_png(enlarge(grid, op.x_shape[-1]), folder / name)  # a digit >= 128 pixels
            (folder / GRIDS).write_text(json.dumps(names))
            print(f"wrote {len(names)} PNG grids (measurement | {min(args.show, n)} samples | mean | std"
                  f"{' | truth' if truth is not None else ''}) to {folder}")
            if args.figure:
                from aps.image_grid import measurement_image, posterior_figure

                y_images = measurement_image(op, torch.as_tensor(y)[:8].cpu())
                # the first 8 measurements' samples again (seeded per measurement: the same draws as in the file)
                x8, _ = sampler.sample(y[:8], min(n, 1000), seed=args.seed, chunk=args.chunk,
                                       autocast_dtype=torch.bfloat16 if args.bf16 else None,
                                       temperature=args.temperature)
                figure = posterior_figure(y_images, x8.cpu(), None if truth is None else truth[:8], args.figure)
                print(f"wrote the figure (measurement | truth | mean | std | 90% interval width) to {figure}")


def parse_device(name: str):
    """A torch device that this machine has, or ApsError."""
    import torch

    from aps.errors import ApsError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ApsError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ApsError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ApsError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ApsError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def grid_names(args, b: int) -> list:
    """One PNG name per measurement: by held-out index, by input file, or by position."""
    from pathlib import Path

    if args.heldout is not None:
        start = int(args.heldout.split(":")[0])
        return [f"heldout{start + i:05d}.png" for i in range(b)]
    if args.png is not None:
        return [f"y{i:04d}_{Path(f).stem}.png" for i, f in enumerate(args.png)]
    return [f"y{i:04d}.png" for i in range(b)]


def check_grid_folder(folder, names, overwrite: bool) -> None:
    """Refuse to mix grids of two runs, or to replace a file that sample.py did not write; returns the
    previous run's grids (with --overwrite), deleted when the new ones are written."""
    from aps.errors import ApsError

    manifest = folder / GRIDS
    old = json.loads(manifest.read_text()) if manifest.is_file() else []
    if old and not overwrite:
        raise ApsError(f"{folder} holds the PNG grids of another sample.py run: pass --overwrite to replace them")
    foreign = [n for n in names if (folder / n).exists() and n not in old]
    if foreign:
        raise ApsError(f"{folder / foreign[0]} exists and was not written by sample.py: choose another --png-dir")
    return [name for name in old if isinstance(name, str) and "/" not in name and name.endswith(".png")]


def check_disk_space(path, nbytes: int) -> None:
    import shutil

    from aps.errors import ApsError

    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise ApsError(f"{path} would take {nbytes / 1e9:.3g} GB but {parent} has {free / 1e9:.3g} GB free: "
                       f"lower --n, or --no-samples for the mean and std alone")


if __name__ == "__main__":
    main()
