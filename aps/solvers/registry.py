"""Every sampler by name, with the one option that is tuned on separate measurements.

    solver = build("dps", cm=None, zeta=0.3, steps=1000)      # same verbs for all: solver.sample(prior, op, y, n)
    REGISTRY["cm2"].tuned                                    # "lr1": the option benchmark.py tunes over a grid

"aps" (a trained flow) is built by aps.solvers.flow.FlowSolver from a checkpoint, not from options.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ApsError
from .cm_dps import CMDPS
from .cm_inversion import CMInversion
from .ddrm import DDRM
from .dps import DPS
from .prior_samples import PriorSamples


@dataclass(frozen=True)
class Entry:
    """A solver class, the option tuned on held-apart measurements (None: nothing to tune), whether it needs a CM."""

    cls: type
    tuned: str | None
    needs_cm: bool
    summary: str


REGISTRY: dict[str, Entry] = {
    "prior": Entry(PriorSamples, None, False, "prior samples, y ignored (the do-nothing baseline)"),
    "dps": Entry(DPS, "zeta", False, "DPS (Chung et al. 2023)"),
    "cm1": Entry(CMDPS, "zeta", True, "CM solver I: DPS through a consistency model (Xu et al. 2024)"),
    "cm2": Entry(CMInversion, "lr1", True, "CM solver II: consistency-model inversion (Xu et al. 2024)"),
    "ddrm": Entry(DDRM, "eta", False, "DDRM (Kawar et al. 2022): denoising in the SVD of A"),
}

NAMES = ("aps", *REGISTRY)


def build(name: str, cm=None, progress: bool = False, **options):
    """The solver `name` with its options (constructor arguments); cm for the CM solvers (a ConsistencyModel
    or ExactConsistency). Raises ApsError for an unknown name or a CM solver without a CM."""
    if name not in REGISTRY:
        raise ApsError(f"unknown solver {name!r}; choose from {', '.join(NAMES)}")
    entry = REGISTRY[name]
    if entry.needs_cm:
        if cm is None:
            raise ApsError(f"{name} needs a consistency model")
        return entry.cls(cm, progress=progress, **options)
    return entry.cls(progress=progress, **options)
