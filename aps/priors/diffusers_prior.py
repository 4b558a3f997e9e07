"""A frozen diffusers eps-model (UNet2DModel + a DDPM-family scheduler) behind the Prior interface.

The scheduler gives the discrete VP schedule (its `alphas_cumprod`); the UNet gives
eps(x_t, t) at the float DDPM timestep index t. The denoiser, score and ELBO come from `Prior`.
Folder layout is diffusers' DDPMPipeline one, so `DDPMPipeline.from_pretrained(folder)` reads it too:

    folder/unet/config.json, folder/unet/diffusion_pytorch_model.safetensors
    folder/scheduler/scheduler_config.json

A folder that is itself a UNet folder with scheduler_config.json beside config.json is accepted too.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import ApsError
from ..schedules import DiscreteSchedule
from .base import Prior

SCHEDULER_CONFIG = "scheduler_config.json"
SAMPLERS = ("ddpm", "ddim")


def _scheduler_class(config: dict):
    """The diffusers scheduler class named in a scheduler config (DDPMScheduler if unnamed or unknown)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "DDPMScheduler")), None)
    return cls if cls is not None and hasattr(cls, "from_config") else diffusers.DDPMScheduler


def _looks_local(path: str) -> bool:
    """True for strings that can only be file-system paths, not hub ids ("owner/name")."""
    return path.startswith((".", "/", "~")) or "\\" in path or path.count("/") != 1


