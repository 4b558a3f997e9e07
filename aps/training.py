"""The training loop: the only place in aps that knows about accelerate (STYLE.md rule 7).

Measurements are made on the fly: x ~ data (or the prior), y = A(x) + sigma_y n. Each step
minimises the tempered APS loss (aps.objective), plus the optional forward-KL term on the same
(x, y) pairs, averaged over measurements and flow samples.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from . import objective
from .checkpoint import CONFIG, build_flow, load_flow, read_config, save_checkpoint
from .config import TrainConfig
from .errors import ApsError
from .flows.vector import ConditionalVectorFlow
from .problems import MixtureProblem, load_problem, mcgdiff_problem

PROBLEM_FILE = "problem.safetensors"


class APSModel(nn.Module):
    """The flow plus the whole loss in one `forward`, so DDP synchronises and autocast covers it all.

    (LIBRARY-NOTES: accelerate wraps only `forward`; calling flow.sample through `.module` would
    leave gradients unsynchronised without any error.) Prior and operator are arguments, not
    submodules: they are frozen and must not be wrapped by DDP.
    """

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, y, prior, operator, cfg: TrainConfig, beta: float, x_pairs=None):
        loss, out = 0.0, {}
        if cfg.aps_weight > 0:
            terms = objective.aps_terms(self.flow, prior, operator, y, n_z=cfg.n_z, n_elbo=cfg.n_elbo,
                                        elbo_sampling=cfg.elbo_sampling, exact_prior=cfg.exact_prior)
            loss = cfg.aps_weight * objective.aps_loss(terms, beta).mean()
            out = {k: terms[k].detach().mean() for k in ("nll", "prior", "log_q")}
        if cfg.fkl_weight > 0 and x_pairs is not None:
            fkl = objective.forward_kl(self.flow, x_pairs, y).mean()
            loss = loss + cfg.fkl_weight * fkl
            out["forward_kl"] = fkl.detach()
        out["loss"] = loss
        return out


def make_problem(cfg: TrainConfig) -> MixtureProblem:
    """The mixture problem named by the config (a file, or the MCGdiff generator)."""
    if cfg.problem:
        return load_problem(cfg.problem)
    try:
        d, dy, seed = (int(v) for v in cfg.mcgdiff.split(","))
    except ValueError:
        raise ApsError(f"--mcgdiff wants 'd,dy,seed' (three integers), got {cfg.mcgdiff!r}") from None
    return mcgdiff_problem(d, dy, seed)


def make_flow(cfg: TrainConfig, problem: MixtureProblem) -> ConditionalVectorFlow:
    """A fresh vector flow whose Gaussian frame is fitted to the prior's moments and the operator."""
    d, dy = problem.prior.dim, problem.operator.y_shape[0]
    flow = ConditionalVectorFlow(d, dy, n_layers=cfg.flow_layers, hidden=cfg.flow_hidden,
                                 num_blocks=cfg.flow_blocks, bins=cfg.flow_bins, tail_bound=cfg.flow_tail_bound)
    mean, cov = problem.prior.moments()
    scale = problem.prior.component_posterior_cov(problem.operator) if cfg.flow_frame == "component" else None
    flow.frame.fit(mean, cov, problem.operator.matrix(), problem.operator.sigma_y, scale_cov=scale)
    return flow


def _lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """On --resume, architecture and task fields come from the saved config, not the command line."""
    saved = Path(cfg.out) / CONFIG
    if not cfg.resume:
        return cfg.validate()
    if not saved.is_file():
        raise ApsError(f"--resume: no run to resume in {cfg.out} (no {CONFIG})")
    old = TrainConfig.from_dict(read_config(cfg.out)["train"])
    merged = cfg.to_dict()
    merged.update({k: getattr(old, k) for k in TrainConfig.ARCH_FIELDS})
    return TrainConfig.from_dict(merged).validate()


def train(cfg: TrainConfig) -> Path:
    """Train one flow for one problem; returns the output folder (a checkpoint sample.py can load)."""
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    accelerator = Accelerator(
        cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"),
                                            automatic_checkpoint_naming=True, total_limit=cfg.keep))
    set_seed(cfg.seed)  # the same initial weights on every rank; noise differs below
    problem = load_problem(out / PROBLEM_FILE) if cfg.resume else make_problem(cfg)
    flow = make_flow(cfg, problem)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        problem.save(out / PROBLEM_FILE)
    set_seed(cfg.seed, device_specific=True)  # ranks draw different measurements and z

    prior, operator = problem.prior.to(accelerator.device), problem.operator.to(accelerator.device)
    prior.requires_grad_(False)
    model = APSModel(flow)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    # The LR scheduler is not prepared: a prepared one steps num_processes times per step
    # (LIBRARY-NOTES), which would shorten the schedule on several GPUs. It is stepped on real
    # optimizer steps only and saved with the training state.
    model, opt = accelerator.prepare(model, opt)
    accelerator.register_for_checkpointing(sched)
    accelerator.init_trackers("aps", config={k: v for k, v in cfg.to_dict().items() if not isinstance(v, bool)})

    start = 0
    task = {"kind": "mixture", "problem": PROBLEM_FILE}
    if cfg.resume:
        states = sorted((out / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
        if not states:
            raise ApsError(f"--resume: no training state under {out / 'checkpoints'}")
        accelerator.load_state(str(states[-1]))
        # load_state does not advance accelerate's naming counter; without this the next save collides.
        accelerator.project_configuration.iteration = int(states[-1].name.split("_")[-1]) + 1
        start = read_config(out)["step"]

    def save(step):
        accelerator.save_state()  # every rank must call it (it waits for all)
        if accelerator.is_main_process:
            save_checkpoint(out, accelerator.unwrap_model(model).flow, task, cfg.to_dict(), step)

    t_start = time.monotonic()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not accelerator.is_main_process)
    for step in bar:
        beta = cfg.beta(step)
        with accelerator.accumulate(model):
            x0 = prior.sample(cfg.batch_size)
            y = operator.measure(x0)
            terms = model(y, prior, operator, cfg, beta, x_pairs=x0)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if accelerator.sync_gradients:
                sched.step()
            opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logs = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in terms.items()}
            logs.update(beta=beta, lr=sched.get_last_lr()[0])
            accelerator.log(logs, step=step + 1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", beta=f"{beta:.3f}")
        out_of_time = cfg.max_seconds > 0 and time.monotonic() - t_start > cfg.max_seconds
        # every rank must agree to stop, or save_state would wait for a rank that has left the loop
        out_of_time = bool(accelerator.reduce(torch.tensor(float(out_of_time), device=accelerator.device), "max"))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
            save(step + 1)
        if out_of_time:
            accelerator.print(f"stopping at step {step + 1}: --max-seconds {cfg.max_seconds} reached")
            break
    accelerator.end_training()
    return out


def dry_run(cfg: TrainConfig) -> str:
    """The resolved config as JSON (what --dry-run prints)."""
    return json.dumps(resolve_config(cfg).to_dict(), indent=1)


__all__ = ["APSModel", "train", "make_problem", "make_flow", "resolve_config", "dry_run", "load_flow", "build_flow"]
