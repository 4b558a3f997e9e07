"""What one flow is trained for (a "task"): a frozen prior, an operator, a source of clean x and the flow.

The training loop (aps.training) and the sampler (aps.sampling) see only this interface, so mixtures
and images share one loop:

    task.prior, task.operator      frozen modules (moved with task.to(device))
    task.sample_x(n)               clean x (n, *event_shape) from which y = operator.measure(x) is made
    task.sample_y(n)               measurements without ground truth for the APS term, or None (y from x)
    task.make_flow(cfg)            a fresh conditional flow for this prior and operator
    task.attach(flow)              runtime-only pieces of a flow that are not saved (A^T y for the encoder)
    task.config()                  the "task" dict stored in the checkpoint; `load_task` reads it back
    task.save(folder)              files the task dict refers to (the mixture problem)

An image task records the prior (path and a fingerprint of its weights) and the operator's config;
loading a checkpoint with another prior or operator is an ApsError.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import ApsError

PROBLEM_FILE = "problem.safetensors"
REPO_ROOT = Path(__file__).resolve().parents[1]


class MixtureTask:
    """An exact Gaussian-mixture problem: x comes from the prior itself; flow = ConditionalVectorFlow."""

    kind = "mixture"

    def __init__(self, problem):
        self.problem, self.prior, self.operator = problem, problem.prior, problem.operator

    def to(self, device):
        self.prior, self.operator = self.prior.to(device), self.operator.to(device)
        return self

    def sample_x(self, n: int) -> torch.Tensor:
        """(n, d) prior samples, on the prior's device."""
        return self.prior.sample(n)

    def make_flow(self, cfg):
        """A vector flow whose Gaussian frame is fitted to the prior's moments and the operator."""
        from .flows.vector import ConditionalVectorFlow

        d, dy = self.prior.dim, self.operator.y_shape[0]
        flow = ConditionalVectorFlow(d, dy, n_layers=cfg.flow_layers, hidden=cfg.flow_hidden,
                                     num_blocks=cfg.flow_blocks, bins=cfg.flow_bins, tail_bound=cfg.flow_tail_bound,
                                     base_components=cfg.flow_base_components, fourier=cfg.flow_fourier,
                                     fourier_scale=cfg.flow_fourier_scale, base_gate=cfg.flow_base_gate,
                                     base_cov=cfg.flow_base_cov)
        mean, cov = self.prior.moments()
        scale, gain = None, None
        if cfg.flow_frame == "component":
            scale = self.prior.component_posterior_cov(self.operator)
        elif cfg.flow_frame == "conditioned":
            gain, scale = self.prior.component_posterior_frame(self.operator)
        flow.frame.fit(mean, cov, self.operator.matrix(), self.operator.sigma_y, scale_cov=scale, gain=gain)
        if flow.mixture_base is not None:
            # fitted to prior draws taken back through the flow for their own measurements (k-means; with the
            # gate, EM on the joint (z, y)): what any prior offers (samples), not the exact mixture's components
            # the diagonal base estimates K means of d numbers each: more draws at high d (its EM is O(N K d))
            n_fit = 16384 if cfg.flow_base_cov == "full" else max(16384, 64 * d)
            x = self.prior.sample(n_fit).to(flow.frame.L.dtype)
            flow.fit_base(x, self.operator.measure(x))
        return flow

    def sample_y(self, n: int):
        return None

    def attach(self, flow):
        return flow

    def config(self) -> dict:
        return {"kind": self.kind, "problem": PROBLEM_FILE}

    def save(self, folder) -> None:
        self.problem.save(Path(folder) / PROBLEM_FILE)

    def preview(self, flow):
        return None  # no picture of a d-dimensional posterior


def y_kind(operator) -> str:
    """The ConditionalGlow y_kind for an operator's y_shape: class (), vector (m,), image (Cy, H, W) or small_image."""
    ys, xs = tuple(operator.y_shape), tuple(operator.x_shape)
    if ys in ((), (1,)) and hasattr(operator, "n_classes"):
        return "class"
    if len(ys) == 1:
        return "vector"
    if len(ys) == 3 and ys[1:] == xs[1:]:
        return "image"
    if len(ys) == 3:
        return "small_image"
    raise ApsError(f"{operator.name}: no flow conditioning for measurements of shape {ys}")


