"""Scoring an image posterior sampler on held-out measurements, and timing it.

Quality, per measurement, from n posterior samples x_1..x_n of q(x | y) against the truth x*:
    psnr_mean / ssim_mean      of the posterior mean (the MMSE estimate) vs x*
    psnr_sample / ssim_sample  of single samples vs x* (averaged over the first `n_single` samples)
    coverage90                 fraction of pixels of x* inside the samples' central 90% interval
                               (calibration: 0.9 for a calibrated posterior)
    coverage90_<region>        the same on pixel sets chosen from y alone (stroke, background; unobserved,
                               observed for a mask), where a calibrated posterior also covers 0.9: the
                               aggregate can hide an over-confident region (`coverage_by_region`)
    coverage90_dequantised     coverage90 of the dequantised truth x* + u, u uniform over one grey level
                               (when the sampler's task says how many levels its images have): the flows are
                               trained on dequantised images, so this is the draw they are calibrated for;
                               raw x* sits at the centre of that interval, which inflates coverage90 where
                               the posterior is nearly a point mass (MNIST's background)
    pixel_std                  mean pixelwise std of the samples (diversity)
    out_of_range               share of the samples with a pixel beyond +-1.5 (images live in [-1, 1]): the
                               flow's rare far-off samples, which pixel_std and the posterior mean feel first
    class_accuracy             for a classifier operator: how often the operator's own classifier
                               gives the samples the measured class y
    judge_accuracy             the same by a second classifier that the sampler never saw (`judge`),
                               so a sampler is not scored only by the network that guided it
Throughput: flow passes of `batch` samples for one measurement, z drawn on the device.
"""
from __future__ import annotations

import time

import torch

from .metrics import credible_interval_hits, psnr, ssim
from .tasks import dequantise

OUT_OF_RANGE = 1.5  # a sample with a pixel beyond this (the data in [-1, 1]) is counted out of range


