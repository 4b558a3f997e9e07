"""Train the small MNIST diffusion prior (diffusers UNet2DModel + DDPMScheduler) that aps ships.

    accelerate launch scripts/train_prior.py --out checkpoints/mnist-prior --max-seconds 540
    python scripts/train_prior.py --steps 20 --batch-size 8 --cpu --out /tmp/prior   # CPU smoke run

Saves the EMA weights in the DDPMPipeline layout (<out>/model_index.json, unet/, scheduler/), loadable with
aps.priors.DiffusersPrior.from_pretrained(out) or diffusers.DDPMPipeline.from_pretrained(out),
plus <out>/train_config.json (config, steps, images seen, time, loss history).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from aps.config import add_arguments, from_args
from aps.data import load_mnist
from aps.errors import ApsError
from aps.priors.diffusers_prior import save_pipeline
from aps.recipes.prior import PriorTrainConfig, augment, eps_loss, lr_factor, make_scheduler, make_unet


def save_ema(ema: EMAModel, unet, scheduler, cfg: PriorTrainConfig, stats: dict) -> None:
    """Write the EMA weights (not the raw ones) as <out>/unet, the scheduler, and train_config.json."""
    out = Path(cfg.out)
    ema_unet = UNet2DModel.from_config(unet.config)
    ema.copy_to(ema_unet.parameters())
    save_pipeline(ema_unet, scheduler, out)  # model_index.json, unet/, scheduler/
    (out / "train_config.json").write_text(json.dumps({"config": cfg.to_dict(), **stats}, indent=2) + "\n")


def train(cfg: PriorTrainConfig, logging_dir: str) -> dict:
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.cpu, log_with="tensorboard", project_dir=logging_dir)
    set_seed(cfg.seed, device_specific=True)  # each rank draws its own batches and noise
    device = accelerator.device
    torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes
    data = load_mnist("train").to(device)  # (4500, 1, 32, 32) in [-1, 1]; the held-out 500 are never seen

    unet, scheduler = make_unet(cfg), make_scheduler(cfg)
    n_params = sum(p.numel() for p in unet.parameters())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw = accelerator.unwrap_model(unet)
    ema = EMAModel(raw.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75, foreach=True)
    ema.to(device)
    accelerator.init_trackers("train_prior", config={k: str(v) if isinstance(v, tuple) else v
                                                      for k, v in cfg.to_dict().items()})
    accelerator.print(f"UNet2DModel: {n_params / 1e6:.2f}M parameters; {len(data)} training digits; "
                      f"{accelerator.num_processes} process(es) on {device}")

    stats = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
             "num_processes": accelerator.num_processes, "parameters": n_params, "history": []}
    bar = tqdm(total=cfg.steps, disable=not accelerator.is_main_process, mininterval=10, desc="prior")
    step, elapsed, last_save = 0, 0.0, 0.0
    loss_sum = torch.zeros((), device=device)
    t0 = time.time()
    while step < cfg.steps and not (cfg.max_seconds and elapsed >= cfg.max_seconds):
        idx = torch.randint(len(data), (cfg.batch_size,), device=device)
        x = augment(data[idx], cfg)  # (B, 1, 32, 32)
        with accelerator.accumulate(unet):
            loss = eps_loss(unet, scheduler, x).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if not accelerator.sync_gradients:
            continue
        step += 1
        ema.step(raw.parameters())
        bar.update(1)
        if step % 25 == 0 or step == 1:
            # Rank 0's clock decides, so every rank stops (and anneals the LR) at the same step.
            elapsed = float(broadcast(torch.tensor([time.time() - t0], device=device))[0])
        progress = max(step / cfg.steps, elapsed / cfg.max_seconds if cfg.max_seconds else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, progress, cfg)
        if step % cfg.log_every == 0:
            mean_loss = float(accelerator.reduce(loss_sum, "mean")) / (cfg.log_every * cfg.grad_accum)
            loss_sum.zero_()
            lr = optimizer.param_groups[0]["lr"]
            accelerator.log({"loss": mean_loss, "lr": lr, "ema_decay": ema.cur_decay_value}, step=step)
            stats["history"].append({"step": step, "seconds": round(elapsed, 1), "loss": round(mean_loss, 5)})
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if cfg.save_every_seconds and elapsed - last_save >= cfg.save_every_seconds:
            last_save = elapsed  # a run cut short still leaves usable weights
            if accelerator.is_main_process:
                save_ema(ema, raw, scheduler, cfg, {**stats, "steps": step, "seconds": elapsed, "final": False})
    bar.close()
    seconds = time.time() - t0
    stats.update(steps=step, seconds=round(seconds, 1), final=True,
                 images_seen=step * cfg.batch_size * cfg.grad_accum * accelerator.num_processes)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_ema(ema, raw, scheduler, cfg, stats)
        accelerator.print(f"saved EMA UNet to {cfg.out}: {step} steps, {stats['images_seen']} images, {seconds:.0f} s")
    accelerator.end_training()
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, PriorTrainConfig)
    parser.add_argument("--logging-dir", default="runs/mnist-prior", help="TensorBoard logs (kept out of --out)")
    args = parser.parse_args(argv)
    try:
        cfg = from_args(args, PriorTrainConfig).validate()
        if cfg.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        train(cfg, args.logging_dir)
    except ApsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
