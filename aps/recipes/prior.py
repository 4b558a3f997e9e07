"""The MNIST diffusion-prior recipe: config, UNet, scheduler, augmentation, LR and the eps loss.

scripts/train_prior.py owns the loop (and accelerate); everything here is plain torch/diffusers.
The eps loss is Ho et al. 2020's L_simple: E_{x, k, eps} ||eps - eps_theta(abar_k^1/2 x + (1-abar_k)^1/2 eps, k)||^2.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import option
from ..errors import ApsError




@dataclass
class PriorTrainConfig:
    # -- main
    out: str = option("checkpoints/mnist-prior", "output folder: unet/, scheduler/ (DDPMPipeline layout), train_config.json", "main")
    # -- architecture (diffusers UNet2DModel, 32x32, 1 channel)
    block_out_channels: tuple = option((32, 64, 96), "UNet channels per resolution (32, 16, 8)", "architecture")
    layers_per_block: int = option(2, "ResNet layers per UNet block", "architecture")
    attention: tuple = option((False, True, True), "self-attention in each down block (mirrored going up)", "architecture")
    norm_num_groups: int = option(8, "GroupNorm groups", "architecture")
    dropout: float = option(0.1, "ResNet dropout (regularises against memorising 4,500 digits)", "architecture")
    num_train_timesteps: int = option(1000, "DDPM timesteps (linear betas 1e-4 .. 0.02, eps prediction)", "architecture")
    # -- optimisation
    steps: int = option(20000, "optimizer steps (the cosine LR runs over min(steps, time budget))", "optimisation")
    max_seconds: float = option(0.0, "stop after this many seconds of training (0 = no limit)", "optimisation")
    batch_size: int = option(256, "images per step per process", "optimisation")
    grad_accum: int = option(1, "gradient accumulation steps", "optimisation")
    lr: float = option(1e-3, "peak learning rate (AdamW)", "optimisation")
    warmup: int = option(500, "linear warmup steps", "optimisation")
    min_lr_frac: float = option(0.05, "final LR as a fraction of the peak", "optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay", "optimisation")
    grad_clip: float = option(1.0, "gradient-norm clip (0 = off)", "optimisation")
    ema_decay: float = option(0.999, "largest EMA decay (warmup power 3/4 reaches it at ~10k steps)", "optimisation")
    # -- augmentation (no flips: digits are not symmetric)
    shift_px: int = option(2, "random integer translation in [-shift, shift] pixels (exact, no resampling)", "augmentation")
    affine_prob: float = option(0.5, "probability of a small rotation/scale on top (bilinear resampling)", "augmentation")
    max_rotation_deg: float = option(8.0, "rotation in [-r, r] degrees", "augmentation")
    max_scale: float = option(0.08, "scale in [1 - s, 1 + s]", "augmentation")
    # -- run
    seed: int = option(0, "random seed (ranks draw different batches and noise)", "run")
    mixed_precision: str = option("bf16", "accelerate mixed precision: no, bf16, fp16", "run")
    cpu: bool = option(False, "force the CPU", "run")
    log_every: int = option(100, "log the loss every N steps", "run")
    save_every_seconds: float = option(120.0, "save the EMA model this often (0 = only at the end)", "run")
    dry_run: bool = option(False, "print the resolved config and exit", "run")

    def validate(self) -> "PriorTrainConfig":
        """Raise ApsError on nonsense values."""
        for name in ("layers_per_block", "norm_num_groups", "num_train_timesteps", "steps", "batch_size",
                     "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ApsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if len(self.block_out_channels) != len(self.attention):
            raise ApsError("--block-out-channels and --attention need one entry per resolution")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ApsError("every entry of --block-out-channels must be divisible by --norm-num-groups")
        if not self.lr > 0 or not 0 <= self.ema_decay < 1 or self.max_seconds < 0:
            raise ApsError("--lr must be > 0, --ema-decay in [0, 1), --max-seconds >= 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ApsError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_unet(cfg: PriorTrainConfig):
    """A fresh 32x32, 1-channel diffusers UNet2DModel as the config says."""
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=cfg.layers_per_block,
                       block_out_channels=tuple(cfg.block_out_channels), down_block_types=down, up_block_types=up,
                       norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout)


def make_scheduler(cfg: PriorTrainConfig):
    """DDPM: linear betas 1e-4 .. 0.02 over T steps, eps prediction (Ho et al. 2020)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon")


def augment(x: torch.Tensor, cfg: PriorTrainConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random small translations (all images) and rotation/scale (a fraction), no flips; x (B, C, H, W) in [-1, 1].

    Integer translations sample pixel centres exactly, so images without rotation/scale are not blurred.
    Outside the image is background (-1).
    """
    b, _, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    shift = torch.randint(-cfg.shift_px, cfg.shift_px + 1, (b, 2), generator=generator, device=dev).float()
    use_affine = rand(b) < cfg.affine_prob
    angle = (2 * rand(b) - 1) * math.radians(cfg.max_rotation_deg) * use_affine
    scale = 1 + (2 * rand(b) - 1) * cfg.max_scale * use_affine
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coordinates to input ones in affine_grid's [-1, 1] frame; one pixel is 2/W there.
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] * 2 / w], 1),
                         torch.stack([sin, cos, shift[:, 1] * 2 / h], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out - 1


def lr_factor(step: int, progress: float, cfg: PriorTrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from 1 to min_lr_frac as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    p = min(1.0, max(0.0, progress))
    return warm * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def eps_loss(unet, scheduler, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample L_simple (B,): mean over pixels of (eps - eps_theta(x_k, k))^2, k uniform in 0..T-1."""
    k = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_k = scheduler.add_noise(x, eps, k)
    pred = unet(x_k, k).sample
    return (pred.float() - eps.float()).pow(2).flatten(1).mean(1)
