"""Consistency distillation of the shipped MNIST prior into a one-step consistency model (GPU recipe).

    accelerate launch scripts/distill_cm.py --prior checkpoints/mnist-prior --out checkpoints/mnist-cm \
        --steps 20000 --batch-size 256 --max-seconds 1500
    python scripts/distill_cm.py --cpu --steps 3 --batch-size 4 --out /tmp/cm     # CPU smoke run

Song et al. 2023, "Consistency Models", Algorithm 2: Heun teacher step on the Karras grid (N = 18),
boundary parametrisation with sigma_data 0.5 (aps.solvers.consistency_model), EMA target 0.95,
pseudo-Huber or L2 metric, student initialised from the teacher. Data: MNIST-5k train split at 32x32
in [-1, 1] (aps.data.load_mnist). Saves <out>/unet + <out>/scheduler (CMStochasticIterativeScheduler)
with save_pretrained, plus <out>/distill_config.json; load with
aps.solvers.consistency_model.ConsistencyModel.from_pretrained(out).

Cost: an H100 does one CD step of a 2.3M-parameter UNet at batch 256 in ~40 ms, so 20k steps is ~15 min
(checkpoints/mnist-cm had 2,823 steps in 430 s; its card has the command).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from aps.data import load_mnist
from aps.priors.diffusers_prior import DiffusersPrior
from aps.solvers.consistency_model import ConsistencyModel
from aps.solvers.distillation import ConsistencyDistillation


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main")
    g.add_argument("--prior", default="checkpoints/mnist-prior", help="teacher: a DiffusersPrior folder")
    g.add_argument("--out", default="checkpoints/mnist-cm")
    g = p.add_argument_group("hyperparameters")
    g.add_argument("--steps", type=int, default=20000)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--n-steps", type=int, default=18, help="N of the Karras grid")
    g.add_argument("--ema", type=float, default=0.95, help="target EMA rate (0 = stop-grad)")
    g.add_argument("--metric", default="pseudo_huber", choices=["l2", "pseudo_huber"])
    g = p.add_argument_group("performance")
    g.add_argument("--cpu", action="store_true")
    g.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    g.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0 = no limit)")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    acc = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls (convolutions use TF32 by default)
    set_seed(args.seed, device_specific=True)
    prior = DiffusersPrior.from_pretrained(args.prior).to(acc.device)  # frozen: not prepared
    student = ConsistencyModel.from_teacher(prior)
    cd = ConsistencyDistillation(student, prior, n_steps=args.n_steps, ema=args.ema, metric=args.metric)
    cd.target.to(acc.device)
    data = load_mnist("train", 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    student, opt, loader = acc.prepare(student, opt, loader)
    # The loss calls the prepared module (DDP syncs gradients only through its forward); its parameters()
    # are the inner module's, so the EMA update in cd.update_target reads the right tensors.
    cd.student = student
    t0, step, history = time.time(), 0, []
    bar = tqdm(total=args.steps, disable=not acc.is_main_process, desc="distill")
    while step < args.steps:
        for (x0,) in loader:
            loss = cd.loss(x0).mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            cd.update_target()  # ema = 0 copies the student: the stop-grad target
            step += 1
            bar.update(1)
            if step % 100 == 0:
                history.append((step, float(acc.gather(loss.detach()).mean())))
                bar.set_postfix(loss=history[-1][1])
            if step >= args.steps or (args.max_seconds and time.time() - t0 > args.max_seconds):
                break
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            break
    if acc.is_main_process:
        # Song et al. sample from the target (EMA) network; save it.
        cd.target.save_pretrained(args.out)
        Path(args.out, "distill_config.json").write_text(json.dumps(
            {"args": vars(args), "steps": step, "seconds": time.time() - t0, "loss_history": history}, indent=2) + "\n")
        print(f"saved the consistency model to {args.out} ({step} steps)")


if __name__ == "__main__":
    main()
