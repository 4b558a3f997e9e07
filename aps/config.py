"""One typed training config: defaults and one line of help each, saved beside every checkpoint.

The CLI of train.py is generated from these fields (`add_arguments` / `from_args`), so a default or
a help line lives in exactly one place.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .errors import ApsError


def _opt(default, help: str, group: str, choices=None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class TrainConfig:
    # -- main: what to train for
    problem: str = _opt("", "mixture problem file (.npz/.safetensors: means, weights, variances, A, sigma_y)", "main")
    mcgdiff: str = _opt("", "or make an MCGdiff mixture problem: 'd,dy,seed' (saved into --out)", "main")
    out: str = _opt("runs/aps", "output folder: config.json, flow.safetensors, training state, logs", "main")
    # -- flow architecture (restored from the checkpoint on --resume)
    flow_layers: int = _opt(8, "spline coupling layers", "flow")
    flow_hidden: int = _opt(128, "hidden width of each coupling network", "flow")
    flow_blocks: int = _opt(2, "residual blocks per coupling network", "flow")
    flow_bins: int = _opt(16, "rational-quadratic spline bins", "flow")
    flow_tail_bound: float = _opt(5.0, "spline interval [-B, B] in the Gaussian frame's unit-scale space", "flow")
    flow_frame: str = _opt("moments", "frame scale: moments (the Gaussian posterior of the prior's moments) or "
                           "component (one mixture component's posterior width)", "flow", ("moments", "component"))
    # -- objective
    n_z: int = _opt(4, "flow samples z per measurement y in each step", "objective")
    n_elbo: int = _opt(8, "(t, eps) draws per x for the prior's ELBO", "objective")
    elbo_sampling: str = _opt("lambda", "ELBO time sampling: lambda (variance-reduced) or uniform", "objective",
                              ("lambda", "uniform"))
    exact_prior: bool = _opt(False, "use the prior's exact log-density instead of its ELBO (mixtures only)", "objective")
    temper_start: float = _opt(0.02, "tempering: beta rises geometrically from this to 1 (1 = off)", "objective")
    temper_frac: float = _opt(0.5, "fraction of the steps over which beta reaches 1", "objective")
    fkl_weight: float = _opt(0.0, "weight of the mass-covering forward-KL term -log q(x|y) on data pairs", "objective")
    aps_weight: float = _opt(1.0, "weight of the APS (reverse-KL) term; 0 trains by forward KL alone (a reference)", "objective")
    # -- optimisation
    steps: int = _opt(4000, "optimizer steps", "optimisation")
    batch_size: int = _opt(256, "measurements y per step (per process)", "optimisation")
    lr: float = _opt(1e-3, "peak learning rate (AdamW, cosine decay after warmup)", "optimisation")
    warmup: int = _opt(100, "linear warmup steps", "optimisation")
    weight_decay: float = _opt(0.0, "AdamW weight decay", "optimisation")
    grad_clip: float = _opt(5.0, "gradient-norm clip (0 = off)", "optimisation")
    grad_accum: int = _opt(1, "gradient accumulation steps", "optimisation")
    # -- run
    seed: int = _opt(0, "random seed (ranks draw different noise)", "run")
    mixed_precision: str = _opt("no", "accelerate mixed precision", "run", ("no", "bf16", "fp16"))
    cpu: bool = _opt(False, "force the CPU even if a GPU is there", "run")
    checkpoint_every: int = _opt(1000, "save the flow and the training state every N steps", "run")
    keep: int = _opt(2, "training states kept (older ones are deleted)", "run")
    log_every: int = _opt(50, "log the loss terms every N steps", "run")
    max_seconds: float = _opt(0.0, "stop early (saving the flow) after this many seconds of training (0 = no limit)", "run")
    resume: bool = _opt(False, "continue the run in --out from its latest training state", "run")
    dry_run: bool = _opt(False, "print the resolved config and exit", "run")

    ARCH_FIELDS = ("flow_layers", "flow_hidden", "flow_blocks", "flow_bins", "flow_tail_bound", "flow_frame",
                   "problem", "mcgdiff")

    def validate(self) -> "TrainConfig":
        """Raise ApsError on nonsense values (one line each)."""
        if not (self.problem or self.mcgdiff):
            raise ApsError("say what to train for: --problem FILE or --mcgdiff d,dy,seed")
        positive = ("flow_layers", "flow_hidden", "flow_blocks", "flow_bins", "n_z", "n_elbo", "steps",
                    "batch_size", "grad_accum", "checkpoint_every", "keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ApsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ApsError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.temper_start <= 1:
            raise ApsError(f"--temper-start must be in (0, 1], got {self.temper_start}")
        if not 0 < self.temper_frac <= 1:
            raise ApsError(f"--temper-frac must be in (0, 1], got {self.temper_frac}")
        if self.fkl_weight < 0 or self.aps_weight < 0 or self.flow_tail_bound <= 0 or self.grad_clip < 0:
            raise ApsError("--fkl-weight, --aps-weight and --grad-clip must be >= 0 and --flow-tail-bound > 0")
        if self.fkl_weight == 0 and self.aps_weight == 0:
            raise ApsError("--aps-weight and --fkl-weight are both 0: nothing to train")
        return self

    def beta(self, step: int) -> float:
        """Tempering: beta_0^(1 - s) with s = step / (temper_frac * steps), capped at 1."""
        s = min(1.0, step / max(1.0, self.temper_frac * self.steps))
        return self.temper_start ** (1.0 - s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One typed option per dataclass field, grouped under headers."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action="store_true", help=meta["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            group.add_argument(flag, type=typ, default=f.default, choices=meta["choices"],
                               help=f"{meta['help']} (default: {f.default})")


def from_args(args: argparse.Namespace, cls=TrainConfig):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
