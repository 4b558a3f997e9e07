"""The two kinds of benchmark problem, behind one interface: held-out measurements, scores and calibration.

    target = load_target(sampler, cfg)           # MixtureTarget or ImageTarget for aps.load(checkpoint)
    x_true, y = target.measurements("test", n)   # the same y for every method; "tune" gives separate ones
    target.score(x, x_true, y, log_q)            # {"rows": per-measurement scores, "summary": means}
    target.calibration(x, x_true, y)             # expected coverage, TARP (+ SBC ranks, HPD for mixtures)

Mixtures are scored against the exact posterior (aps.evaluate: mode-weight TV, sliced Wasserstein and its
noise floor, exact KL where log q is known); images against the held-out digit (aps.evaluate_images: PSNR
and SSIM of the mean and of single samples, 90% coverage by region, class accuracy by the operator's
classifier and by a judge it never saw).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ApsError
from . import calibration as cal


class MixtureTarget:
    """A mixture checkpoint: its exact prior, operator and posterior. Test measurements are those of
    aps.evaluate.held_out_measurements (seed 12345: the first 8 are the mixture benchmark's); tuning ones
    come from another seed."""

    kind = "mixture"
    tune_key, higher_is_better = "sw", False  # sliced Wasserstein to the exact posterior: modes and their shapes
    seeds = {"test": 12345, "tune": 54321}
    defaults = {"n_measurements": 32, "n_samples": 256}

    def __init__(self, sampler, cfg):
        from ..problems import MixtureProblem

        self.problem = MixtureProblem(sampler.prior.cpu(), sampler.operator.cpu())
        self.prior, self.operator = self.problem.prior, self.problem.operator
        self.dtype = self.prior.means.dtype
        self.cfg = cfg

    @property
    def device(self):
        return torch.device("cpu")  # closed-form mixtures: CPU is the fast place (launch-bound on a GPU)

    def measurements(self, split: str, n: int):
        from ..evaluate import held_out_measurements

        x, y = held_out_measurements(self.problem, n, self.seeds[split])
        return x.to(self.dtype), y.to(self.dtype)

    @staticmethod
    def solver_output(x):
        return x

    def cm(self):
        from ..solvers.exact_cm import ExactConsistency

        return ExactConsistency(self.prior, self.cfg.cm_ode_steps)

    def score(self, x, x_true, y, log_q=None) -> dict:
        from ..evaluate import score_samples, summarize_rows

        posterior = self.prior.posterior(self.operator, y)
        rows = score_samples(posterior, x.cpu().double(), None if log_q is None else log_q.cpu().double())
        return {"rows": rows, "summary": summarize_rows(rows)}

    def calibration(self, x, x_true, y) -> dict:
        """Per-dimension coverage and SBC ranks, HPD coverage of the exact posterior density, TARP."""
        x = x.cpu().double()
        posterior = self.prior.posterior(self.operator, y)
        u = cal.ranks(x, x_true)
        hpd = cal.hpd_ranks(posterior.log_prob(x), posterior.log_prob(x_true.double()[:, None])[:, 0])
        return {"coverage": cal.expected_coverage(u), "hpd": cal.expected_coverage(hpd, central=False),
                "tarp": cal.tarp(x, x_true, seed=self.cfg.seed),
                "sbc": cal.rank_histogram(u, bins=max(4, min(20, len(u) // 4)))}  # >= 4 expected per bin

    def headline(self, summary: dict) -> tuple[str, float]:
        return "sw", summary["sw"]["mean"]


class ImageTarget:
    """An image checkpoint: its diffusers prior (for the solvers), operator and held-out digits. Test digits are
    held-out images 0..n-1 (noise seeded per digit, as sample.py --heldout); tuning digits start at cfg.tune_first."""

    kind = "image"
    defaults = {"n_measurements": 16, "n_samples": 32}

    def __init__(self, sampler, cfg):
        self.sampler, self.cfg, self.operator = sampler, cfg, sampler.operator
        self.is_class = tuple(self.operator.y_shape) == () and hasattr(self.operator, "n_classes")
        self.tune_key, self.higher_is_better = ("class_accuracy" if self.is_class else "psnr_sample"), True
        self.levels = getattr(sampler.task, "levels", None)
        self._prior = None
        self._ref = (None, None)  # (n, judge features of held-out images n..2n-1): the realism reference
        self.judge = None
        if cfg.judge:
            from ..operators.classifier import load_classifier

            net, net_cfg = load_classifier(_local(cfg.judge))
            if list(net_cfg["image_shape"]) == list(self.operator.x_shape):  # realism needs it on this image shape
                self.judge = net.to(cfg.device).eval()
            elif self.is_class:
                raise ApsError(f"--judge {cfg.judge}: a classifier of images {net_cfg['image_shape']}, "
                               f"not {list(self.operator.x_shape)}")

    @property
    def device(self):
        return torch.device(self.cfg.device)

    @property
    def prior(self):
        """The diffusers prior the flow was trained against (loaded, and checked, on first use)."""
        if self._prior is None:
            p = self.sampler.task.prior
            self._prior = (p.load() if hasattr(p, "load") else p).to(self.device)
        return self._prior

    def measurements(self, split: str, n: int):
        from ..sampling import heldout_measurements

        start = 0 if split == "test" else self.cfg.tune_first
        if split == "tune" and start < self.cfg.n_measurements:
            raise ApsError(f"tuning digits start at {start}, inside the {self.cfg.n_measurements} scored digits; "
                           "raise --tune-first")
        y, x, _ = heldout_measurements(self.sampler, start, start + n, seed=self.cfg.seed, data=self.cfg.heldout_data)
        return x, y

    def cm(self):
        from ..solvers.consistency_model import ConsistencyModel

        return ConsistencyModel.from_pretrained(_local(self.cfg.cm)).to(self.device)

    @staticmethod
    def solver_output(x):
        """An iterative solver's images clamped to the data range [-1, 1], as the DPS and CM codes do; the flow's
        samples are scored as they come (as aps.evaluate_images.score_posterior and the model cards do)."""
        return x.clamp(-1, 1)

    def score(self, x, x_true, y, log_q=None) -> dict:
        from ..evaluate_images import score_image_samples, summarize_scores

        # on the operator's device: a classifier operator and the judge score the samples there
        scores = score_image_samples(x.to(self.device), x_true, y.to(self.device), self.operator, levels=self.levels,
                                     seed=self.cfg.seed, judge=self.judge if self.is_class else None)
        rows = [{k: float(v[i]) for k, v in scores.items()} for i in range(len(x_true))]
        return {"rows": rows, "summary": summarize_scores(scores)}

    def calibration(self, x, x_true, y) -> dict:
        """Pixel coverage curves over all pixels and per region (regions chosen from y: aps.evaluate_images'
        pixel_regions), and TARP over whole images."""
        from ..evaluate_images import pixel_regions

        x = x.cpu()
        u = cal.ranks(x, x_true)
        masks = {"all": torch.ones_like(u, dtype=torch.bool), **pixel_regions(x, self.operator)}
        tarp = cal.tarp(x, x_true, seed=self.cfg.seed, references="others", standardise=False)
        return {"coverage": cal.expected_coverage(u, masks), "tarp": tarp}

    def _reference_features(self, n: int):
        """Judge features of the held-out images n..2n-1 (not scored): the reference set of the Frechet distance."""
        if self._ref[0] != n:
            from ..evaluate_images import classifier_features
            from ..tasks import heldout_images

            others = heldout_images(self.cfg.heldout_data or self.sampler.task.data, self.operator.x_shape)[0][n:2 * n]
            self._ref = (n, classifier_features(self.judge, others) if len(others) >= 2 else None)
        return self._ref[1]

    def realism(self, x, x_true) -> dict | None:
        """Frechet distance, in the judge classifier's pooled features, between one sample per measurement and
        other held-out images (n..2n-1, unpaired with the measurements, so a sampler cannot score by copying its
        truth); None without a judge of this image shape. realism_floor is the truths' own distance to that set."""
        from ..evaluate_images import classifier_features
        from ..metrics import frechet_distance

        ref = None if self.judge is None else self._reference_features(len(x_true))
        if ref is None:
            return None
        return {"fd": frechet_distance(classifier_features(self.judge, x[:, 0]), ref), "n": len(x_true),
                "reference": f"held-out images {len(x_true)}..{len(x_true) + len(ref) - 1}"}

    def realism_floor(self, x_true) -> dict | None:
        """The realism of the scored truths themselves: what a sampler whose samples are real digits reaches."""
        return self.realism(x_true[:, None], x_true)

    def headline(self, summary: dict) -> tuple[str, float]:
        key = "judge_accuracy" if "judge_accuracy" in summary else "psnr_sample"
        return key, summary[key]["mean"]


def _local(path: str) -> str:
    """A path as given, or relative to the repository root (the shipped checkpoints/... from any directory)."""
    from ..tasks import REPO_ROOT

    p = Path(path).expanduser()
    return str(REPO_ROOT / path) if not p.exists() and not p.is_absolute() and (REPO_ROOT / path).exists() else path


def load_target(sampler, cfg):
    """MixtureTarget or ImageTarget for a loaded checkpoint; fills cfg's per-kind defaults."""
    kind = getattr(getattr(sampler, "task", None), "kind", None)
    cls = {"mixture": MixtureTarget, "image": ImageTarget}.get(kind)
    if cls is None:
        raise ApsError(f"{cfg.checkpoint}: no benchmark for a task of kind {kind!r}")
    for key, value in cls.defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    return cls(sampler, cfg)
