"""The training step as one CUDA graph: captured once, then replayed every step.

An image step launches thousands of small kernels (the flow, the prior's UNet, their backward pass,
AdamW); at MNIST sizes the host's Python and launch overhead, not the GPU, sets its pace. A CUDA graph
records those launches once and replays them with one call ("whole-network capture",
torch.cuda.graph). What changes from step to step lives in device tensors that the graph reads: the
learning rate, the tempering beta and the APS weight. The random draws (training images, measurement
noise, z, ELBO times and noise) come fresh on every replay from the default CUDA generator, whose
offsets PyTorch advances per replay, so a replayed step is a new step, not a repeat.

Conditions: one process (no DDP all-reduce inside the graph), one micro-batch per step, fixed shapes,
AdamW in its capturable form (step counts and the learning rate on the device). The first `warmup`
steps run eagerly on a side stream, as capture requires; every step, warm-up or replay, is a real
optimizer step.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import ApsError


class GraphedStep:
    """`training_step` for one GPU process, captured as a CUDA graph after `warmup` eager steps.

    Args:
        accelerator, model, opt: as `aps.training.train` prepares them (the model's own autocast
            wrapper is taken off: autocast runs here, with its weight cache off, as capture needs).
        task: the task whose `sample_x` and operator make each step's measurements.
        cfg: the TrainConfig (batch size, loss options, grad clip, mixed precision).
    Calling it with (beta, lr, aps_weight) runs one step and returns the loss terms (device tensors,
    overwritten by the next replay).
    """

    def __init__(self, accelerator, model, opt, task, cfg, warmup: int = 3):
        device = accelerator.device
        if device.type != "cuda" or accelerator.num_processes != 1:
            raise ApsError("--cuda-graph on needs one process on a CUDA GPU (use auto or off for CPU or multi-GPU runs)")
        if cfg.grad_accum != 1:
            raise ApsError("--cuda-graph on captures one whole optimizer step: use --grad-accum 1")
        self.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        self.opt = getattr(opt, "optimizer", opt)
        self.task, self.cfg, self.warmup, self.done = task, cfg, int(warmup), 0
        self.lr = torch.tensor(float(cfg.lr), device=device)
        self.beta = torch.tensor(1.0, device=device)
        self.aps_weight = torch.tensor(float(cfg.aps_weight), device=device)
        for group in self.opt.param_groups:
            group["capturable"] = True
            group["lr"] = self.lr
        for state in self.opt.state.values():  # a resumed run: capturable AdamW keeps its step counts on the device
            if "step" in state:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.autocast = ((lambda: torch.autocast("cuda", dtype=dtype, cache_enabled=False)) if dtype is not None
                         else contextlib.nullcontext)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.graph, self.static = None, None

    def _step(self) -> dict:
        cfg, task = self.cfg, self.task
        x0 = task.sample_x(cfg.batch_size)  # (B, *event_shape)
        y = task.operator.measure(x0)  # (B, *y_shape)
        with self.autocast():
            terms = self.model(y, task.prior, task.operator, cfg, self.beta, x_pairs=x0, aps_weight=self.aps_weight)
        terms["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        return terms

    def __call__(self, beta: float, lr: float, aps_weight: float) -> dict:
        self.lr.fill_(lr)
        self.beta.fill_(beta)
        self.aps_weight.fill_(aps_weight)
        if self.graph is not None:
            self.graph.replay()
            return self.static
        if self.done < self.warmup:  # eager steps on a side stream before capture (torch.cuda.graph's rule)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                terms = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.done += 1
            return terms
        # Gradients are allocated inside the graph's memory pool, so that each replay writes them afresh.
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static = self._step()
        self.graph.replay()  # capture only records: this is the step's actual run
        return self.static
