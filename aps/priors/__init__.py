"""Diffusion priors behind one interface (aps.priors.base.Prior)."""
from .base import Prior
from .mixture import GaussianMixturePrior, MixturePosterior

__all__ = ["Prior", "GaussianMixturePrior", "MixturePosterior"]
