"""Evaluate a distilled consistency model against its teacher prior: grids, ODE agreement, memorisation.

    python scripts/evaluate_cm.py checkpoints/mnist-cm --prior checkpoints/mnist-prior --out checkpoints/mnist-cm
    python scripts/evaluate_cm.py /tmp/cm --n 8 --ode-steps 4 --device cpu          # smoke

What it measures, all on noise the distillation never drew (its own seed):
  * 1-step and 2-step samples drawn by diffusers' own ConsistencyModelPipeline from the saved folder
    (samples-1step.png, samples-2step.png), which shows the folder loads in diffusers; aps's wrapper
    gives the same 1-step images (max abs difference reported).
  * ODE agreement: x_sigma = x0 + sigma z for held-out digits x0 (sigma < sigma_max) or x = sigma_max z,
    then the teacher's PF-ODE solution from x_sigma (Heun on a Karras grid of --ode-steps from sigma down
    to sigma_min) against CM(x_sigma, sigma): RMSE per pixel in [-1, 1] units. Beside it, the teacher's
    one-call denoiser D(x_sigma; sigma) (the posterior mean, what a CM improves on) against the same ODE
    solution.
  * Memorisation / realism: distance of each sample to its nearest training digit, for 1-step, 2-step
    and teacher-ODE samples from the same noise, next to the held-out digits' distances.
Writes eval.json with every number and the settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from aps.data import load_mnist
from aps.cli import one_line_errors
from aps.priors import DiffusersPrior
from aps.recipes.prior_eval import image_grid, memorisation_report, save_png
from aps.solvers.consistency_model import ConsistencyModel
from aps.solvers.distillation import heun_step
from aps.solvers.edm import EDMDenoiser, karras_sigmas


@torch.no_grad()
def ode_solve(D, x: torch.Tensor, sigma: float, sigma_min: float, steps: int) -> torch.Tensor:
    """The teacher's PF-ODE from x at sigma to sigma_min: Heun on a Karras grid of `steps` intervals."""
    grid = karras_sigmas(steps + 1, sigma_min, sigma).to(x.device)  # descending, sigma .. sigma_min
    for s, s_next in zip(grid[:-1], grid[1:]):
        b = x.shape[0]
        x = heun_step(D, x, s.expand(b), s_next.expand(b))
    return x


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).flatten(1).mean(1).sqrt().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cm", help="consistency-model folder (unet/, scheduler/)")
    p.add_argument("--prior", default="checkpoints/mnist-prior", help="the teacher")
    p.add_argument("--n", type=int, default=500, help="noise draws / held-out digits per measurement")
    p.add_argument("--ode-steps", type=int, default=80, help="Heun intervals of the reference ODE solve")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.2, 0.5, 1.0, 2.0, 5.0, 80.0])
    p.add_argument("--two-step-timesteps", type=int, nargs=2, default=[22, 0],
                   help="diffusers timestep indices (of the scheduler's 40) for 2-step sampling "
                        "(22 -> second step at sigma 1.38, as diffusers' ImageNet-64 CD example)")
    p.add_argument("--seed", type=int, default=12345, help="held-out noise (distillation used its own seed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="output folder (default: the CM folder)")
    args = p.parse_args(argv)
    with one_line_errors("evaluate_cm.py"):
        print(json.dumps(evaluate(args), indent=1))
    return 0


def evaluate(args) -> dict:
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    out = Path(args.out or args.cm)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()
    cm = ConsistencyModel.from_pretrained(args.cm).to(device)
    prior = DiffusersPrior.from_pretrained(args.prior).to(device)
    D = EDMDenoiser(prior)
    shape = tuple(prior.event_shape)
    n = args.n

    # 1- and 2-step samples with diffusers' pipeline straight from the folder.
    pipe = ConsistencyModelPipeline(unet=UNet2DModel.from_pretrained(Path(args.cm, "unet")),
                                    scheduler=CMStochasticIterativeScheduler.from_pretrained(Path(args.cm, "scheduler")))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    samples = {}
    for name, kw in (("1step", {"num_inference_steps": 1}), ("2step", {"timesteps": list(args.two_step_timesteps)})):
        g = torch.Generator(device).manual_seed(args.seed)
        img = pipe(batch_size=n, generator=g, output_type="pt", **kw).images  # (n, H, W, C) in [0, 1] (numpy order)
        img = torch.as_tensor(img)
        img = img.permute(0, 3, 1, 2) if img.shape[-1] == shape[0] else img
        samples[name] = (img.float().to(device) * 2 - 1).reshape(n, *shape)
        save_png(image_grid(samples[name][:64].cpu()), out / f"samples-{name}.png")

    # The same 1-step draw through aps's wrapper, and the teacher's ODE from the same noise.
    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((n, *shape), generator=g, device=device) * cm.sigma_max
    ours = cm(x_T, cm.sigma_max).clamp(-1, 1)
    wrapper_vs_pipeline = float((ours - samples["1step"]).abs().max())
    samples["teacher_ode"] = ode_solve(D, x_T, cm.sigma_max, cm.sigma_min, args.ode_steps).clamp(-1, 1)
    save_png(image_grid(samples["teacher_ode"][:64].cpu()), out / "samples-teacher-ode.png")

    # ODE agreement at several noise levels on held-out digits.
    test = load_mnist("test", shape[-1])[:n].to(device)
    agreement = []
    for sigma in args.sigmas:
        g = torch.Generator(device).manual_seed(args.seed + 1)
        z = torch.randn(test.shape, generator=g, device=device)
        x = (test if sigma < cm.sigma_max else 0) + sigma * z
        ref = ode_solve(D, x, sigma, cm.sigma_min, args.ode_steps)
        row = {"sigma": sigma, "cm_vs_ode_rmse": rmse(cm(x, sigma), ref),
               "teacher_denoiser_vs_ode_rmse": rmse(D(x, torch.tensor(sigma)), ref),
               "ode_vs_clean_rmse": rmse(ref, test) if sigma < cm.sigma_max else None}
        agreement.append(row)
        print(json.dumps(row), flush=True)

    train = load_mnist("train", shape[-1]).to(device)
    memo = {name: memorisation_report(x, train, test) for name, x in samples.items()}
    report = {"cm": str(args.cm), "prior": str(args.prior), "n": n, "ode_steps": args.ode_steps, "seed": args.seed,
              "two_step_timesteps": list(args.two_step_timesteps),
              "two_step_sigmas": [float(v) for v in pipe.scheduler.sigmas[:-1]],
              "wrapper_vs_pipeline_max_abs": wrapper_vs_pipeline, "ode_agreement": agreement,
              "memorisation": memo, "seconds": time.time() - t0,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": " ".join(sys.argv)}
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
