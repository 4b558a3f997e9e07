"""A neural-network operator: the measurement is the class label that a small frozen CNN gives the image.

p(y | x) = softmax(f(x))_y, categorical, with f a ~20k-parameter MNIST classifier (SmallCNN) shipped in
checkpoints/mnist-classifier/ (model.safetensors + config.json, trained by scripts/train_classifier.py).
There is no Gaussian noise: sigma_y is None, and the likelihood is the classifier's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ApsError
from .base import register
from .image import ImageOperator

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "checkpoints" / "mnist-classifier"
FORMAT_VERSION = 1


class SmallCNN(nn.Module):
    """Three 3x3 conv stages (SiLU, 2x2 average pooling) and a linear head: (B, C, H, W) -> logits (B, n_classes).

    SiLU and average pooling rather than ReLU and max pooling: the operator is differentiated in x,
    and smooth gradients are easier for a flow or a guided sampler to follow.
    """

    def __init__(self, image_shape=(1, 32, 32), widths=(16, 32, 32), n_classes: int = 10):
        super().__init__()
        c, h, w = image_shape
        layers = []
        for width in widths:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * h * w, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def load_classifier(path=None) -> tuple[SmallCNN, dict]:
    """The frozen SmallCNN (eval, no grad) and its config.json from a folder (default checkpoints/mnist-classifier)."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DEFAULT_PATH
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not (cfg_file.is_file() and weights.is_file()):
        raise ApsError(f"classifier: no config.json + model.safetensors in {str(folder)!r}; "
                       "train one with `python scripts/train_classifier.py` or pass path=")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format_version") != FORMAT_VERSION or cfg.get("architecture") != "SmallCNN":
        raise ApsError(f"classifier: {str(cfg_file)!r} is not a SmallCNN checkpoint of format {FORMAT_VERSION}")
    net = SmallCNN(cfg["image_shape"], cfg["widths"], cfg["n_classes"])
    try:
        net.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise ApsError(f"classifier: weights in {str(weights)!r} do not match config.json: {err}") from None
    return net.eval().requires_grad_(False), cfg


@register("classifier")
class Classifier(ImageOperator):
    """y = a class label drawn from softmax(f(x)), f a frozen CNN: x (B, C, H, W) -> y (B,) int64.

    forward(x) gives the logits (B, n_classes); log_likelihood(y, x) = log_softmax(f(x))[y], (B,).
    measure_mode "sample" draws y from the softmax with the generator; "argmax" takes the top class.
    y may be given as int64 or as float holding whole numbers.
    """

    def __init__(self, image_shape=(1, 32, 32), path=None, measure_mode: str = "sample", sigma_y=None):
        if sigma_y is not None:
            raise ApsError("classifier: sigma_y has no meaning for a classifier likelihood; leave it unset")
        super().__init__(image_shape, None)
        if measure_mode not in ("sample", "argmax"):
            raise ApsError(f"classifier: measure_mode must be 'sample' or 'argmax', got {measure_mode!r}")
        self.net, cfg = load_classifier(path)
        if tuple(cfg["image_shape"]) != self.x_shape:
            raise ApsError(f"classifier: the checkpoint was trained on images {tuple(cfg['image_shape'])}, "
                           f"not {self.x_shape}")
        self.n_classes, self.measure_mode = int(cfg["n_classes"]), measure_mode
        self.y_shape = ()
        self.hparams = {"path": None if path is None else str(path), "measure_mode": measure_mode}

    def train(self, mode: bool = True):
        # The classifier is frozen: a parent module's .train() must not switch it out of eval.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x):
        """Logits f(x): (B, C, H, W) -> (B, n_classes)."""
        return self.net(self._shape("x", x, self.x_shape))

    def labels(self, y) -> torch.Tensor:
        """y as int64 labels (B,), checked to be whole class indices."""
        y = self._shape("the measurement y", torch.as_tensor(y), ())
        if y.is_floating_point():
            if not (torch.isfinite(y).all() and (y == y.round()).all()):
                raise ApsError("classifier: y must hold whole class indices, got non-integer or NaN values")
            y = y.round().long()
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise ApsError(f"classifier: class labels must be in 0..{self.n_classes - 1}, "
                           f"got {y.min().item()}..{y.max().item()}")
        return y.long()

    def check_y(self, y):
        return self.labels(y)

    def log_likelihood(self, y, x):
        """log p(y | x) = log_softmax(f(x))[y], (B,). y is not range-checked here (that would sync the GPU
        on every training step): check it once with check_y."""
        y = self._shape("the measurement y", torch.as_tensor(y), ())
        y = (y.round() if y.is_floating_point() else y).long().to(x.device)
        return F.log_softmax(self(x), 1).gather(1, y[:, None]).squeeze(1)

    def measure(self, x, generator=None):
        """A label per image, (B,) int64: drawn from softmax(f(x)) ("sample") or its argmax ("argmax")."""
        logits = self(self.check_x(x))
        if self.measure_mode == "argmax":
            return logits.argmax(1)
        return torch.multinomial(F.softmax(logits.float(), 1), 1, generator=generator).squeeze(1)
