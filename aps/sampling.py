"""Posterior sampling from a trained flow: `aps.load(path).sample(y, n)`.

Sampling is seeded per measurement: the latents of measurement i come from a generator seeded with
(seed, i), so sample j of measurement i is the same whatever the chunk size or device count.

Temperature (as in Glow and SRFlow): `temperature=T` draws the latents from N(0, T^2 I) instead of N(0, I),
x = G(T u) with u ~ N(0, I). T < 1 pulls the samples toward the flow's mode: single samples get closer to the
truth, the credible intervals narrower. The flow itself is unchanged; log_q is then the density the samples
were drawn from, log q_T(x | y) = log N(u; 0, I) - d log T - log|det dG/dz|, so importance weights stay exact.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_flow
from .errors import ApsError, check_finite
from .flows.base import standard_normal_log_prob
from .tasks import load_task


BLOCK = 4096  # latents of one measurement drawn from one generator (aps.sampling.PosteriorSampler.latents)


class PosteriorSampler:
    """A trained flow with the prior and operator it was trained for."""

    def __init__(self, flow, operator, prior=None, meta: dict | None = None):
        self.flow, self.operator, self.prior, self.meta = flow, operator, prior, meta or {}
        if len(getattr(flow, "event_shape", ())) == 3:  # an image flow: channels-last convolutions (module docstring)
            flow.to(memory_format=torch.channels_last)
        self._pass_fn = self._pass

    def compile(self, mode: str | None = None) -> "PosteriorSampler":
        """Run the flow's pass through torch.compile (the autocast inside the compiled function): one image flow
        pass at batch 10k ran 2.0x faster in fp32 on an H200 (BENCHMARKS.md), after a first call that compiles
        (~1.5 min there; each new chunk shape compiles again, then a dynamic-shape graph is kept). Samples equal
        the eager ones to float rounding. mode: torch.compile's (None = its default)."""
        self._pass_fn = torch.compile(self._pass, mode=mode)
        return self

    @property
    def device(self):
        return next(itertools.chain(self.flow.parameters(), self.flow.buffers())).device

    def to(self, device) -> "PosteriorSampler":
        self.flow.to(device)
        self.operator.to(device)
        if self.prior is not None:
            self.prior.to(device)
        return self

    def latents(self, index: int, n: int, seed: int, y: torch.Tensor, block: int = 0,
                temperature: float = 1.0) -> torch.Tensor:
        """The n latents z ~ q0(z | y) of block `block` of measurement `index` (y of shape (1, *y_shape)),
        (n, *event_shape), from their own CPU generator (the flow's base draws them: N(0, I), or a
        conditional mixture), times `temperature`. Block 0 is seeded by (seed, index), block b > 0 by
        (seed, index, b)."""
        key = seed * 1_000_003 + index
        if block:
            key = int(np.random.SeedSequence([seed, index, block]).generate_state(1, np.uint64)[0] >> 1)
        g = torch.Generator().manual_seed(key)
        z = self.flow.sample_z(y, n, generator=g)
        return z if temperature == 1 else z * temperature

    def check_temperature(self, temperature) -> float:
        """temperature as a float, checked: positive and finite, and 1 unless the flow's base is N(0, I) (a
        conditional mixture base has no single scale to temper)."""
        t = float(temperature)
        if not (t > 0 and math.isfinite(t)):
            raise ApsError(f"the temperature must be a positive number, got {temperature}")
        if t != 1 and not getattr(self.flow, "standard_normal_base", False):
            raise ApsError(f"a temperature other than 1 needs a flow with a standard normal base; "
                           f"{type(self.flow).__name__} has its own base (got temperature {t:g})")
        return t

    @torch.no_grad()
    def stream(self, y: torch.Tensor, n: int, seed: int = 0, chunk: int = 65536, first_index: int = 0,
               progress: bool = False, autocast_dtype: torch.dtype | None = None, temperature: float = 1.0):
        """n posterior samples per measurement, as they come: yields (i, j, x, log_q) with x (m, k, *event_shape)
        and log_q (m, k), samples j..j+k-1 of measurements i..i+m-1 of y (B, *y_shape), in order; at a
        temperature T != 1 the latents are N(0, T^2 I) and log_q is that sampler's density (module docstring).

        At most `chunk` flow evaluations per forward pass and at most BLOCK latents in memory, whatever n:
        the latents of a measurement are drawn in blocks of BLOCK samples, each from its own generator
        (`latents`), so sample j of measurement first_index + i is the same for any chunk or split.
        """
        y = self.check_y(y)
        if n < 1:
            raise ApsError(f"the number of samples must be at least 1, got {n}")
        if chunk < 1:
            raise ApsError(f"the chunk must be at least 1, got {chunk}")
        t = self.check_temperature(temperature)
        bar = tqdm(total=len(y) * n, disable=not progress, desc="sampling", unit="sample", unit_scale=True)
        if n <= min(chunk, BLOCK):  # whole measurements per forward pass
            per = max(1, chunk // n)
            for start in range(0, len(y), per):
                yb = y[start:start + per]
                z = torch.cat([self.latents(first_index + start + i, n, seed, yb[i:i + 1], temperature=t)
                               for i in range(len(yb))])
                x, log_q = self._flow(z, yb, autocast_dtype, t)
                bar.update(len(yb) * n)
                yield start, 0, x.reshape(len(yb), n, *self.flow.event_shape), log_q.reshape(len(yb), n)
        else:  # one measurement at a time, its blocks in chunks
            for i in range(len(y)):
                for b0 in range(0, n, BLOCK):
                    z_block = self.latents(first_index + i, min(BLOCK, n - b0), seed, y[i:i + 1], block=b0 // BLOCK,
                                           temperature=t)
                    for c0 in range(0, len(z_block), chunk):
                        z = z_block[c0:c0 + chunk]
                        x, log_q = self._flow(z, y[i:i + 1], autocast_dtype, t)
                        bar.update(len(z))
                        yield i, b0 + c0, x[None], log_q[None]
        bar.close()

    def _pass(self, z, y, autocast_dtype):
        with torch.autocast(z.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return self.flow(z, y)

    def _flow(self, z, y, autocast_dtype, temperature: float = 1.0):
        x, log_q = self._pass_fn(z, y, autocast_dtype)
        x = x.float().contiguous()  # (channels-last out of an image flow's convolutions)
        check_finite("the flow's samples", x)
        log_q = log_q.float()
        if temperature != 1:  # the flow gives log N(z) - log|det|; the sampler drew z = T u: log N(u) - d log T - log|det|
            z = z.float()
            log_q = log_q + (standard_normal_log_prob(z / temperature) - standard_normal_log_prob(z)
                             - z[0].numel() * math.log(temperature))
        return x, log_q

    def check_y(self, y) -> torch.Tensor:
        """y as a tensor on the flow's device, checked against the operator (shape, finite); labels stay integers."""
        y = torch.as_tensor(y)
        if y.ndim == 0 or y.numel() == 0:
            raise ApsError(f"measurements y must be a batch (B, *y_shape) with B >= 1, got shape {tuple(y.shape)}")
        y = self.operator.check_y(y.to(self.device))
        return y.float() if y.is_floating_point() else y

    @torch.no_grad()
    def sample(self, y: torch.Tensor, n: int, seed: int = 0, chunk: int = 65536, first_index: int = 0,
               progress: bool = False, autocast_dtype: torch.dtype | None = None, temperature: float = 1.0):
        """n posterior samples per measurement: y (B, *y_shape) -> x (B, n, *event_shape), log_q (B, n), in memory;
        temperature: see `stream`.

        `chunk` bounds the flow evaluations per forward pass (the result itself is B * n samples: for more than
        fit in memory, use `stream`, as sample.py does). Measurement i of this call is measurement
        first_index + i for seeding, so a data set split into calls gives the same samples.
        """
        y = self.check_y(y)
        x = torch.empty(len(y), n, *self.flow.event_shape)
        log_q = torch.empty(len(y), n)
        for i, j, xs, lq in self.stream(y, n, seed=seed, chunk=chunk, first_index=first_index, progress=progress,
                                        autocast_dtype=autocast_dtype, temperature=temperature):
            x[i:i + len(xs), j:j + xs.shape[1]] = xs.cpu()
            log_q[i:i + len(xs), j:j + xs.shape[1]] = lq.cpu()
        return x.to(self.device), log_q.to(self.device)


class RunningMoments:
    """Mean and std (unbiased, as torch.std) over samples that come in pieces: Chan et al.'s pairwise update,
    in float64, for B measurements of shape event_shape."""

    def __init__(self, b: int, event_shape):
        self.count = torch.zeros(b, dtype=torch.float64)
        self.mean = torch.zeros(b, *event_shape, dtype=torch.float64)
        self.m2 = torch.zeros(b, *event_shape, dtype=torch.float64)

    def add(self, i: int, x: torch.Tensor) -> None:
        """x (m, k, *event_shape): k more samples of measurements i..i+m-1."""
        x = x.detach().to("cpu", torch.float64)
        k = x.shape[1]
        sl = slice(i, i + len(x))
        mean_b, m2_b = x.mean(1), ((x - x.mean(1, keepdim=True)) ** 2).sum(1)
        n_a = self.count[sl].reshape(-1, *[1] * (x.ndim - 2))
        total = n_a + k
        delta = mean_b - self.mean[sl]
        self.mean[sl] += delta * (k / total)
        self.m2[sl] += m2_b + delta ** 2 * (n_a * k / total)
        self.count[sl] += k

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.count.reshape(-1, *[1] * (self.mean.ndim - 1))
        std = (self.m2 / (c - 1)).sqrt() if bool((self.count > 1).all()) else torch.full_like(self.mean, float("nan"))
        return self.mean.float(), std.float()


def load(path: str | Path, device: str | torch.device = "cpu", prior=None, operator=None) -> PosteriorSampler:
    """Load a trained flow checkpoint folder (what train.py writes), or a hub id `owner/name`, as a PosteriorSampler.

    prior (a folder or DiffusersPrior) and operator (an Operator) are optional and only checked: they
    must be the ones the flow was trained for (ApsError otherwise). An image checkpoint's prior is loaded
    only when something asks for it; the operator is rebuilt from the checkpoint's config.
    """
    from .hub import local_folder

    path = local_folder(path)  # a folder, or a hub id's cached snapshot
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
