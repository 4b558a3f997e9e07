"""Where an image-flow training step's time goes, and what the speed options buy.

    python scripts/train_step_benchmark.py --operator sr --op-arg factor=4 --device cuda --steps 30 \
        --variants base cudnn_benchmark batch128 compile_unet --profile --out step_benchmark.json

Builds what `aps.training.train` builds for an image task (the shipped recipe: batch 64, 2 z x 2 ELBO
draws, forward-KL weight 1, bf16 autocast, EMA) and runs its step (`aps.training.training_step`) with
the same accelerate objects, timing `--steps` steps after `--warmup` (device synchronised around the
timed block; the host time is what the Python side spent issuing them). With --profile it also counts
the kernels one step launches and their summed GPU time: far under the step's wall time means the
step is bound by the host (Python, dispatch, launches), not by the GPU.

Variants (each on a fresh flow with the same seed, so the first-step losses can be compared):
  old               the step as it was before the host syncs were taken out (torch AveragedModel EMA,
                    torch.linalg.inv in the 1x1 convs' inverse, two reductions of the run clock per step);
                    run it in a process of its own (it patches the 1x1 conv class for the variants after it)
  base              the training step as shipped
  cudnn_benchmark   torch.backends.cudnn.benchmark = True (cuDNN picks conv algorithms by timing)
  tf32              TF32 matmuls/convs for the fp32 ops (the flow's invertible stream is fp32)
  batchN            batch N instead of 64 (e.g. batch128, batch256)
  compile_unet      torch.compile of the prior's UNet (fixed shapes; compile time reported)
  compile_flow      torch.compile of the flow's two passes (sampling, and log q for the forward-KL term)
  compile_all       both
  graph             the step captured once as a CUDA graph and replayed (--cuda-graph, aps.graph_step)
  fkl               the forward-KL stage's step (--aps-weight 0: no UNet pass)
  z1t1              one z per y and one ELBO draw per x, times stratified over the batch
  wide              the default image recipe image-wide (flow width 160 / 64, class template, one z and one
                    ELBO draw per y, batch strata)
  channels_last     the flow's and the prior's convolution weights channels-last (NHWC)
Tokens combine with '+', e.g. graph+batch256, graph+z1t1, graph+fkl.
"""
import argparse
import json
import time
from pathlib import Path

import torch


