"""The training loop: the only place in aps that knows about accelerate (STYLE.md rule 7).

Measurements are made on the fly: x ~ the task's clean data (training images, or samples of an exact
mixture prior), y = A(x) + sigma_y n (aps.tasks says what a task is). Each step
minimises the tempered APS loss (aps.objective), plus the optional forward-KL term on the same
(x, y) pairs, averaged over measurements and (with the flow's sample weights) flow samples.
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
from .graph_step import GraphedStep
from .problems import load_problem
from .tasks import PROBLEM_FILE, MixtureTask, make_task


class APSModel(nn.Module):
    """The flow plus the whole loss in one `forward`, so DDP synchronises and autocast covers it all.

    (LIBRARY-NOTES: accelerate wraps only `forward`; calling flow.sample through `.module` would
    leave gradients unsynchronised without any error.) Prior and operator are arguments, not
    submodules: they are frozen and must not be wrapped by DDP.
    """

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, y, prior, operator, cfg: TrainConfig, beta, x_pairs=None, aps_weight=None):
        """The loss and its terms for measurements y; beta and aps_weight (default cfg.aps_weight) may be
        floats or 0-d tensors (a CUDA graph replays with new values in the same tensors)."""
        loss, out = 0.0, {}
        aps_weight = cfg.aps_weight if aps_weight is None else aps_weight
        if cfg.aps_weight > 0:
            terms = objective.aps_terms(self.flow, prior, operator, y, n_z=cfg.n_z, n_elbo=cfg.n_elbo,
                                        elbo_sampling=cfg.elbo_sampling, exact_prior=cfg.exact_prior,
                                        elbo_strata=cfg.elbo_strata, elbo_antithetic=cfg.elbo_antithetic)
            weight = terms["weight"]  # (B, n): E_z as a weighted mean (stratified for a mixture base)
            loss = aps_weight * objective.expectation(objective.aps_loss(terms, beta, cfg.likelihood_weight), weight).mean()
            out = {k: objective.expectation(terms[k], weight).detach().mean() for k in ("nll", "prior", "log_q")}
        if cfg.fkl_weight > 0 and x_pairs is not None:
            fkl = objective.forward_kl(self.flow, x_pairs, y).mean()
            loss = loss + cfg.fkl_weight * fkl
            out["forward_kl"] = fkl.detach()
        out["loss"] = loss
        return out


def make_flow(cfg: TrainConfig, problem) -> nn.Module:
    """A fresh vector flow for a mixture problem (see MixtureTask.make_flow)."""
    return MixtureTask(problem).make_flow(cfg)


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over cfg.warmup steps, then cosine decay to 0 over the rest of `progress` (0..1)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    warm = cfg.warmup / max(1, cfg.steps)
    frac = (progress - warm) / max(1e-8, 1 - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, frac))))


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """On --resume, architecture and task fields come from the saved config, not the command line.

    A task field given on the command line that differs from the saved one (another prior, operator
    or problem) is an error rather than silently ignored.
    """
    saved = Path(cfg.out) / CONFIG
    if not cfg.resume:
        return cfg.validate()
    if not saved.is_file():
        raise ApsError(f"--resume: no run to resume in {cfg.out} (no {CONFIG})")
    old = TrainConfig.from_dict(read_config(cfg.out)["train"])
    default = TrainConfig()
    for name in TrainConfig.TASK_FIELDS:
        given, kept = getattr(cfg, name), getattr(old, name)
        if given != getattr(default, name) and given != kept:
            raise ApsError(f"--resume: the run in {cfg.out} was trained with --{name.replace('_', '-')} {kept!r}, "
                           f"not {given!r}")
    merged = cfg.to_dict()
    merged.update({k: getattr(old, k) for k in TrainConfig.ARCH_FIELDS})
    return TrainConfig.from_dict(merged).validate()


def _init_from(flow, task, folder) -> None:
    """Load the weights of checkpoint `folder` into `flow`: it must be for the same task, with the same architecture."""
    meta = read_config(folder)
    if isinstance(task, MixtureTask):  # the task config names only the problem file: compare the problems
        import numpy as np

        saved_problem = load_problem(Path(folder) / PROBLEM_FILE).arrays()
        same = all(np.array_equal(a.shape, b.shape) and np.allclose(a, b, rtol=1e-6, atol=1e-9)
                   for a, b in zip(saved_problem.values(), task.problem.arrays().values()))
        if not same:
            raise ApsError(f"--init-from: {folder} was trained for another task (another mixture problem)")
    if meta["task"] != task.config():
        raise ApsError(f"--init-from: {folder} was trained for another task (saved {json.dumps(meta['task'])}, "
                       f"now {json.dumps(task.config())})")
    if meta["flow"] != flow.config():
        raise ApsError(f"--init-from: the flow in {folder} has another architecture ({json.dumps(meta['flow'])}); "
                       f"pass the same flow options")
    saved, _ = load_flow(folder)
    flow.load_state_dict(saved.state_dict())


class EMA(nn.Module):
    """EMA of a flow's weights, decay warming up as min(decay, (1 + n) / (10 + n)); `module` is the averaged copy.

    The warmup keeps a short run's EMA from being mostly the random initialisation. The same update and
    state_dict (module.*, n_averaged) as torch's AveragedModel(use_buffers=False) with that decay, which it
    replaces: AveragedModel reads its device-side counter n_averaged on the host three times per update (a
    device sync each), so here the count is also kept as a Python int (read from the buffer once after a load).
    """

    def __init__(self, flow: nn.Module, decay: float):
        super().__init__()
        import copy

        self.module = copy.deepcopy(flow)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self._n = 0

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._n = None  # read from the loaded buffer at the next update
        return result

    @torch.no_grad()
    def update_parameters(self, flow: nn.Module) -> None:
        if self._n is None:
            self._n = int(self.n_averaged)
        ema_params, params = list(self.module.parameters()), [p.detach() for p in flow.parameters()]
        if self._n == 0:
            torch._foreach_copy_(ema_params, params)
        else:
            d = min(self.decay, (1 + self._n) / (10 + self._n))
            torch._foreach_lerp_(ema_params, params, 1 - d)
        # buffers (fixed permutations, signs) are not averaged: kept equal to the flow's
        torch._foreach_copy_(list(self.module.buffers()), [b.detach() for b in flow.buffers()])
        self._n += 1
        self.n_averaged.fill_(self._n)


def training_step(accelerator, model, opt, task, cfg: TrainConfig, beta: float, lr: float,
                  aps_weight: float | None = None) -> dict:
    """One optimizer step over cfg.grad_accum micro-batches of fresh measurements; the last micro-batch's terms.

    x ~ the task's clean data, y = A(x) + sigma_y n, the loss of `APSModel` at tempering beta; the LR is set
    to `lr` first. Adds no host sync of its own (the caller reads the terms only every log_every steps).
    """
    for group in opt.param_groups:
        group["lr"] = lr
    for _ in range(cfg.grad_accum):  # one optimizer step per call, over grad_accum micro-batches
        with accelerator.accumulate(model):
            x0 = task.sample_x(cfg.batch_size)  # (B, *event_shape)
            y = task.operator.measure(x0)  # (B, *y_shape)
            terms = model(y, task.prior, task.operator, cfg, beta, x_pairs=x0, aps_weight=aps_weight)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return terms


def train(cfg: TrainConfig, callback=None) -> Path:
    """Train one flow for one task (mixture problem or image operator); returns the output folder.

    The folder is a checkpoint that sample.py and aps.load read. callback(accelerator, model, step), if
    given, runs on every rank after each optimizer step (tests use it to compare ranks).
    """
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    accelerator = Accelerator(
        cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"),
                                            automatic_checkpoint_naming=True, total_limit=cfg.keep))
    if cfg.cuda_graph == "on" and (accelerator.device.type != "cuda" or accelerator.num_processes != 1):
        raise ApsError("--cuda-graph on needs one process on a CUDA GPU (use auto or off for CPU or multi-GPU runs)")
    set_seed(cfg.seed)  # the same initial weights on every rank; noise differs below
    if cfg.resume and not cfg.is_image:
        task = MixtureTask(load_problem(out / PROBLEM_FILE))
    else:
        task = make_task(cfg)
    if cfg.resume and cfg.is_image:
        saved = read_config(out)["task"]
        if saved != task.config():
            raise ApsError(f"--resume: the prior or operator changed since the run in {out} started "
                           f"(saved task {json.dumps(saved)}, now {json.dumps(task.config())})")
    flow = task.make_flow(cfg)
    if cfg.init_from:
        _init_from(flow, task, cfg.init_from)
    ema = EMA(flow, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        task.attach(ema.module)  # the deep copy holds its own reference to A^T
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        task.save(out)
    set_seed(cfg.seed, device_specific=True)  # ranks draw different measurements and z

    # The frozen prior and operator move to the device but are never prepared (DDP would wrap them).
    task.to(accelerator.device)
    task.prior.requires_grad_(False)
    task.attach(flow)
    model = APSModel(flow)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = accelerator.prepare(model, opt)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    accelerator.init_trackers("aps", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str))
                                             and not isinstance(v, bool)})

    start, seconds_before = 0, 0.0
    if cfg.resume:
        states = sorted((out / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
        if not states:
            raise ApsError(f"--resume: no training state under {out / 'checkpoints'}")
        accelerator.load_state(str(states[-1]))
        # load_state does not advance accelerate's naming counter; without this the next save collides.
        accelerator.project_configuration.iteration = int(states[-1].name.split("_")[-1]) + 1
        saved = read_config(out)
        start, seconds_before = saved["step"], float(saved.get("train_seconds", 0.0))

    # after any load_state: it puts the optimizer's step counts and learning rate on the device
    graphed = GraphedStep(accelerator, model, opt, task, cfg) if use_cuda_graph(cfg, accelerator) else None

    def shipped_flow():
        return ema.module if ema is not None else accelerator.unwrap_model(model).flow

    def save(step):
        accelerator.save_state()  # every rank must call it (it waits for all)
        seconds = run_seconds()  # a collective (the slowest rank's clock): every rank, not only the main one
        if accelerator.is_main_process:
            save_checkpoint(out, shipped_flow(), task.config(), cfg.to_dict(), step, seconds=seconds)

    # the run's clock counts every session: a resumed run goes on with its LR decay and tempering
    t_start, done = time.monotonic() - seconds_before, start
    timed = cfg.max_seconds > 0 or cfg.stop_after > 0
    now = seconds_before  # the run's clock, read once per step (at its end)

    def run_seconds():
        return elapsed(accelerator, t_start)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not accelerator.is_main_process)
    for step in bar:
        # Progress drives the LR decay and tempering: the step count, or the time budget if it runs out first
        # (by the clock read at the end of the last step).
        progress = step / cfg.steps
        if cfg.max_seconds > 0:
            progress = max(progress, now / cfg.max_seconds)
        beta, lr, aps_weight = cfg.beta_at(progress), cfg.lr * lr_factor(cfg, step, progress), cfg.aps_weight_at(progress)
        if graphed is not None:
            terms = graphed(beta, lr, aps_weight)
        else:
            terms = training_step(accelerator, model, opt, task, cfg, beta, lr, aps_weight)
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model).flow)
        done = step + 1
        if callback is not None:
            callback(accelerator, model, done)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logs = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
            logs.update(beta=beta, lr=lr, aps_weight=aps_weight)
            accelerator.log(logs, step=step + 1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", beta=f"{beta:.3f}")
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0 and accelerator.is_main_process:
            _log_preview(accelerator, task, shipped_flow(), out, step + 1)
        # one reading of the run's clock per step (a collective with several processes), only with a time limit
        now = run_seconds() if timed else 0.0
        out_of_time = cfg.max_seconds > 0 and now > cfg.max_seconds
        session_over = cfg.stop_after > 0 and now - seconds_before > cfg.stop_after
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time or session_over:
            save(step + 1)
        if out_of_time:
            accelerator.print(f"stopping at step {step + 1}: --max-seconds {cfg.max_seconds} reached")
            break
        if session_over:
            accelerator.print(f"pausing at step {step + 1}: --stop-after {cfg.stop_after} reached; "
                              f"continue with --resume")
            break
    if accelerator.is_main_process and cfg.sample_every:
        _log_preview(accelerator, task, shipped_flow(), out, done)
    accelerator.end_training()
    return out


def use_cuda_graph(cfg: TrainConfig, accelerator) -> bool:
    """--cuda-graph: on (required), off, or auto: on for image tasks in one CUDA process with one micro-batch
    (the vector flows' splines read the device inside their layers, which a graph cannot capture)."""
    if cfg.cuda_graph == "on":
        return True
    return (cfg.cuda_graph == "auto" and cfg.is_image and accelerator.device.type == "cuda"
            and accelerator.num_processes == 1 and cfg.grad_accum == 1)


def elapsed(accelerator, t_start: float) -> float:
    """Seconds since t_start by the slowest rank's clock: one clock for all ranks, so that they apply the
    same LR and tempering beta (keeping DDP weights identical) and agree on when to stop (save_state
    waits for every rank). One process reads its own clock: the reduction would be a device sync per step."""
    seconds = time.monotonic() - t_start
    if accelerator.num_processes == 1:
        return seconds
    return accelerator.reduce(torch.tensor(seconds, device=accelerator.device), "max").item()


def _log_preview(accelerator, task, flow, out: Path, step: int) -> None:
    """Posterior samples of a few fixed training measurements: samples/step_N.png and a TensorBoard image."""
    was_training = flow.training
    grid = task.preview(flow.eval())
    flow.train(was_training)
    if grid is None:
        return
    from .image_grid import save_png

    save_png(grid, out / "samples" / f"step_{step:07d}.png")
    writer = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.trackers else None
    if hasattr(writer, "add_image"):  # TensorBoard may not be installed (accelerate then logs nothing)
        writer.add_image("posterior_samples", grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")


def dry_run(cfg: TrainConfig) -> str:
    """The resolved config as JSON (what --dry-run prints)."""
    return json.dumps(resolve_config(cfg).to_dict(), indent=1)


__all__ = ["APSModel", "train", "make_flow", "resolve_config", "dry_run", "load_flow", "build_flow"]
