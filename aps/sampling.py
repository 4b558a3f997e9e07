"""Posterior sampling from a trained flow: `aps.load(path).sample(y, n)`.

Sampling is seeded per measurement: the latents of measurement i come from a generator seeded with
(seed, i), so sample j of measurement i is the same whatever the chunk size or device count.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_flow
from .errors import ApsError, check_finite
from .tasks import load_task


class PosteriorSampler:
    """A trained flow with the prior and operator it was trained for."""

    def __init__(self, flow, operator, prior=None, meta: dict | None = None):
        self.flow, self.operator, self.prior, self.meta = flow, operator, prior, meta or {}

    @property
    def device(self):
        return next(itertools.chain(self.flow.parameters(), self.flow.buffers())).device

    def to(self, device) -> "PosteriorSampler":
        self.flow.to(device)
        self.operator.to(device)
        if self.prior is not None:
            self.prior.to(device)
        return self

    def latents(self, index: int, n: int, seed: int, y: torch.Tensor) -> torch.Tensor:
        """The n latents z ~ q0(z | y) of measurement `index` (y of shape (1, *y_shape)), (n, *event_shape),
        from its own CPU generator (the flow's base draws them: N(0, I), or a conditional mixture)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return self.flow.sample_z(y, n, generator=g)

    @torch.no_grad()
    def sample(self, y: torch.Tensor, n: int, seed: int = 0, chunk: int = 65536, first_index: int = 0,
               progress: bool = False, autocast_dtype: torch.dtype | None = None):
        """n posterior samples per measurement: y (B, *y_shape) -> x (B, n, *event_shape), log_q (B, n).

        `chunk` bounds the flow evaluations per forward pass (memory). Measurement i of this call is
        measurement first_index + i for seeding, so a data set split into calls gives the same samples.
        """
        y = self.operator.check_y(torch.as_tensor(y).to(self.device))
        y = y.float() if y.is_floating_point() else y  # class labels stay integers
        if n < 1:
            raise ApsError(f"the number of samples must be at least 1, got {n}")
        xs, lqs = [], []
        per = max(1, chunk // n)  # measurements per forward pass
        for start in tqdm(range(0, len(y), per), disable=not progress, desc="sampling"):
            yb = y[start:start + per]
            z = torch.cat([self.latents(first_index + start + i, n, seed, yb[i:i + 1]) for i in range(len(yb))])
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                x, log_q = self.flow(z, yb)
            xs.append(x.float().reshape(len(yb), n, *self.flow.event_shape))
            lqs.append(log_q.float().reshape(len(yb), n))
        x, log_q = torch.cat(xs), torch.cat(lqs)
        check_finite("the flow's samples", x)
        return x, log_q


def load(path: str | Path, device: str | torch.device = "cpu", prior=None, operator=None) -> PosteriorSampler:
    """Load a trained flow checkpoint folder (what train.py writes) as a PosteriorSampler.

    prior (a folder or DiffusersPrior) and operator (an Operator) are optional and only checked: they
    must be the ones the flow was trained for (ApsError otherwise). An image checkpoint's prior is loaded
    only when something asks for it; the operator is rebuilt from the checkpoint's config.
    """
    path = Path(path)
    flow, meta = load_flow(path)
    task = load_task(path, meta.get("task", {}), prior=prior, operator=operator)
    task.attach(flow)
    sampler = PosteriorSampler(flow, task.operator, task.prior, meta)
    sampler.task = task
    if flow.y_shape != tuple(sampler.operator.y_shape):
        raise ApsError(f"{path}: the flow expects y of shape {flow.y_shape} but the operator makes {sampler.operator.y_shape}")
    return sampler.to(device)


def heldout_measurements(sampler: PosteriorSampler, start: int, stop: int, seed: int = 0, data: str | None = None):
    """Held-out images start..stop-1 of the checkpoint's data set (or of `data`, e.g. mnist for a flow trained
    on prior samples), measured with its operator.

    Returns y (B, *y_shape), x_true (B, C, H, W), labels (B,) or None. Image i's noise (and its class
    draw) comes from a generator seeded with (seed, i), so the same digit gets the same y in any call.
    """
    from .tasks import heldout_images

    task = getattr(sampler, "task", None)
    if task is None or task.kind != "image":
        raise ApsError("held-out measurements need an image checkpoint")
    x_all, labels = heldout_images(data or task.data, sampler.operator.x_shape)
    if not 0 <= start < stop <= len(x_all):
        raise ApsError(f"held-out range {start}:{stop} is outside the {len(x_all)} held-out images")
    op = sampler.operator.cpu()
    ys = []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        ys.append(op.measure(x_all[i:i + 1], generator=g))
    sampler.operator.to(sampler.device)
    return torch.cat(ys), x_all[start:stop], None if labels is None else labels[start:stop]


def measurements_from_images(operator, images: torch.Tensor) -> torch.Tensor:
    """Measurement images as y: images (B, C, h, w) in [-1, 1] -> y (B, *y_shape).

    The images are the observed part of y: the noisy image (denoise, deblur), the low-resolution image
    (sr; resized to y's size if needed) or the image with holes (inpainting with a fixed mask, whose
    mask channel is appended). Vectors and class labels are not images: pass a tensor file.
    """
    import torch.nn.functional as F

    ys = tuple(operator.y_shape)
    if len(ys) != 3:
        raise ApsError(f"{operator.name} measurements are not images (y has shape {ys}): give a tensor file with 'y'")
    c = operator.x_shape[0]
    if tuple(images.shape[-2:]) != ys[1:]:
        images = F.interpolate(images, size=ys[1:], mode="bicubic", align_corners=False).clamp(-1, 1)
    if ys[0] == c + 1 and hasattr(operator, "mask"):  # inpainting: [m * values, m]
        if not getattr(operator, "fixed", True):
            raise ApsError(f"{operator.name} draws a mask per measurement: give a tensor file with 'y' holding it")
        m = operator.mask.cpu()[None].to(images.dtype)
        return torch.cat([m * images, m.expand(len(images), -1, -1, -1)], 1)
    return images
