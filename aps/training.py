"""The training loop: the only place in aps that knows about accelerate (the rest of the library never sees a rank or a process group).

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
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from . import objective
from .checkpoint import build_flow, load_flow, read_config, save_checkpoint
from .config import TrainConfig
from .errors import ApsError
from .graph_step import GraphedStep
from .problems import load_problem
from .run_folder import RunLock, check_new_run, clear_run
from .train_state import load_optimizer_state, newest_state, remove_temporary, rng_state, set_rng_state, write_state
from .tasks import PROBLEM_FILE, MixtureTask, make_task


class APSModel(nn.Module):
    """The flow plus the whole loss in one `forward`, so DDP synchronises and autocast covers it all.

    (docs/flows.md: accelerate wraps only `forward`; calling flow.sample through `.module` would
    leave gradients unsynchronised without any error.) Prior and operator are arguments, not
    submodules: they are frozen and must not be wrapped by DDP.
    """

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, y, prior, operator, cfg: TrainConfig, beta, x_pairs=None, aps_weight=None, y_pairs=None):
        """The loss and its terms for measurements y; beta and aps_weight (default cfg.aps_weight) may be
        floats or 0-d tensors (a CUDA graph replays with new values in the same tensors). (x_pairs, y_pairs):
        the forward-KL term's pairs (y_pairs defaults to y: the pairs the measurements were made from)."""
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
            fkl = objective.forward_kl(self.flow, x_pairs, y if y_pairs is None else y_pairs).mean()
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
    """cfg validated; on --resume also checked against the run's saved config (aps.recipe.resume_changes: the task,
    architecture, seed and EMA on/off cannot change). `cfg` is the whole config: aps.recipe.resolve layers the
    options a command line gives over the saved run (train.py does), and so does TrainConfig.from_dict of
    aps.recipe.saved_config(out) with the fields to change set."""
    if cfg.resume:
        from .recipe import resume_changes, saved_config

        resume_changes(saved_config(cfg.out), cfg, cfg.out)
    return cfg.validate()


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


MAX_SKIPS = 10  # --nonfinite skip: this many non-finite steps in a row stop the run