def prior_fingerprint(prior) -> str:
    """sha256 (16 hex digits) of the prior network's weights: names the prior whatever folder it sits in."""
    h = hashlib.sha256()
    for name, value in sorted(prior.unet.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_images(data: str, event_shape) -> torch.Tensor:
    """The TRAINING split of a named image set, (N, *event_shape) in [-1, 1] (the held-out split is never used)."""
    from .data import load_digits8, load_image_folder, load_mnist

    c, h, w = event_shape
    if data == "mnist":
        x = load_mnist("train", size=h)
    elif data == "digits8":
        x = load_digits8("train")
    else:
        x = load_image_folder(data, size=h, channels=c)
    if tuple(x.shape[1:]) != tuple(event_shape):
        raise ApsError(f"--data {data}: images are {tuple(x.shape[1:])} but the prior models {tuple(event_shape)}")
    return x


def heldout_images(data: str, event_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(held-out images (N, *event_shape), their labels (N,) or None) of a named image set, for evaluation only."""
    from .data import load_digits8, load_digits8_labels, load_mnist, load_mnist_labels

    if data == "mnist":
        return load_mnist("test", size=event_shape[1]), load_mnist_labels("test")
    if data == "digits8":
        return load_digits8("test"), load_digits8_labels("test")
    if data == "prior":
        raise ApsError("a flow trained on prior samples has no held-out images of its own: name a data set "
                       "(e.g. --heldout-data mnist)")
    raise ApsError(f"the data set {data!r} has no held-out split (only mnist and digits8 have one)")


def _normalised(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg))


def dequantise(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images on a grid of `levels` values in [-1, 1] -> x + u, u ~ U(-1/2, 1/2) of one grey level per pixel
    (uniform dequantisation, Theis et al. 2016): what the image flows are trained on, and so the truth they are
    calibrated for (aps.evaluate_images' coverage90_dequantised)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 0.5
    return x + u * (2.0 / (levels - 1))


class ImageTask:
    """A diffusers image prior, an image operator built for its image shape, and training images.

    Args:
        prior: a DiffusersPrior (frozen).
        operator: an ImageOperator with x_shape == prior.event_shape.
        data: the data set's name (mnist, digits8, a folder, or prior) for the checkpoint and held-out evaluation.
        images: (N, *event_shape) clean training images, or None for sampling only.
        bank: with data "prior": the record of the prior bank the images are (aps.prior_bank), saved in config().
        measurements: (M, *y_shape) measurements without ground truth for the APS term (the paper's protocol),
            or None: the APS term then sees y = A(x) + noise of the images. `measurements_record` names them.
        bank_images, prior_frac: images drawn from the prior (8-bit), of which round(prior_frac * n) rows of
            every n-image batch of `sample_x` are drawn, the others from `images` (--prior-frac).
    """

    kind = "image"

    def __init__(self, prior, operator, data: str = "mnist", images: torch.Tensor | None = None,
                 bank: dict | None = None, measurements: torch.Tensor | None = None,
                 measurements_record: dict | None = None, bank_images: torch.Tensor | None = None,
                 prior_frac: float = 0.0):
        if prior.event_shape is not None and tuple(operator.x_shape) != tuple(prior.event_shape):
            raise ApsError(f"operator {operator.name} works on images {tuple(operator.x_shape)} "
                           f"but the prior models {tuple(prior.event_shape)}")
        self.prior, self.operator, self.data, self.images = prior, operator, data, images
        self.bank, self.measurements, self.measurements_record = bank, measurements, measurements_record
        if (bank_images is None) != (prior_frac == 0):
            raise ApsError("ImageTask: bank_images and a prior_frac > 0 go together")
        self.bank_images, self.prior_frac = bank_images, prior_frac
        self._fingerprint = None
        self._preview_y = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = prior_fingerprint(self.prior)
        return self._fingerprint

    def to(self, device):
        self.prior, self.operator = self.prior.to(device), self.operator.to(device)
        if self.images is not None:
            self.images = self.images.to(device)
        if self.bank_images is not None:
            self.bank_images = self.bank_images.to(device)
        if self.measurements is not None:
            self.measurements = self.measurements.to(device)
        return self

    @property
    def levels(self) -> int:
        """Quantisation levels of the training images: sklearn's 8x8 digits have 17 (0..16), 8-bit images 256."""
        return 17 if self.data == "digits8" else 256

    def sample_x(self, n: int) -> torch.Tensor:
        """n training images drawn with replacement and dequantised, (n, C, H, W), on the images' device.

        Uniform dequantisation (x + u, u ~ U(-1/2, 1/2) of one grey level; Theis et al. 2016): the
        images sit on a grid (MNIST's background is exactly -1), so -log q(x | y) of the forward-KL term
        on raw pairs is unbounded below: a flow can pile density on the grid values, and did (the first
        image flows trained without it shrank to a pixel std of 0.02 with 80% coverage; the classifier flow
        with forward-KL weight 10 collapsed to one image). Dequantised pairs have a density.
        """
        if self.images is None:
            raise ApsError("this task has no clean images (measurements only): the forward-KL term needs --data prior")
        n_bank = round(self.prior_frac * n)  # a fixed split keeps the step's shapes static (CUDA graphs)
        idx = torch.randint(len(self.images), (n - n_bank,), device=self.images.device)
        x = dequantise(self.images[idx], self.levels)
        if n_bank:
            idx = torch.randint(len(self.bank_images), (n_bank,), device=self.bank_images.device)
            x = torch.cat([x, dequantise(self.bank_images[idx], 256)])
        return x

    def sample_y(self, n: int) -> torch.Tensor | None:
        """n of the given measurements, drawn with replacement, (n, *y_shape); None without --measurements."""
        if self.measurements is None:
            return None
        idx = torch.randint(len(self.measurements), (n,), device=self.measurements.device)
        return self.measurements[idx]

    def make_flow(self, cfg):
        """A ConditionalGlow with the y_kind of the operator (and A^T y as an extra input with --backprojection)."""
        from .flows.image import ConditionalGlow

        extra = 0
        if cfg.backprojection:
            if not hasattr(self.operator, "adjoint"):
                raise ApsError(f"--backprojection needs a linear operator with an adjoint; {self.operator.name} has none")
            extra = self.operator.x_shape[0]
        template = cfg.class_template and y_kind(self.operator) == "class"
        flow = ConditionalGlow(self.operator.x_shape, self.operator.y_shape, y_kind(self.operator),
                               levels=cfg.glow_levels, steps_per_level=cfg.glow_steps, hidden_channels=cfg.glow_hidden,
                               cond_channels=cfg.glow_cond, clamp=cfg.glow_clamp,
                               n_classes=getattr(self.operator, "n_classes", 10), extra_channels=extra,
                               class_template=template, encoder_blocks=cfg.glow_enc_blocks,
                               coupling_blocks=cfg.glow_blocks, attention_levels=cfg.glow_attention,
                               tarflow_blocks=cfg.glow_tarflow, tarflow_width=cfg.glow_tarflow_width,
                               tarflow_layers=cfg.glow_tarflow_layers)
        if template and self.images is not None:
            flow.init_class_template(*self.class_statistics())
        return self.attach(flow)

    @torch.no_grad()
    def class_statistics(self, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (n_classes, C, H, W) of the training images of each class, as the operator labels them.

        The labels are the operator's own most likely class (its classifier's argmax), so the statistics
        belong to the likelihood the flow is trained for, whatever data set the images come from. A class
        with fewer than two images gets the overall mean and std.
        """
        op = self.operator
        labels = torch.cat([op(self.images[i:i + chunk]).argmax(1) for i in range(0, len(self.images), chunk)])
        x = self.images.float()
        mean = x.mean(0, keepdim=True).repeat(op.n_classes, 1, 1, 1)
        std = x.std(0, keepdim=True).repeat(op.n_classes, 1, 1, 1)
        for c in range(op.n_classes):
            xc = x[labels == c]
            if len(xc) >= 2:
                mean[c], std[c] = xc.mean(0), xc.std(0)
        return mean, std

    def attach(self, flow):
        """Give the flow A^T y when it was built to take it (a callable, not saved with the weights)."""
        if getattr(flow, "extra_channels", 0):
            flow.backprojection = self.operator.adjoint
        return flow

    def config(self) -> dict:
        cfg = {"kind": self.kind, "prior": {**self.prior.config(), "fingerprint": self.fingerprint},
               "operator": _normalised(self.operator.config()), "data": self.data}
        if self.bank is not None:
            cfg["prior_bank"] = dict(self.bank)
        if self.prior_frac:
            cfg["prior_frac"] = self.prior_frac
        if self.measurements_record is not None:
            cfg["measurements"] = dict(self.measurements_record)
        return cfg

    def save(self, folder) -> None:
        pass  # everything is in config(): the prior is named, the operator rebuilt from its config

    @torch.no_grad()
    def preview(self, flow, n_y: int = 8, n_samples: int = 6, seed: int = 0):
        """A uint8 grid (rows: measurement, samples, mean of 16, truth) for n_y fixed training measurements."""
        from .image_grid import posterior_grid

        if self._preview_y is None and self.images is None:  # measurements only: no truth to show
            g = torch.Generator().manual_seed(seed)
            idx = torch.randint(len(self.measurements), (n_y,), generator=g)
            self._preview_y = (None, self.measurements[idx.to(self.measurements.device)].cpu())
        if self._preview_y is None:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randint(len(self.images), (n_y,), generator=g)
            x = self.images[idx.to(self.images.device)].cpu()
            self._preview_y = (x, self.operator.cpu().measure(x, generator=g))
            self.operator.to(self.images.device)
        x, y = self._preview_y
        device = next(flow.parameters()).device
        samples, _ = flow.sample(y.to(device), 16)
        return posterior_grid(self.operator, y, samples.float().cpu(), x, n_show=n_samples)


def make_task(cfg, with_data: bool = True, device=None):
    """The task a TrainConfig names: a mixture problem, or --prior + --operator (+ --data, --measurements) for images.

    --data prior draws the images from the prior on `device` (or reads them from the bank cache); with
    --measurements and no forward-KL term, no images are loaded at all.
    """
    if not cfg.is_image:
        from .problems import load_problem, make_mcgdiff

        if cfg.problem:
            return MixtureTask(load_problem(cfg.problem))
        return MixtureTask(make_mcgdiff(cfg.mcgdiff))
    from .operators import build
    from .priors import DiffusersPrior

    prior = DiffusersPrior.from_pretrained(cfg.prior, gradient_checkpointing=cfg.prior_gradient_checkpointing)
    operator = build(cfg.operator, image_shape=prior.event_shape, **cfg.operator_args())
    measurements, record = (load_measurements(cfg.measurements, operator) if cfg.measurements else (None, None))
    images, bank, bank_images = None, None, None
    if with_data and (measurements is None or cfg.fkl_weight > 0):
        drawn = None
        if cfg.data == "prior" or cfg.prior_frac > 0:
            from .prior_bank import prior_bank, to_float

            uint8, bank = prior_bank(prior, cfg.prior_bank, sampler=cfg.prior_sampler, steps=cfg.prior_steps,
                                     seed=0, batch=cfg.prior_batch, device=device, cache_dir=cfg.prior_cache or None)
            drawn = to_float(uint8)
        images = drawn if cfg.data == "prior" else load_images(cfg.data, prior.event_shape)
        bank_images = drawn if cfg.prior_frac > 0 else None
    return ImageTask(prior, operator, cfg.data, images, bank=bank, measurements=measurements,
                     measurements_record=record, bank_images=bank_images,
                     prior_frac=cfg.prior_frac if bank_images is not None else 0.0)  # no data loaded: no mix


def load_measurements(path: str, operator) -> tuple[torch.Tensor, dict]:
    """The 'y' (N, *y_shape) of a tensor file, checked against the operator, and a record {path, n, sha256}."""
    from .io import read_tensors

    tensors = read_tensors(path)
    if "y" not in tensors:
        raise ApsError(f"--measurements {path}: no array named 'y' (it has: {', '.join(tensors) or 'none'})")
    y = tensors["y"]
    y = y.float() if y.is_floating_point() else y  # class labels stay integers
    if len(y) < 1:
        raise ApsError(f"--measurements {path}: 'y' holds no measurements")
    y = operator.check_y(y)
    digest = hashlib.sha256(y.contiguous().numpy().tobytes()).hexdigest()[:16]
    return y, {"path": str(path), "n": len(y), "sha256": digest}


def _find_prior(path: str) -> str:
    """The recorded prior path as given, or relative to the repository root (checkpoints/mnist-prior from anywhere)."""
    if Path(path).expanduser().is_dir():
        return path
    alt = REPO_ROOT / path
    if not Path(path).is_absolute() and alt.is_dir():
        return str(alt)
    return path


def load_task(folder, task: dict, prior=None, operator=None):
    """The task of a checkpoint folder from its stored dict; prior/operator given by the caller must match it.

    prior: None (use the recorded path), a folder, or a DiffusersPrior; operator: None, or an Operator.
    Raises ApsError (one line) if they are not the ones the flow was trained for.
    """
    folder = Path(folder)
    kind = task.get("kind")
    if kind == "mixture":
        if prior is not None or operator is not None:
            raise ApsError(f"{folder}: a mixture checkpoint carries its own prior and operator; pass neither")
        from .problems import load_problem
        return MixtureTask(load_problem(folder / task["problem"]))
    if kind != "image":
        raise ApsError(f"{folder}: unknown task kind {kind!r}")
    from .operators import build
    from .priors import DiffusersPrior

    saved_op = task["operator"]
    if operator is None:
        operator = build(**saved_op)
    elif _normalised(operator.config()) != saved_op:
        raise ApsError(f"{folder} was trained for the operator {_describe(saved_op)}, not {_describe(operator.config())}")
    if prior is None:
        prior = _LazyPrior(task["prior"])
    else:
        if not isinstance(prior, DiffusersPrior):
            prior = DiffusersPrior.from_pretrained(prior)
        want = task["prior"].get("fingerprint")
        if want and prior_fingerprint(prior) != want:
            raise ApsError(f"{folder} was trained with the prior {task['prior'].get('path')!r} (weights {want}), "
                           f"not {prior.path!r} (weights {prior_fingerprint(prior)})")
    return ImageTask(prior, operator, task.get("data", "mnist"))


def _describe(op_cfg: dict) -> str:
    return op_cfg.get("name", "?") + "(" + ", ".join(f"{k}={v}" for k, v in op_cfg.items() if k != "name") + ")"


class _LazyPrior:
    """Stands in for the recorded prior until something needs its network (sampling needs only the flow)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self._prior = None

    def load(self):
        if self._prior is None:
            from .priors import DiffusersPrior

            prior = DiffusersPrior.from_pretrained(_find_prior(self.cfg["path"]))
            want = self.cfg.get("fingerprint")
            if want and prior_fingerprint(prior) != want:
                raise ApsError(f"the prior in {self.cfg['path']!r} is not the one the flow was trained with "
                               f"(weights {prior_fingerprint(prior)}, expected {want})")
            self._prior = prior
        return self._prior

    @property
    def event_shape(self):
        return None  # unknown until loaded; ImageTask only compares when both are known

    def to(self, device):
        return self if self._prior is None else self._prior.to(device)

    def __getattr__(self, name):
        return getattr(self.load(), name)
