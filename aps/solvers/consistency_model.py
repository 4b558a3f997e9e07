"""A learned consistency model: a diffusers UNet2DModel behind the boundary parametrisation.

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / ((sigma - s_min)^2 + sd^2),  c_out = (sigma - s_min) sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),            c_noise = 250 log(sigma + 1e-44),   sd = 0.5

(Song et al. 2023, "Consistency Models", appendix C; the scalings and time input are exactly those of
diffusers' CMStochasticIterativeScheduler, so a saved model loads in ConsistencyModelPipeline).
At sigma = s_min, c_skip = 1 and c_out = 0 in floating point: f(x, s_min) = x exactly, the boundary
condition, whatever the network. The preconditioning wraps the network (as in NVlabs/edm), so the
solvers only ever call cm(x, sigma).

Folder layout (save_pretrained / from_pretrained):
    folder/unet/{config.json, diffusion_pytorch_model.safetensors}
    folder/scheduler/scheduler_config.json        (CMStochasticIterativeScheduler)
Note: diffusers' ConsistencyModelPipeline checks user latents for 3 channels; for 1-channel MNIST
let it draw the latents itself.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import ApsError
from .edm import SIGMA_MAX, SIGMA_MIN, _bcast

SIGMA_DATA = 0.5


def boundary_scalings(sigma: torch.Tensor, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) at sigma (any shape), Song et al. 2023 appendix C / diffusers' scheduler."""
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1.0 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in


class ConsistencyModel(nn.Module):
    """CM(x, sigma) -> x0 estimate from a UNet2DModel F. x (B, C, H, W) in EDM coordinates, sigma scalar or (B,).

    Args:
        unet: diffusers UNet2DModel (input and output channels = image channels).
        sigma_min, sigma_max, sigma_data: the consistency model's range and data scale (0.002, 80, 0.5).

    One call is one network evaluation (`eps_per_call` = 0 extra: no hidden ODE solve).
    """

    eps_per_call = 0

    def __init__(self, unet, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.unet = unet
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    @classmethod
    def from_teacher(cls, prior, **kwargs) -> "ConsistencyModel":
        """A student initialised from the teacher's weights (Song et al. 2023, sec. 6: CD starts from the
        teacher). The teacher is an eps-model with DDPM-index time input, the student an f-model with
        c_noise time input, so this is a warm start of the features, not the same function."""
        unet = copy.deepcopy(prior.unet).float().requires_grad_(True)
        return cls(unet, **kwargs)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        c_skip, c_out, c_in = boundary_scalings(sigma, self.sigma_min, self.sigma_data)
        c_noise = 250.0 * torch.log(sigma + 1e-44)
        c_noise = (c_noise.expand(x.shape[0]) if c_noise.ndim == 0 else c_noise).to(torch.float32)
        weight_dtype = next(self.unet.parameters()).dtype
        f = self.unet((x * _bcast(c_in, x)).to(weight_dtype), c_noise).sample.to(x.dtype)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * f

    def scheduler(self, num_train_timesteps: int = 40):
        """The matching diffusers CMStochasticIterativeScheduler."""
        from diffusers import CMStochasticIterativeScheduler

        return CMStochasticIterativeScheduler(num_train_timesteps=num_train_timesteps, sigma_min=self.sigma_min,
                                              sigma_max=self.sigma_max, sigma_data=self.sigma_data, clip_denoised=True)

    def save_pretrained(self, folder, num_train_timesteps: int = 40) -> None:
        """Write folder/unet and folder/scheduler in diffusers format (safetensors + JSON)."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.scheduler(num_train_timesteps).save_pretrained(folder / "scheduler")

    @classmethod
    def from_pretrained(cls, path_or_hub_id) -> "ConsistencyModel":
        """Load what save_pretrained wrote, or any diffusers CM (unet/ and scheduler/ subfolders) from a local
        folder or a Hugging Face hub id ("owner/name": the local cache first, then online), as priors load.
        Raises ApsError with what to do when nothing loads."""
        from diffusers import CMStochasticIterativeScheduler, UNet2DModel

        from ..priors.diffusers_prior import _looks_local

        name = str(path_or_hub_id)
        folder = Path(name).expanduser()
        if folder.is_dir() or folder.exists() or _looks_local(name):
            if not (folder / "unet" / "config.json").is_file() or not (folder / "scheduler").is_dir():
                raise ApsError(f"{name!r} is not a consistency-model folder (expects unet/ and scheduler/); "
                               "distill one with scripts/distill_cm.py")
            sources = [dict(pretrained_model_name_or_path=folder)]
        else:
            sources = [dict(pretrained_model_name_or_path=name, local_files_only=local) for local in (True, False)]
        last = None
        for src in sources:
            base = src.pop("pretrained_model_name_or_path")
            try:
                sched = CMStochasticIterativeScheduler.from_pretrained(base, subfolder="scheduler", **src)
                unet = UNet2DModel.from_pretrained(base, subfolder="unet", **src).eval().requires_grad_(False)
                c = sched.config
                return cls(unet, c.sigma_min, c.sigma_max, c.sigma_data)
            except Exception as err:  # OSError, huggingface_hub's offline/HTTP errors, ValueError
                last = err
        raise ApsError(f"cannot load the consistency model {name!r}: not a local folder, and the Hugging Face hub is "
                       f"not reachable or has no such model in the cache ({type(last).__name__}); pass a local folder "
                       "such as checkpoints/mnist-cm") from None

    def config(self) -> dict:
        return {"type": "learned", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}