def training_step(accelerator, model, opt, task, cfg: TrainConfig, beta: float, lr: float,
                  aps_weight: float | None = None) -> tuple[dict, str | None]:
    """One optimizer step over cfg.grad_accum micro-batches of fresh measurements.

    x ~ the task's clean data, y = A(x) + sigma_y n, the loss of `APSModel` at tempering beta; the LR is set
    to `lr` first. With measurements only (task.sample_y), the APS term sees those y instead, and the
    forward-KL term (if weighted) the pairs (x, A(x) + noise). Returns (the last micro-batch's terms, None), or
    (terms, what was not finite) if the loss or the gradient held NaN or inf: then no parameter moved. One host
    sync, for that check.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    for _ in range(cfg.grad_accum):  # one optimizer step per call, over grad_accum micro-batches
        with accelerator.accumulate(model):
            y = task.sample_y(cfg.batch_size)  # (B, *y_shape) measurements without truth, or None
            x0 = task.sample_x(cfg.batch_size) if y is None or cfg.fkl_weight > 0 else None  # (B, *event_shape)
            y0 = None if x0 is None else task.operator.measure(x0)  # (B, *y_shape)
            y_aps = y0 if y is None else y
            try:
                terms = model(y_aps, task.prior, task.operator, cfg, beta, x_pairs=x0,
                              aps_weight=aps_weight, y_pairs=y0)
            except AssertionError:  # normflows' spline inverse asserts on NaN inputs or runaway weights
                flow = accelerator.unwrap_model(model).flow
                opt.zero_grad(set_to_none=True)
                if any(_nonfinite_kind(t) for t in (x0, y_aps, *flow.parameters())):
                    return {}, describe_nonfinite({}, x0, y_aps, flow)
                largest = max(float(p.detach().abs().max()) for p in flow.parameters())
                return {}, f"not finite: the flow's spline inverse (its weights reach |w| = {largest:.3g})"
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients:
                # max_norm inf leaves the gradient as it is and gives its norm (NaN/inf if any entry is)
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if not _finite(accelerator, terms["loss"], norm):
                    problem = describe_nonfinite(terms, x0, y_aps, accelerator.unwrap_model(model).flow)
                    opt.zero_grad(set_to_none=True)
                    return terms, problem
            opt.step()
            opt.zero_grad(set_to_none=True)
    return terms, None


def _finite(accelerator, loss, norm) -> bool:
    """Whether the loss and the gradient norm are finite on every rank (so that all ranks decide alike).

    With fp16 the gradient scaler skips steps with inf gradients itself (it calibrates its scale that way):
    only the loss counts then."""
    values = [torch.as_tensor(loss, dtype=torch.float32, device=accelerator.device).reshape(())]
    if accelerator.scaler is None:
        values.append(torch.as_tensor(norm, dtype=torch.float32, device=accelerator.device).reshape(()))
    ok = torch.isfinite(torch.stack(values)).all().float()
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok, "min")
    return bool(ok.item())


TERM_NAMES = {"nll": "nll (-log p(y|x))", "prior": "prior (the prior's ELBO or -log p(x))",
              "log_q": "log_q (the flow's log-density)", "forward_kl": "forward_kl (-log q(x|y))", "loss": "loss"}


def _nonfinite_kind(t) -> str | None:
    if t is None:  # measurements only: no clean x this step
        return None
    t = torch.as_tensor(t).detach()
    if torch.isfinite(t).all():
        return None
    return "NaN" if torch.isnan(t).any() else "inf"


def describe_nonfinite(terms: dict, x, y, flow) -> str:
    """Which inputs, parameters, loss terms and gradients hold NaN or inf (the first few of each), as one phrase."""
    found = []
    for name, value in (("the clean data x", x), ("the measurements y", y)):
        if _nonfinite_kind(value):
            found.append(f"{name} ({_nonfinite_kind(value)})")
    params = [(n, _nonfinite_kind(p)) for n, p in flow.named_parameters() if _nonfinite_kind(p)]
    if params:
        found.append(f"{len(params)} flow parameters, e.g. {params[0][0]} ({params[0][1]})")
    bad_terms = [f"{TERM_NAMES[k]} {kind}" for k in ("nll", "prior", "log_q", "forward_kl", "loss")
                 if k in terms and (kind := _nonfinite_kind(terms[k]))]
    if bad_terms:
        found.append("loss terms " + ", ".join(bad_terms))
    grads = [(n, _nonfinite_kind(p.grad)) for n, p in flow.named_parameters()
             if p.grad is not None and _nonfinite_kind(p.grad)]
    if grads:
        found.append(f"the gradient of {len(grads)} parameters, e.g. {grads[0][0]} ({grads[0][1]})")
    return "not finite: " + "; ".join(found or ["the gradient norm"])


def _on_main(accelerator, fn):
    """fn() on the main process; an ApsError there is raised on every rank (none is left waiting for it)."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except ApsError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise ApsError(error)
    return result


