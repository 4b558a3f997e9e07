"""Size and speed of an image flow architecture before training it: parameters, and flow passes per second.

    python scripts/image_flow_speed.py --prior checkpoints/mnist-prior --operator deblur --glow-tarflow 2 \
        --device cuda --batch 10000 --out speed.json

Takes train.py's own options (any flow architecture flag), builds the untrained flow exactly as train.py
would for that prior and operator, and times a sampling pass (z -> x, what sample.py runs) and a density
pass (x -> z, log q as the forward-KL term needs it) of --batch latents for one measurement, in fp32 and
under bf16 autocast (aps.evaluate_images.throughput: median of 10 passes after 3 warm-up passes), with the
flow's weights channels-last as aps.load keeps an image flow (--memory-format contiguous: the NCHW layout). Speed
does not depend on the weights, so a trained checkpoint of the same architecture runs at the same rate.
"""
import argparse
import itertools
import json
import time
from pathlib import Path


def main():
    from aps.config import TrainConfig, add_arguments, from_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="latents per pass (default: 256)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--compile", nargs="+", default=["off"], metavar="MODE",
                   help="also time the flow under torch.compile in these modes (off = eager; default, "
                        "reduce-overhead, max-autotune-no-cudagraphs); the first pass's seconds are the compile's")
    p.add_argument("--directions", nargs="+", default=["sample", "density"], choices=["sample", "density"],
                   help="passes to time: sample (z -> x) and density (x -> z) (default: both)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="precisions to time (default: both)")
    p.add_argument("--memory-format", nargs="+", default=["channels_last"], choices=["channels_last", "contiguous"],
                   help="layouts of the flow's weights to time (default: channels_last, as aps.load keeps them)")
    p.add_argument("--speed-out", default="", help="append the result as one JSON line to this file")
    args = p.parse_args()

    from aps.cli import one_line_errors

    with one_line_errors("image_flow_speed.py"):
        import torch

        from aps.errors import ApsError
        from aps.evaluate_images import throughput
        from aps.tasks import make_task

        if args.threads:
            torch.set_num_threads(args.threads)
        cfg: TrainConfig = from_args(args).validate()
        if not cfg.is_image:
            raise ApsError("give an image task: --prior FOLDER --operator NAME")
        task = make_task(cfg, with_data=False)
        torch.manual_seed(cfg.seed)
        flow = task.make_flow(cfg).to(args.device).eval()
        op = task.operator.to(args.device)
        y = op.measure(torch.zeros(1, *op.x_shape, device=args.device), torch.Generator(args.device).manual_seed(0))
        result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "threads": torch.get_num_threads(), "flow": flow.config(),
                  "params": sum(p.numel() for p in flow.parameters()), "passes": []}

        class Density(torch.nn.Module):  # x -> z for the same batch, timed by the same helper
            event_shape = flow.event_shape

            def parameters(self, recurse=True):
                return flow.parameters(recurse)

            def forward(self, x, y):
                return flow.nf.inverse_and_log_det(x, context=flow.encode(y))

        modules = {"sample": flow, "density": Density()}
        dtypes = {"fp32": None, "bf16": torch.bfloat16}
        layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
        runs = itertools.product(args.memory_format, args.compile, args.batch, args.directions, args.dtypes)
        with torch.no_grad():
            for layout, mode, batch, direction, label in runs:
                flow.to(memory_format=layouts[layout])
                module, dtype = modules[direction], dtypes[label]
                timed = module if mode == "off" else compiled(module, mode, dtype)
                t0 = time.perf_counter()
                r = throughput(timed, y, batch, autocast_dtype=dtype)
                result["passes"].append({"direction": direction, "dtype": label, "compile": mode, "memory_format": layout, **r,
                                         "wall_s": round(time.perf_counter() - t0, 2)})
                print(json.dumps(result["passes"][-1]), flush=True)
        print(json.dumps({k: result[k] for k in ("device", "params")}))
        if args.speed_out:
            with Path(args.speed_out).open("a") as f:
                f.write(json.dumps(result) + "\n")


def compiled(module, mode: str, dtype=None):
    """torch.compile of the module's forward, fresh per call (each dtype and batch traces its own graph), with
    the autocast inside the compiled function (so the compiler sees which ops run in bf16)."""
    import torch

    def forward(*args):
        device = args[0].device.type
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            return module.forward(*args)

    class Compiled(torch.nn.Module):
        event_shape = module.event_shape

        def __init__(self):
            super().__init__()
            self.fn = torch.compile(forward, mode=None if mode == "default" else mode)

        def parameters(self, recurse=True):
            return module.parameters(recurse)

        def forward(self, *args):
            return self.fn(*args)

    return Compiled()


if __name__ == "__main__":
    main()
