"""Diffusion priors behind one interface (aps.priors.base.Prior)."""
from .base import Prior
from .mixture import GaussianMixturePrior, MixturePosterior
from .diffusers_prior import DiffusersPrior

__all__ = ["Prior", "GaussianMixturePrior", "MixturePosterior", "DiffusersPrior"]
