"""Clean images drawn from a diffusion prior itself: training data for a user who has only the prior.

    images = prior_bank(prior, 20000, sampler="ddim", steps=100, device="cuda")  # (20000, C, H, W) uint8

Image i starts from noise of its own generator, seeded with (seed, i), so the first n images of a bank do
not depend on n, the batch size or the device: a cached bank of N images serves any n <= N, and a larger
request draws only images N..n-1 (an interrupted draw resumes from its last save). Images are kept as
uint8, as a pipeline saves them (8-bit), and trained on dequantised like any 8-bit image set.

A bank is cached as one safetensors file per key, the key naming the prior (its weight fingerprint, UNet
config and scheduler config) and the sampler settings; the file's header repeats the key and holds a sha256
of the images, so a file of another prior, settings or format, or a damaged one, is found out and redrawn.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

from .errors import ApsError

FORMAT = "aps-prior-bank-1"
SAVE_EVERY = 60.0  # seconds between saves of a bank being drawn


def default_cache() -> Path:
    """$XDG_CACHE_HOME/aps/prior-banks (default ~/.cache/aps/prior-banks)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aps" / "prior-banks"


def bank_key(prior, sampler: str, steps: int, seed: int) -> str:
    """sha256 (16 hex digits) of what the images depend on: the prior's weights and configs, sampler, steps, seed."""
    from .tasks import prior_fingerprint

    spec = {"format": FORMAT, "weights": prior_fingerprint(prior), "unet": dict(prior.unet.config),
            "scheduler": dict(prior.scheduler.config), "sampler": sampler, "steps": int(steps), "seed": int(seed)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 0..255 (rounded, as an 8-bit image file would hold them)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def read_bank(path: Path, key: str, event_shape) -> torch.Tensor | None:
    """The images of a cache file if it is a sound bank of this key, else None (with a warning saying why)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images = f.get_tensor("images")
    except Exception as err:  # truncated, not safetensors, no 'images': any unreadable file is redrawn
        reason = f"unreadable ({type(err).__name__})"
    else:
        if meta.get("format") != FORMAT or meta.get("key") != key:
            reason = f"made for another prior or sampler (key {meta.get('key')!r}, expected {key!r})"
        elif images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(event_shape):
            reason = f"images of dtype {images.dtype} and shape {tuple(images.shape)}"
        elif meta.get("sha256") != _digest(images):
            reason = "its images do not match their checksum"
        else:
            return images
    warnings.warn(f"prior bank {path}: {reason}; drawing it again", stacklevel=3)
    return None


def write_bank(path: Path, images: torch.Tensor, key: str, info: dict) -> None:
    """Write atomically (a temporary file renamed), so an interrupted write leaves no half-written bank."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "key": key, "sha256": _digest(images), **{k: str(v) for k, v in info.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"images": images.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


@torch.no_grad()
def draw(prior, start: int, stop: int, sampler: str, steps: int, seed: int, batch: int):
    """Images start..stop-1 of the stream (seed), drawn on the prior's device in batches of `batch`: yields each
    batch as uint8 (b, C, H, W) on the CPU."""
    for lo in range(start, stop, batch):
        hi = min(stop, lo + batch)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(lo, hi)]
        x = prior.sample(hi - lo, generator=gens, num_inference_steps=steps, sampler=sampler)
        yield to_uint8(x).cpu()


def prior_bank(prior, n: int, sampler: str = "ddim", steps: int = 100, seed: int = 0, batch: int = 500,
               device=None, cache_dir=None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """n images of the prior, uint8 (n, C, H, W) on the CPU, from the cache or drawn (and cached), and a record
    {sampler, steps, seed, n, key} of them for the checkpoint.

    prior: a DiffusersPrior; sampler: ddpm or ddim; steps: the scheduler's inference steps; device: where to
    draw (default: the prior's); cache_dir: default `default_cache()`.
    """
    from .priors.diffusers_prior import SAMPLERS

    if sampler not in SAMPLERS:
        raise ApsError(f"--prior-sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if n < 1 or steps < 1 or batch < 1:
        raise ApsError(f"a prior bank needs n, steps and batch >= 1, got {n}, {steps}, {batch}")
    key = bank_key(prior, sampler, steps, seed)
    path = Path(cache_dir or default_cache()) / f"{key}.safetensors"
    info = {"sampler": sampler, "steps": int(steps), "seed": int(seed), "key": key}
    images = read_bank(path, key, prior.event_shape)
    parts = [] if images is None else [images]
    have = 0 if images is None else len(images)
    if have < n:
        from tqdm.auto import tqdm

        home = next(prior.unet.parameters()).device
        prior.to(device or home)
        saved = time.monotonic()
        with tqdm(total=n - have, desc=f"drawing prior images ({sampler}, {steps} steps)", unit="img",
                  disable=not progress) as bar:
            for new in draw(prior, have, n, sampler, steps, seed, batch):
                parts.append(new)
                have += len(new)
                bar.update(len(new))
                if have == n or time.monotonic() - saved > SAVE_EVERY:  # an interrupted draw resumes from here
                    parts = [torch.cat(parts)]
                    write_bank(path, parts[0], key, {**info, "n": have})
                    saved = time.monotonic()
        prior.to(home)
    return torch.cat(parts)[:n], {**info, "n": int(n)}