def build(args, batch, overrides=None):
    """(cfg, accelerator, task, model, opt, ema) as aps.training.train builds them (no output folder)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from aps.config import TrainConfig
    from aps.tasks import make_task
    from aps.training import EMA, APSModel

    recipe = dict(prior=args.prior, operator=args.operator, op_arg=args.op_arg, data="mnist", batch_size=batch,
                  n_z=2, n_elbo=2, fkl_weight=1.0, mixed_precision=args.mixed_precision, ema_decay=0.999,
                  cpu=args.device == "cpu", temper_start=1.0)
    cfg = TrainConfig(**{**recipe, **(overrides or {})}).validate()
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    set_seed(0)
    task = make_task(cfg)
    flow = task.make_flow(cfg)
    ema = EMA(flow, cfg.ema_decay)
    task.to(accelerator.device)
    task.prior.requires_grad_(False)
    model = APSModel(flow)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = accelerator.prepare(model, opt)
    ema.to(accelerator.device)
    return cfg, accelerator, task, model, opt, ema


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(args, name):
    from accelerate.utils import set_seed

    from aps.training import training_step

    tokens = set(name.split("+"))
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in tokens
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in tokens
    torch.backends.cudnn.allow_tf32 = "tf32" in tokens
    batch = next((int(t[5:]) for t in tokens if t.startswith("batch")), args.batch_size)
    overrides = {}
    if "fkl" in tokens:
        overrides["aps_weight"] = 0.0
    if "z1t1" in tokens:
        overrides.update(n_z=1, n_elbo=1, elbo_strata="batch")
    if "wide" in tokens:  # image-wide's flow and ELBO estimator (its objective weights and batch aside)
        from aps.recipe import read_recipe

        wide = read_recipe("image-wide")
        overrides.update({k: wide[k] for k in ("glow_hidden", "glow_cond", "class_template", "n_z", "n_elbo", "elbo_strata")})
    if name == "old":
        from torch.optim.swa_utils import AveragedModel

        from aps.flows.layers import LUInvertibleConv1x1

        LUInvertibleConv1x1.weight_inverse = lambda self: torch.linalg.inv(self.weight())
    cfg, accelerator, task, model, opt, ema = build(args, batch, overrides)
    flow = accelerator.unwrap_model(model).flow
    if "channels_last" in tokens:
        flow.to(memory_format=torch.channels_last)
        task.prior.unet.to(memory_format=torch.channels_last)
    graphed = None
    if "graph" in tokens:
        from aps.graph_step import GraphedStep

        graphed = GraphedStep(accelerator, model, opt, task, cfg)
    if name == "old":
        def update(ema_params, params, n_averaged):
            n = int(n_averaged)
            d = min(cfg.ema_decay, (1 + n) / (10 + n))
            torch._foreach_lerp_(ema_params, params, 1 - d)

        ema = AveragedModel(flow, multi_avg_fn=update, use_buffers=False).to(accelerator.device)
    if name.startswith("compile"):
        torch._dynamo.config.cache_size_limit = 64
    if name in ("compile_unet", "compile_all"):
        task.prior.unet = torch.compile(task.prior.unet)
    if name in ("compile_flow", "compile_all"):
        flow.nf.forward_and_log_det = torch.compile(flow.nf.forward_and_log_det)
        flow.nf.log_prob = torch.compile(flow.nf.log_prob)
    compile_s = None
    set_seed(1, device_specific=True)
    losses = []
    t_start = time.monotonic()

    def step():
        if graphed is not None:
            terms = graphed(1.0, cfg.lr, cfg.aps_weight)
        else:
            terms, _ = training_step(accelerator, model, opt, task, cfg, beta=1.0, lr=cfg.lr)  # (terms, non-finite?)
        ema.update_parameters(flow)
        if name == "old":  # the run clock's two reductions per step
            for _ in range(2):
                accelerator.reduce(torch.tensor(time.monotonic() - t_start, device=accelerator.device), "max").item()
        return terms

    t0 = time.perf_counter()
    terms = step()  # the first step (compilation, cuDNN autotuning)
    losses.append(float(terms["loss"]))
    sync(args.device)
    first_s = time.perf_counter() - t0
    if name.startswith("compile"):
        compile_s = first_s
    for _ in range(args.warmup):
        step()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        terms = step()
    host = time.perf_counter() - t0
    sync(args.device)
    wall = time.perf_counter() - t0
    tail = [float(step()["loss"]) for _ in range(10)]  # the loss after the timed steps (graph vs eager: same level)
    out = {"variant": name, "loss_after_timed_steps": sum(tail) / len(tail), "batch": batch, "overrides": overrides, "first_step_s": first_s, "compile_s": compile_s, "first_loss": losses[0],
           "last_loss": float(terms["loss"]), "ms_per_step": 1e3 * wall / args.steps,
           "host_ms_per_step": 1e3 * host / args.steps, "steps_per_s": args.steps / wall,
           "measurements_per_s": batch * args.steps / wall}
    if args.profile and tokens & {"old", "base", "graph"}:
        try:
            out["profile"] = profile(args, step)
        except Exception as err:  # the timing above stands without it
            out["profile"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    print(json.dumps(out), flush=True)
    return out


def profile(args, step, n=3):
    """Kernels per step and their summed device time, against the step's wall time; top CPU ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sync(args.device)
    t0 = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(args.device)
    wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    syncs = {e.key: e.count // n for e in events
             if e.key in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                          "aten::is_nonzero", "cudaMemcpyAsync")}
    return {"wall_ms_per_step_profiled": 1e3 * wall, "kernels_per_step": len(kernels) / n,
            "kernel_ms_per_step": sum(k.time_range.elapsed_us() for k in kernels) / 1e3 / n,
            "aten_ops_per_step": ops / n, "sync_like_calls_per_step": syncs,
            "top_self_cpu": [(e.key, e.count // n, round(e.self_cpu_time_total / 1e3 / n, 2)) for e in top]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="checkpoints/mnist-prior")
    p.add_argument("--operator", default="sr")
    p.add_argument("--op-arg", action="append", default=None, help="key=value, repeatable (e.g. factor=4)")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mixed-precision", default="bf16")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["base"])
    p.add_argument("--profile", action="store_true", help="profile the base variant")
    p.add_argument("--out", default="step_benchmark.json")
    args = p.parse_args()
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "operator": args.operator, "op_arg": args.op_arg, "variants": []}
    for name in args.variants:
        try:
            results["variants"].append(run_variant(args, name))
        except Exception as err:  # a failing variant (e.g. compile) must not lose the others
            results["variants"].append({"variant": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(json.dumps(results["variants"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    for v in results["variants"]:
        if "error" not in v:
            busy = v.get("profile", {}).get("kernel_ms_per_step")
            if busy is not None and "wall_ms_per_step_profiled" in v["profile"]:
                print(f"{v['variant']}: GPU busy {busy / v['profile']['wall_ms_per_step_profiled']:.0%} of a profiled step")
            print(f"{v['variant']:16s} batch {v['batch']:4d}  {v['ms_per_step']:7.1f} ms/step (host {v['host_ms_per_step']:6.1f})"
                  f"  {v['steps_per_s']:5.2f} steps/s  {v['measurements_per_s']:7.0f} y/s  loss0 {v['first_loss']:.4f}")


if __name__ == "__main__":
    main()
