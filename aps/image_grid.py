"""Pictures of posteriors: one row per measurement, [measurement | samples | mean | std | truth], as PNG.

Images are in [-1, 1] (pixel p = (v + 1) * 127.5). The std column is scaled so that std = 0.5 is white
(std of a pixel in [-1, 1] is at most 1; 0.5 is already "anything goes"), so grids are comparable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STD_WHITE = 0.5
MAX_PIXELS = 25_000_000  # a measurement image larger than this is refused unread


def measurement_image(operator, y: torch.Tensor) -> torch.Tensor:
    """A picture of each measurement in x's shape: y (B, *y_shape) -> (B, C, H, W) in [-1, 1].

    Image y as is (inpainting: the values, missing pixels gray), small images upsampled (nearest),
    vectors through A^T (rescaled), class labels as a digit drawn on a gray tile.
    """
    c, h, w = operator.x_shape
    y = torch.as_tensor(y).detach().cpu()
    ys = tuple(operator.y_shape)
    b = y.shape[0]
    if len(ys) == 3 and ys[1:] == (h, w):
        return y[:, :c].float()
    if len(ys) == 3:
        return F.interpolate(y.float(), size=(h, w), mode="nearest")[:, :c]
    if len(ys) == 1 and hasattr(operator, "adjoint"):
        back = operator.cpu().adjoint(y.float())
        return back / back.flatten(1).abs().amax(1).clamp_min(1e-8).view(b, 1, 1, 1)
    if ys in ((), (1,)):
        return torch.stack([_label_tile(int(v), c, h, w) for v in y.reshape(b)])
    return torch.zeros(b, c, h, w)


def _label_tile(label: int, c: int, h: int, w: int) -> torch.Tensor:
    from PIL import Image, ImageDraw

    im = Image.new("L", (w, h), 64)
    draw = ImageDraw.Draw(im)
    text = str(label)
    box = draw.textbbox((0, 0), text)
    draw.text(((w - (box[2] - box[0])) / 2 - box[0], (h - (box[3] - box[1])) / 2 - box[1]), text, fill=255)
    t = torch.from_numpy(np.asarray(im, dtype=np.float32)) / 127.5 - 1.0
    return t.expand(c, h, w).clone()


def posterior_grid(operator, y, samples, x_true=None, n_show: int = 6, pad: int = 1, mean=None, std=None) -> np.ndarray:
    """uint8 grid (rows = measurements): [measurement | n_show samples | mean | std | truth].

    y (B, *y_shape), samples (B, n, C, H, W) in [-1, 1], x_true (B, C, H, W) or None; mean and std (B, C, H, W)
    of all the samples when `samples` holds only the first few (default: those of `samples`).
    Returns (rows, cols) for one channel, (rows, cols, C) otherwise.
    """
    samples = samples.detach().float().cpu()
    if mean is None:
        mean, std = samples.mean(1), samples.std(1) if samples.shape[1] > 1 else torch.zeros_like(samples[:, 0])
    mean, std = mean.float().cpu(), torch.nan_to_num(std.float().cpu())
    cols = [measurement_image(operator, y)]
    cols += [samples[:, j] for j in range(min(n_show, samples.shape[1]))]
    cols += [mean, (std / STD_WHITE).clamp(0, 1) * 2 - 1]
    if x_true is not None:
        cols.append(x_true.detach().float().cpu())
    tiles = torch.stack(cols, 1).clamp(-1, 1)  # (B, K, C, H, W)
    b, k, c, h, w = tiles.shape
    tiles = F.pad(tiles, (pad, pad, pad, pad), value=0.0)  # gray frames between tiles
    grid = tiles.permute(0, 3, 1, 4, 2).reshape(b * (h + 2 * pad), k * (w + 2 * pad), c)
    out = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return out[..., 0] if c == 1 else out


def enlarge(image: np.ndarray, tile: int, at_least: int = 128) -> np.ndarray:
    """A grid scaled up by an integer factor, nearest neighbour (pixels stay pixels), so that a tile of `tile`
    pixels (one digit) is at least `at_least` pixels wide on screen."""
    k = max(1, -(-at_least // tile))
    return image.repeat(k, axis=0).repeat(k, axis=1)


def posterior_figure(y_images, samples, x_true, path, level: float = 0.9, rows: int = 8) -> Path:
    """A figure (matplotlib; PNG, PDF or SVG by the suffix of `path`) of the first `rows` measurements, one per
    row: measurement | truth | posterior mean | std | width of the central `level` credible interval.

    y_images (B, C, H, W) pictures of y (measurement_image), samples (B, n, C, H, W), x_true (B, C, H, W) or None;
    images in [-1, 1], shown on that scale; std and interval width on a shared colour scale per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = samples[:rows].detach().float().cpu()
    lo, hi = torch.quantile(samples.flatten(2), torch.tensor([(1 - level) / 2, (1 + level) / 2]), dim=1)
    shape = samples.shape[2:]
    cols = [("measurement", y_images[:rows], "gray", (-1, 1)), ("truth", x_true, "gray", (-1, 1)),
            ("posterior mean", samples.mean(1), "gray", (-1, 1)), ("posterior std", samples.std(1), "magma", None),
            (f"{level:.0%} interval width", (hi - lo).reshape(len(samples), *shape), "magma", None)]
    cols = [c for c in cols if c[1] is not None]
    b = len(samples)
    fig, axes = plt.subplots(b, len(cols), figsize=(2.0 * len(cols) + 1, 2.0 * b), squeeze=False, layout="constrained")
    for j, (title, images, cmap, limits) in enumerate(cols):
        images = images.detach().float().cpu().mean(1)  # (B, H, W): channels averaged for the maps
        vmin, vmax = limits or (0.0, float(images.max()))
        for i in range(b):
            ax = axes[i, j]
            shown = ax.imshow(images[i].numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        if limits is None:
            fig.colorbar(shown, ax=axes[:, j].tolist(), shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_png(image: np.ndarray, path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def read_png(path, shape) -> torch.Tensor:
    """A PNG/JPEG as (C, H, W) in [-1, 1], resized to shape (C, H, W) if it differs."""
    from PIL import Image

    from .errors import ApsError

    c, h, w = shape
    if not Path(path).is_file():
        raise ApsError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:  # before decoding: a small file can hold a huge image
                raise ApsError(f"{path} is too large ({im.width} x {im.height} pixels; at most {MAX_PIXELS:,})")
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.float32).reshape(h, w, c)
    except ApsError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ApsError(f"cannot read image {str(path)!r}: {err}") from None
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0