@torch.no_grad()
def score_posterior(sampler, y: torch.Tensor, x_true: torch.Tensor, n_samples: int = 100, seed: int = 0,
                    per_pass: int = 25, n_single: int = 8, autocast_dtype=None, judge=None) -> dict:
    """Per-measurement metrics (each a (B,) tensor) for y (B, *y_shape) and x_true (B, C, H, W).

    Samples are drawn per_pass measurements at a time with the sampler's per-measurement seeding
    (measurement i uses seed and i), so results do not depend on per_pass. judge: for a classifier
    operator, another classifier (a module giving logits) for judge_accuracy.
    """
    out: dict[str, list] = {}
    levels = getattr(getattr(sampler, "task", None), "levels", None)  # grey levels of the training images
    for start in range(0, len(y), per_pass):
        yb, xb = y[start:start + per_pass], x_true[start:start + per_pass]
        x, _ = sampler.sample(yb, n_samples, seed=seed, first_index=start, chunk=per_pass * n_samples,
                              autocast_dtype=autocast_dtype)
        row = score_image_samples(x, xb, yb, sampler.operator, n_single, levels, seed, start, judge)
        for key, v in row.items():
            out.setdefault(key, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def score_image_samples(x: torch.Tensor, x_true: torch.Tensor, y: torch.Tensor, operator, n_single: int = 8,
                        levels: int | None = None, seed: int = 0, first_index: int = 0, judge=None) -> dict:
    """The metrics of the module docstring, each a (B,) float64 tensor, for samples x (B, n, C, H, W) of any
    sampler against x_true (B, C, H, W). levels: grey levels of the training images (for coverage90_dequantised,
    the truth dequantised with the seed of image first_index + i); judge: a second classifier (classifiers only)."""
    op = operator
    if min(x_true.shape[-2:]) < 11:  # SSIM's 11x11 window does not fit: report NaN rather than fail
        ssim_ = lambda a, b: torch.full((len(a),), float("nan"), dtype=torch.float64)  # noqa: E731
    else:
        ssim_ = ssim
    is_class = tuple(op.y_shape) == () and hasattr(op, "n_classes")
    device = x.device
    x, xb = x.float().cpu(), x_true.float().cpu()  # (b, n, C, H, W), (b, C, H, W)
    n_samples = x.shape[1]
    mean, std = x.mean(1), x.std(1) if n_samples > 1 else torch.zeros_like(x[:, 0])
    hits = credible_interval_hits(x, xb, 0.9)  # (b, P)
    k = min(n_single, n_samples)
    singles = x[:, :k].flatten(0, 1)
    truth_k = xb.repeat_interleave(k, 0)
    row = {
        "psnr_mean": psnr(mean, xb), "ssim_mean": ssim_(mean, xb),
        "psnr_sample": psnr(singles, truth_k).view(-1, k).mean(1),
        "ssim_sample": ssim_(singles, truth_k).view(-1, k).mean(1),
        "coverage90": hits.double().mean(1),
        # the same on pixel sets chosen from y alone (NaN where an image has none): see coverage_by_region
        **{f"coverage90_{name}": (hits & m).sum(1) / m.sum(1).double() for name, m in pixel_regions(x, op).items()},
        "pixel_std": std.flatten(1).mean(1).double(),
        "out_of_range": (x.flatten(2).abs().amax(2) > OUT_OF_RANGE).double().mean(1),
    }
    if levels:  # the truth dequantised as the training images are, seeded per image (seed, i)
        xd = torch.stack([dequantise(xi, levels, torch.Generator().manual_seed(seed * 1_000_003 + first_index + j))
                          for j, xi in enumerate(xb)])
        row["coverage90_dequantised"] = credible_interval_hits(x, xd, 0.9).double().mean(1)
    if is_class:
        x_dev, labels = x.flatten(0, 1).to(device), op.labels(y).cpu()[:, None]

        def accuracy(net):  # fraction of each y's samples that `net` puts in class y, (b,)
            return (net(x_dev).float().argmax(1).cpu().view(len(y), n_samples) == labels).double().mean(1)

        row["class_accuracy"] = accuracy(op)
        if judge is not None:
            row["judge_accuracy"] = accuracy(judge)
    return {key: v.double().cpu() for key, v in row.items()}


@torch.no_grad()
def classifier_features(net, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Features of images x (N, C, H, W) for a Frechet distance: a SmallCNN's last conv stage averaged over
    space, (N, channels) float64 (the pooled features the way FID pools Inception's; a few dozen dimensions, so
    a few hundred images estimate their covariance)."""
    param = next(net.parameters())
    out = [net.features(x[i:i + batch].to(param.device, param.dtype)).mean((-2, -1)).double().cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out)


def pixel_regions(samples: torch.Tensor, operator=None, stroke_threshold: float = -0.9) -> dict:
    """Pixel sets chosen from y alone, each (B, P) bool: "stroke" = pixels whose posterior mean (a function of y,
    through the sampler) exceeds `stroke_threshold` (MNIST: ink is > -1), "background" = the rest; for a fixed-mask
    operator also "observed" / "unobserved". samples (B, n, C, H, W)."""
    stroke = samples.flatten(2).double().mean(1) > stroke_threshold
    regions = {"stroke": stroke, "background": ~stroke}
    mask = getattr(operator, "mask", None)
    if mask is not None and mask.shape[-2:] == samples.shape[-2:]:
        seen = mask.to(torch.bool).cpu().expand(samples.shape[2:]).flatten()[None].expand_as(stroke)
        regions.update(observed=seen, unobserved=~seen)
    return regions


def coverage_by_region(samples: torch.Tensor, truth: torch.Tensor, operator=None, level: float = 0.9) -> dict:
    """Pixel coverage of the central `level` interval, over all pixels and over the regions of `pixel_regions`.

    A calibrated posterior covers `level` of the truth on ANY set of pixels chosen from y (not from the truth), so
    the aggregate can hide a region that is over-confident behind one that is too wide.
    samples (B, n, C, H, W), truth (B, C, H, W) -> {region: (coverage, fraction of pixels)}, pooled over the batch.
    """
    inside = credible_interval_hits(samples, truth, level)
    regions = {"all": torch.ones_like(inside), **pixel_regions(samples, operator)}
    return {name: (float(inside[m].double().mean()) if m.any() else float("nan"), float(m.double().mean()))
            for name, m in regions.items()}


def summarize_scores(scores: dict) -> dict:
    """Mean and standard error of each per-measurement metric (NaNs, e.g. an empty region, left out)."""
    out = {}
    for k, v in scores.items():
        v = v[~torch.isnan(v)]
        out[k] = {"mean": float(v.mean()) if len(v) else float("nan"),
                  "sem": float(v.std() / len(v) ** 0.5) if len(v) > 1 else 0.0}
    return out


@torch.no_grad()
def throughput(flow, y: torch.Tensor, batch: int, autocast_dtype=None, repeats: int = 10, warmup: int = 3) -> dict:
    """Samples per second of one flow pass of `batch` latents for one measurement y (1, *y_shape).

    z is drawn on the device (what a user gets from aps.load(...).flow); the seeded sampler's CPU latents
    are not counted. Returns {"batch", "seconds_per_pass" (median), "samples_per_s"}.
    """
    device = next(flow.parameters()).device
    y = y[:1].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        z = torch.randn(batch, *flow.event_shape, device=device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            x, _ = flow(z, y)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    return {"batch": batch, "seconds_per_pass": sec, "samples_per_s": batch / sec}