def _all_finite(module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def train(cfg: TrainConfig, callback=None) -> Path:
    """Train one flow for one task (mixture problem or image operator); returns the output folder.

    The folder is a checkpoint that sample.py and aps.load read. callback(accelerator, model, step), if
    given, runs on every rank after each optimizer step (tests use it to compare ranks).
    Nothing is written into cfg.out before the checks pass (the folder's run, the task, the flow); then
    the folder is locked (aps.run_folder) until the run ends.
    """
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    if not cfg.resume:
        check_new_run(out, cfg.overwrite)
    accelerator = Accelerator(
        cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    if cfg.cuda_graph == "on" and (accelerator.device.type != "cuda" or accelerator.num_processes != 1):
        raise ApsError("--cuda-graph on needs one process on a CUDA GPU (use auto or off for CPU or multi-GPU runs)")
    lock = RunLock(out)
    try:
        return _train(cfg, accelerator, lock, callback)
    finally:
        lock.release()


def _train(cfg: TrainConfig, accelerator, lock: RunLock, callback) -> Path:
    out = Path(cfg.out)
    set_seed(cfg.seed)  # the same initial weights on every rank; noise differs below
    if cfg.resume and not cfg.is_image:
        task = MixtureTask(load_problem(out / PROBLEM_FILE))
    else:
        with accelerator.main_process_first():  # --data prior: the main process draws and caches the bank
            task = make_task(cfg, device=accelerator.device)
    if cfg.resume and cfg.is_image:
        saved = read_config(out)["task"]
        if saved != task.config():
            raise ApsError(f"--resume: the prior or operator changed since the run in {out} started "
                           f"(saved task {json.dumps(saved)}, now {json.dumps(task.config())})")
    flow = task.make_flow(cfg)
    if cfg.init_from and not cfg.resume:  # a resumed run keeps its init_from as a record only
        _init_from(flow, task, cfg.init_from)
    ema = EMA(flow, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        task.attach(ema.module)  # the deep copy holds its own reference to A^T

    def take_folder():  # every check has passed: lock the folder, then (and only then) write into it
        lock.acquire()
        if not cfg.resume:
            check_new_run(out, cfg.overwrite)  # again, under the lock: another run may have started meanwhile
            if cfg.overwrite:
                clear_run(out)
        remove_temporary(out)

    _on_main(accelerator, take_folder)
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

    # after any load_state: it puts the optimizer's step counts and learning rate on the device
    graphed = GraphedStep(accelerator, model, opt, task, cfg) if use_cuda_graph(cfg, accelerator) else None

    def shipped_flow():
        return ema.module if ema is not None else accelerator.unwrap_model(model).flow

    start, seconds_before = 0, 0.0
    if cfg.resume:
        start, seconds_before = _load_state(accelerator, out, accelerator.unwrap_model(model).flow, ema, opt)
        if accelerator.is_main_process and read_config(out).get("step") != start:
            # killed between the flow and its training state: the flow goes back to the state
            save_checkpoint(out, shipped_flow(), task.config(), cfg.to_groups(), start, seconds=seconds_before)
    accelerator.init_trackers("aps", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str))
                                             and not isinstance(v, bool)})
    last_saved = start if cfg.resume else None

    def save(step):
        nonlocal last_saved
        rngs = gather_object([rng_state()])  # one per process: each rank's noise goes on where it stopped
        seconds = run_seconds()  # a collective (the slowest rank's clock): every rank, not only the main one
        if not (_all_finite(accelerator.unwrap_model(model).flow) and (ema is None or _all_finite(ema))):
            raise ApsError(f"step {step}: the flow's weights are not finite; nothing saved "
                           f"({_kept(out, last_saved)}); lower --lr")

        def write():
            if last_saved is None:
                task.save(out)  # the files the task refers to (the mixture problem), with the first save
            # the flow first: a kill before the state is complete leaves the previous state, which --resume
            # takes (and writes the flow of) again
            save_checkpoint(out, shipped_flow(), task.config(), cfg.to_groups(), step, seconds=seconds)
            extra = {"seconds": seconds, "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
            write_state(out, step, {"model": accelerator.unwrap_model(model).flow, "ema": ema}, opt, rngs, extra,
                        cfg.keep)

        _on_main(accelerator, write)
        accelerator.wait_for_everyone()
        last_saved = step

    # the run's clock counts every invocation: a resumed run goes on with its LR decay and tempering
    t_start, done = time.monotonic() - seconds_before, start
    timed = cfg.max_seconds > 0 or cfg.stop_after > 0
    now = seconds_before  # the run's clock, read once per step (at its end)
    skipped = 0  # non-finite steps in a row

    def run_seconds():
        return elapsed(accelerator, t_start)

    logs = {}  # the last logged terms, for the model card
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not accelerator.is_main_process)
    for step in bar:
        # Progress drives the LR decay and tempering: the step count, or the time budget if it runs out first
        # (by the clock read at the end of the last step).
        progress = step / cfg.steps
        if cfg.max_seconds > 0:
            progress = max(progress, now / cfg.max_seconds)
        beta, lr, aps_weight = cfg.beta_at(progress), cfg.lr * lr_factor(cfg, step, progress), cfg.aps_weight_at(progress)
        if graphed is not None:
            # a replayed graph has stepped already: its loss is checked where it is read (logs, saves)
            terms, problem = graphed(beta, lr, aps_weight), None
        else:
            terms, problem = training_step(accelerator, model, opt, task, cfg, beta, lr, aps_weight)
        if problem is not None:
            skipped += 1
            if cfg.nonfinite == "stop" or skipped >= MAX_SKIPS:
                why = "" if cfg.nonfinite == "stop" else f" ({MAX_SKIPS} steps in a row)"
                raise ApsError(f"step {step + 1}: {problem}{why}; the run stopped, nothing saved "
                               f"({_kept(out, last_saved)}); lower --lr, or --nonfinite skip to step over rare ones")
            accelerator.print(f"warning: step {step + 1} skipped: {problem}")
        else:
            skipped = 0
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model).flow)
        done = step + 1
        if callback is not None:
            callback(accelerator, model, done)
        if problem is None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            logs = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
            logs.update(beta=beta, lr=lr, aps_weight=aps_weight)
            if graphed is not None and not math.isfinite(logs["loss"]):  # graph replays are not checked one by one
                raise ApsError(f"step {step + 1}: the loss is not finite; the run stopped, nothing saved "
                               f"({_kept(out, last_saved)}); lower --lr")
            accelerator.log(logs, step=step + 1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", beta=f"{beta:.3f}")
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0 and accelerator.is_main_process:
            _log_preview(accelerator, task, shipped_flow(), out, step + 1)
        # one reading of the run's clock per step (a collective with several processes), only with a time limit
        now = run_seconds() if timed else 0.0
        out_of_time = cfg.max_seconds > 0 and now > cfg.max_seconds
        pause_now = cfg.stop_after > 0 and now - seconds_before > cfg.stop_after
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time or pause_now:
            save(step + 1)
        if out_of_time:
            accelerator.print(f"stopping at step {step + 1}: --max-seconds {cfg.max_seconds} reached")
            break
        if pause_now:
            accelerator.print(f"pausing at step {step + 1}: --stop-after {cfg.stop_after} reached; "
                              f"continue with --resume")
            break
    if accelerator.is_main_process and cfg.sample_every:
        _log_preview(accelerator, task, shipped_flow(), out, done)
    if accelerator.is_main_process:
        from .card import write_card

        write_card(out, metrics=logs)  # README.md: recipe, command, task, steps, time, terms, sample grid
    accelerator.end_training()
    return out


def _kept(out: Path, step) -> str:
    return f"the run in {out} stays at step {step}" if step is not None else f"no state was saved in {out}"


def _load_state(accelerator, out: Path, flow, ema, opt) -> tuple[int, float]:
    """Load the newest complete training state into flow, ema and opt (and this rank's RNG); (step, seconds)."""
    folder, meta, files = newest_state(out, warn=accelerator.print)
    if ("ema" in files) != (ema is not None):
        raise ApsError(f"--resume: the run in {out} was trained {'with' if 'ema' in files else 'without'} an EMA "
                       f"of its weights: give the same --ema-decay")
    device = accelerator.device
    flow.load_state_dict(files["model"])
    if ema is not None:
        ema.load_state_dict(files["ema"])
        ema.to(device)
    load_optimizer_state(opt, files["optimizer"], meta["optimizer"])  # torch moves the moments to the parameters
    if accelerator.scaler is not None and meta.get("scaler"):
        accelerator.scaler.load_state_dict(meta["scaler"])
    rank = accelerator.process_index
    if rank < len(meta["rng"]):
        mine = {k.split(".", 1)[1]: v for k, v in files["rng"].items() if k.split(".", 1)[0] == str(rank)}
        set_rng_state(mine, meta["rng"][rank])
    return int(meta["step"]), float(meta.get("seconds", 0.0))


def use_cuda_graph(cfg: TrainConfig, accelerator) -> bool:
    """--cuda-graph: on (required), off, or auto: on for image tasks in one CUDA process with one micro-batch
    (the vector flows' splines read the device inside their layers, which a graph cannot capture), unless
    --nonfinite skip asks for steps to be checked before they are applied."""
    if cfg.cuda_graph == "on":
        return True
    return (cfg.cuda_graph == "auto" and cfg.is_image and accelerator.device.type == "cuda"
            and accelerator.num_processes == 1 and cfg.grad_accum == 1 and cfg.nonfinite != "skip")


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
    """The config as recipe TOML, grouped by section (train.py --dry-run prints aps.recipe.describe instead,
    which also says where each value came from)."""
    from .recipe import to_toml

    return to_toml(resolve_config(cfg))


__all__ = ["APSModel", "train", "make_flow", "resolve_config", "dry_run", "load_flow", "build_flow"]
