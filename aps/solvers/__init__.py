"""Comparison solvers on the same frozen prior as APS: DPS, the consistency-model solvers, DDRM, and the
consistency models they use (the exact ODE one of a mixture, a distilled network). See SOLVERS.md."""
from .base import Solver, measurement_loss
from .cm_dps import CMDPS
from .cm_inversion import CMInversion
from .consistency_model import ConsistencyModel
from .ddrm import DDRM
from .distillation import ConsistencyDistillation
from .dps import DPS
from .edm import EDMDenoiser, karras_sigmas
from .exact_cm import ExactConsistency, MixtureEDMDenoiser, pf_ode
from .prior_samples import PriorSamples

__all__ = ["Solver", "measurement_loss", "CMDPS", "CMInversion", "ConsistencyModel", "ConsistencyDistillation", "DDRM",
           "DPS", "EDMDenoiser", "karras_sigmas", "ExactConsistency", "MixtureEDMDenoiser", "pf_ode", "PriorSamples"]
