"""The do-nothing baseline: samples of the prior, ignoring y.

Every posterior sampler should beat it; on multimodal problems its mode-weight TV and sliced
Wasserstein say how much y actually pins down. Exact for the mixture (no network evaluations);
ancestral DDPM for a diffusers prior.
"""
from __future__ import annotations

from .base import Solver


class PriorSamples(Solver):
    """x ~ p(x), y ignored. Args: steps (DDPM steps for a diffusers prior; unused for the mixture)."""

    name = "prior"

    def __init__(self, steps: int | None = None, progress: bool = False):
        super().__init__(progress)
        self.steps = steps

    def _sample(self, prior, operator, y, generator):
        if hasattr(prior, "schedule") and hasattr(prior, "unet"):
            steps = self.steps or prior.schedule.num_timesteps
            self.count("eps_fwd", steps)
            return prior.sample(y.shape[0], generator=generator, num_inference_steps=steps)
        return prior.sample(y.shape[0], generator=generator)

    def config(self):
        return {"name": self.name, "steps": self.steps}