class DiffusersPrior(Prior):
    """A frozen diffusers eps-prediction UNet2DModel and its DDPM-family scheduler, as a `Prior`.

    Args:
        unet: a diffusers UNet2DModel (or any module whose forward(x_t, t) returns `.sample`) predicting eps.
        scheduler: a diffusers scheduler with `alphas_cumprod` and prediction_type "epsilon".
        autocast_bf16: run the UNet under torch.autocast(bfloat16); eps comes back in x_t's dtype.
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory
            when gradients flow into x_t through many UNet calls).
        path: where the weights came from, recorded by `config()`.

    The weights are frozen (eval mode, requires_grad False); gradients flow only into the input.
    Ho et al. 2020, "Denoising Diffusion Probabilistic Models".

    Example:
        >>> prior = DiffusersPrior.from_pretrained("checkpoints/mnist-prior")  # doctest: +SKIP
        >>> prior.eps(torch.randn(2, 1, 32, 32), torch.tensor([10.0, 500.0])).shape  # doctest: +SKIP
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, unet, scheduler, autocast_bf16: bool = False, gradient_checkpointing: bool = False,
                 path: str | None = None):
        super().__init__()
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ApsError(f"DiffusersPrior needs an eps-prediction model; the scheduler says {prediction!r}")
        self.unet = unet
        self.scheduler = scheduler
        # A scheduler that ran add_noise on the GPU holds alphas_cumprod there; the schedule lives on the CPU.
        self.schedule = DiscreteSchedule(scheduler.alphas_cumprod.detach().cpu())
        cfg = getattr(unet, "config", None)
        if cfg is None or "in_channels" not in cfg or "sample_size" not in cfg:
            raise ApsError("DiffusersPrior: the UNet's config must give in_channels and sample_size")
        size = cfg["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.event_shape = (int(cfg["in_channels"]), int(h), int(w))
        self.autocast_bf16 = bool(autocast_bf16)
        self.path = None if path is None else str(path)
        if gradient_checkpointing:
            if not hasattr(unet, "enable_gradient_checkpointing"):
                raise ApsError(f"{type(unet).__name__} does not support gradient checkpointing")
            unet.enable_gradient_checkpointing()
        unet.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # The prior is frozen: it stays in eval mode whatever the owner of a larger module asks.
        return super().train(False)

    def eps(self, x_t, t):
        """eps_theta(x_t, t): x_t (B, C, H, W), t (B,) float DDPM timesteps in [0, T-1] -> (B, C, H, W)."""
        if tuple(x_t.shape[1:]) != self.event_shape:
            raise ApsError(f"DiffusersPrior expects x_t of shape (B, {', '.join(map(str, self.event_shape))}), "
                           f"got {tuple(x_t.shape)}")
        weight = next(self.unet.parameters(), None)
        weight_dtype = x_t.dtype if weight is None else weight.dtype
        t = torch.as_tensor(t, device=x_t.device).to(torch.float32).expand(x_t.shape[0])
        amp = (torch.autocast(device_type=x_t.device.type, dtype=torch.bfloat16)
               if self.autocast_bf16 else contextlib.nullcontext())
        with amp:
            out = self.unet(x_t.to(weight_dtype), t).sample
        return out.to(x_t.dtype)

    @torch.no_grad()
    def sample(self, n: int, generator=None, num_inference_steps: int | None = None,
               progress: bool = False, sampler: str = "ddpm") -> torch.Tensor:
        """n samples (n, C, H, W) by the scheduler's `step`: DDPM ancestral sampling, or DDIM (eta 0, deterministic
        given the starting noise; Song et al. 2021) built from the same scheduler config.

        generator: one torch.Generator, or a list of n of them (one per sample: sample i then does not
        depend on n or the batch). num_inference_steps: default all T training steps.
        """
        from diffusers import DDIMScheduler, DDPMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        if sampler not in SAMPLERS:
            raise ApsError(f"unknown prior sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        weight = next(self.unet.parameters(), None)
        device = torch.device("cpu") if weight is None else weight.device
        sched = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps or self.schedule.num_timesteps, device=device)
        x = randn_tensor((n, *self.event_shape), generator=generator, device=device, dtype=torch.float32)
        steps = sched.timesteps
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"{sampler.upper()} sampling")
        for k in steps:
            eps = self.eps(x, k.to(torch.float32).expand(n))
            x = sched.step(eps, k, x, generator=generator).prev_sample
        return x

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **options) -> "DiffusersPrior":
        """Load from a local folder (DDPMPipeline layout, or a UNet folder with scheduler_config.json)
        or a Hugging Face hub id ("owner/name", unet/ and scheduler/ subfolders; cached or online).

        options: autocast_bf16, gradient_checkpointing. Raises ApsError with what to do when nothing loads.
        """
        from diffusers import UNet2DModel

        name = str(path_or_hub_id)
        folder = Path(name).expanduser()
        if folder.is_dir():
            if (folder / "unet" / "config.json").is_file() and (folder / "scheduler" / SCHEDULER_CONFIG).is_file():
                unet_dir, sched_dir = folder / "unet", folder / "scheduler"
            elif (folder / "config.json").is_file() and (folder / SCHEDULER_CONFIG).is_file():
                unet_dir, sched_dir = folder, folder
            else:
                raise ApsError(f"{name!r} is not a diffusion prior folder: expected unet/config.json and "
                               f"scheduler/{SCHEDULER_CONFIG} (DDPMPipeline layout), or config.json and "
                               f"{SCHEDULER_CONFIG} side by side")
            try:
                sched_cfg = _scheduler_class({}).load_config(sched_dir)
                if "sigma_data" in sched_cfg or "Consistency" in str(sched_cfg.get("_class_name", "")) \
                        or str(sched_cfg.get("_class_name", "")).startswith("CM"):
                    raise ApsError(f"{name!r} holds a consistency model ({sched_cfg.get('_class_name')}), not a "
                                   f"diffusion prior: give the DDPM-family prior it was distilled from")
                unet = UNet2DModel.from_pretrained(unet_dir)
                scheduler = _scheduler_class(sched_cfg).from_config(sched_cfg)
            except (OSError, ValueError, TypeError, KeyError) as err:
                raise ApsError(f"cannot load the diffusion prior in {name!r}: {str(err).splitlines()[0]}") from None
            if not hasattr(scheduler, "alphas_cumprod"):
                raise ApsError(f"{name!r}: its scheduler {type(scheduler).__name__} has no DDPM-family (VP) schedule")
            return cls(unet, scheduler, path=name, **options)
        if folder.exists() or _looks_local(name):
            raise ApsError(f"prior folder {name!r} does not exist")
        return cls(*_load_from_hub(name), path=name, **options)

    @classmethod
    def from_config(cls, config: dict, **options) -> "DiffusersPrior":
        """Inverse of `config()`."""
        if config.get("type") != "diffusers" or not config.get("path"):
            raise ApsError(f"not a diffusers prior config: {config!r}")
        return cls.from_pretrained(config["path"], **options)

    def save_pretrained(self, folder) -> None:
        """Write folder/unet (config.json + safetensors), folder/scheduler and model_index.json (DDPMPipeline)."""
        save_pipeline(self.unet, self.scheduler, folder)
        if self.path is None:
            self.path = str(folder)

    def config(self) -> dict:
        """What a checkpoint records to name this prior: {"type": "diffusers", "path": ...}."""
        return {"type": "diffusers", "path": self.path}


def save_pipeline(unet, scheduler, folder) -> None:
    """Save a UNet and its scheduler in the DDPMPipeline layout (model_index.json, unet/, scheduler/)."""
    from diffusers import DDPMPipeline, ModelMixin

    folder = Path(folder)
    if isinstance(unet, ModelMixin):
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    else:  # a plain module with save_pretrained (tests): no pipeline index
        unet.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")


def _load_from_hub(hub_id: str):
    """(unet, scheduler) of a hub id: from the local cache first, then online; ApsError when neither works."""
    from diffusers import DDPMScheduler, UNet2DModel

    last = None
    for local_only in (True, False):
        try:
            unet = UNet2DModel.from_pretrained(hub_id, subfolder="unet", local_files_only=local_only)
            sched_cfg = DDPMScheduler.load_config(hub_id, subfolder="scheduler", local_files_only=local_only)
            return unet, _scheduler_class(sched_cfg).from_config(sched_cfg)
        except Exception as err:  # OSError, huggingface_hub's offline/HTTP errors, ValueError
            last = err
    raise ApsError(f"cannot load prior {hub_id!r}: it is not a local folder, and the Hugging Face hub is not "
                   f"reachable or has no such model in the cache ({type(last).__name__}). Pass a local folder "
                   f"holding unet/ and scheduler/ instead, e.g. checkpoints/mnist-prior") from None
