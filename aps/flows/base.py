"""The conditional-flow interface: q_phi(x | y) as one normflows ConditionalNormalizingFlow.

Direction, stated once for all of aps: a normflows layer's `forward(z, context)` maps the latent z to
the sample x (the sampling direction) and returns (x, log|det dx/dz|); `inverse` maps x to z. So

    log q(x | y) = log N(z; 0, I) - sum_layers log|det d(layer)/d(input)|   along z -> x.

Subclasses build `self.nf` (the normflows model, whose base q0 is a standard normal unless the
subclass overrides `sample_z` and `base_log_prob`) and `encode(y)`, which turns a measurement batch
into the context every layer receives.

Two ways to draw from q: `sample` gives n i.i.d. samples per y (what users get); `sample_weighted`
gives samples with weights that sum to 1 per y, sum_j weight_j f(x_j) estimating E_q[f] without
bias, which the objective reduces with (uniform 1/n here; stratified for a mixture base).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over all but the batch axis, (B,)."""
    return -0.5 * (z.flatten(1).pow(2).sum(1) + z[0].numel() * math.log(2 * math.pi))


def _repeat(context, n: int):
    """Repeat each item of a context (a tensor, or a tuple/list of tensors) n times along the batch."""
    if n == 1:
        return context
    if isinstance(context, (tuple, list)):
        return type(context)(_repeat(c, n) for c in context)
    return context.repeat_interleave(n, dim=0)


class ConditionalFlow(nn.Module):
    """q_phi(x | y) with x of shape `event_shape` and measurements of shape `y_shape`."""

    event_shape: tuple
    y_shape: tuple
    nf: nn.Module  # normflows.ConditionalNormalizingFlow

    def encode(self, y: torch.Tensor):
        """Context for the flow layers from y (B, *y_shape)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, y: torch.Tensor):
        """Sampling direction: z (B * n, *event_shape), y (B, *y_shape) -> x (B * n, *event_shape), log_q (B * n,).

        The n latents of measurement i are rows i*n .. i*n + n - 1 of z; y is encoded once and its
        context repeated. Written as `forward` so that DDP and autocast wrap it (docs/flows.md).
        """
        n = z.shape[0] // y.shape[0]
        context = _repeat(self.encode(y), n)
        x, log_det = self.nf.forward_and_log_det(z, context=context)
        return x, self.base_log_prob(z, context) - log_det

    @property
    def standard_normal_base(self) -> bool:
        """Whether q0(z | y) is N(0, I) for every y (what a sampling temperature scales): here it is."""
        return True

    def base_log_prob(self, z: torch.Tensor, context) -> torch.Tensor:
        """log q0(z | y) for z (B, *event_shape) and its (repeated) context, (B,): here log N(z; 0, I)."""
        return standard_normal_log_prob(z)

    def sample_z(self, y: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n i.i.d. latents z ~ q0(z | y_i) per measurement, (B * n, *event_shape), rows i*n .. i*n + n - 1 for y_i.

        The noise is drawn on the generator's device if one is given (aps.sampling seeds a CPU generator
        per measurement), else on the flow's, and returned on the flow's device.
        """
        ref = next(itertools.chain(self.parameters(), self.buffers()))  # device and dtype
        dev = generator.device if generator is not None else ref.device
        z = torch.randn(y.shape[0] * n, *self.event_shape, generator=generator, device=dev, dtype=ref.dtype)
        return z.to(ref.device)

    def sample(self, y: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """n i.i.d. samples per measurement: y (B, *y_shape) -> x (B, n, *event_shape), log_q (B, n)."""
        b = y.shape[0]
        x, log_q = self(self.sample_z(y, n, generator), y)
        return x.reshape(b, n, *self.event_shape), log_q.reshape(b, n)

    def sample_weighted(self, y: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """Weighted samples for expectations under q: x (B, n', *event_shape), log_q (B, n'), weight (B, n').

        sum_j weight_ij f(x_ij) is an unbiased estimate of E_{q(.|y_i)}[f] and the weights sum to 1.
        Here n' = n i.i.d. samples of weight 1/n; a flow with a mixture base overrides it (stratified).
        """
        x, log_q = self.sample(y, n, generator)
        return x, log_q, torch.full_like(log_q, 1.0 / n)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q(x | y) for x (B, *event_shape), y (B, *y_shape) -> (B,)."""
        return self.nf.log_prob(x, context=self.encode(y))

    def config(self) -> dict:
        """The constructor arguments (JSON-able): enough to rebuild the flow before loading weights."""
        raise NotImplementedError

    # -- the Hugging Face hub's verbs (the layout is aps.checkpoint's; aps.hub resolves hub ids)
    COMPANIONS = ("problem.safetensors", "README.md", "samples.png")  # carried along by save_pretrained

    @classmethod
    def from_pretrained(cls, name_or_path, revision: str | None = None, cache_dir: str | None = None,
                        device="cpu") -> "ConditionalFlow":
        """A trained flow, in eval mode, from a checkpoint folder or a hub id `owner/name` (its snapshot in the hub
        cache, downloaded once). `flow.meta` is its config.json (task, training config, step); aps.load(same) gives
        the flow with its operator and prior as a sampler."""
        from ..checkpoint import load_flow
        from ..errors import ApsError
        from ..hub import local_folder

        folder = local_folder(name_or_path, revision=revision, cache_dir=cache_dir)
        flow, meta = load_flow(folder, map_location=str(device))
        if not isinstance(flow, cls):
            raise ApsError(f"{name_or_path} holds a {type(flow).__name__}, not a {cls.__name__}")
        flow.meta, flow.folder = meta, folder
        return flow

    def save_pretrained(self, folder) -> None:
        """Write the flow as a checkpoint folder (flow.safetensors, config.json with the task and training config it
        was loaded with) that from_pretrained, aps.load and sample.py read; the files beside the weights it was
        loaded from (mixture problem, model card, sample grid) are copied along."""
        import shutil
        from pathlib import Path

        from ..checkpoint import save_checkpoint

        meta = getattr(self, "meta", None) or {}
        source = getattr(self, "folder", None)
        Path(folder).mkdir(parents=True, exist_ok=True)
        # the companions first: the weights' fingerprint covers the task's files (a mixture problem)
        for name in self.COMPANIONS if source is not None else ():
            if (Path(source) / name).is_file() and Path(source).resolve() != Path(folder).resolve():
                shutil.copyfile(Path(source) / name, Path(folder) / name)
        save_checkpoint(folder, self, meta.get("task", {}), meta.get("train", {}), meta.get("step", 0),
                        seconds=meta.get("train_seconds"))

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload an aps flow", revision: str | None = None):
        """save_pretrained into a temporary folder and upload it to hub repo `repo_id` (created if missing)."""
        import tempfile

        from ..hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision)
