"""Checks of a trained image prior: sample grids, a memorisation test and the ELBO in bits/dim.

Bits/dim of 8-bit images under a prior on x in [-1, 1] (x = p / 127.5 - 1 for pixel values p in 0..255):
dequantise with u ~ U(-1/2, 1/2), v = p + u (continuous, in [-1/2, 255.5)), x = v / 127.5 - 1. The change of
variables x -> v has Jacobian (1/127.5)^D, so

    -log p_v(v) = -log p_x(x) + D log 127.5 <= ELBO_x(x) + D log 127.5,

and -log P(p) <= E_u[-log p_v(p + u)] (Theis et al. 2016, "A note on the evaluation of generative
models"; Ho et al. 2019, Flow++). Bits/dim = (ELBO_x + D log 127.5) / (D ln 2).
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCALE = 127.5  # x = p / SCALE - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> integer pixel values 0..255 (as float), same shape."""
    return ((x.clamp(-1, 1) + 1) * SCALE).round()


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x on the 8-bit grid -> (p + u) / 127.5 - 1 with u ~ U(-1/2, 1/2) per pixel, same shape."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 0.5
    return (to_pixels(x) + u) / SCALE - 1


def bits_per_dim(nats: torch.Tensor, d: int) -> torch.Tensor:
    """A bound in nats on -log p(x) for x in [-1, 1]^d -> bits/dim on the 0..256 pixel scale."""
    return (nats + d * math.log(SCALE)) / (d * math.log(2))


@torch.no_grad()
def elbo_bits_per_dim(prior, x: torch.Tensor, n_draws: int = 1000, batch: int = 4096,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image dequantised ELBO in bits/dim, (N,), averaged over n_draws (t, eps, u) draws per image.

    x: (N, *event_shape) on the 8-bit grid in [-1, 1]. Each call of prior.elbo evaluates at most
    `batch` noised images; u is drawn afresh for every repeat.
    """
    per_call = max(1, min(n_draws, batch))
    repeats = math.ceil(n_draws / per_call)
    chunk = max(1, batch // per_call)
    d = x[0].numel()
    out = []
    for i in range(0, len(x), chunk):
        xi = x[i:i + chunk]
        nats = sum(prior.elbo(dequantize(xi, generator), n_draws=per_call, generator=generator)
                   for _ in range(repeats)) / repeats
        out.append(bits_per_dim(nats.double(), d))
    return torch.cat(out)


@torch.no_grad()
def nearest_distances(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1024):
    """L2 distance of each x (N, ...) to its nearest ref (M, ...): (dist (N,), index (N,))."""
    r = ref.flatten(1).double()
    dists, idx = [], []
    for i in range(0, len(x), chunk):
        dmat = torch.cdist(x[i:i + chunk].flatten(1).double(), r)  # (n, M)
        d, j = dmat.min(1)
        dists.append(d)
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


def _summary(d: torch.Tensor) -> dict:
    q = torch.quantile(d.double(), torch.tensor([0.05, 0.5], dtype=torch.float64, device=d.device))
    return {"mean": float(d.mean()), "median": float(q[1]), "p05": float(q[0]), "min": float(d.min())}


def memorisation_report(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> dict:
    """Nearest-train L2 distances of generated samples vs. of held-out test digits (all in [-1, 1]).

    A prior that memorises puts its samples much closer to training digits than unseen digits are:
    `median_ratio` (generated / test) well under 1, and `frac_below_test_p05` (share of samples nearer
    to a training digit than 95% of test digits are) well above 0.05.
    """
    d_gen, _ = nearest_distances(samples, train)
    d_test, _ = nearest_distances(test, train)
    gen, tst = _summary(d_gen), _summary(d_test)
    return {"generated_to_train": gen, "test_to_train": tst,
            "median_ratio": gen["median"] / tst["median"],
            "frac_below_test_p05": float((d_gen < tst["p05"]).double().mean()),
            "n_generated": len(samples), "n_test": len(test), "n_train": len(train)}


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 grid (rows*(H+pad)+pad, nrow*(W+pad)+pad[, C]) on a mid-grey border."""
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=np.uint8)
    pix = to_pixels(x.detach().float().cpu()).numpy().astype(np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = pix[k]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_png(array: np.ndarray, path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG."""
    from PIL import Image

    Image.fromarray(array).save(path)
