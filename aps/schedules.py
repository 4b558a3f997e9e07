"""VP noise schedules: x_t = alpha_t x + sigma_t eps, alpha_t^2 + sigma_t^2 = 1.

Every schedule is described by its log-SNR lambda(t) = log(alpha_t^2 / sigma_t^2) and knows how to
draw the (t, weight) pairs of the ELBO's diffusion term (docs/objective.md):

    1/2 * E_{t, eps}[ w(t) * ||eps - eps_theta(x_t, t)||^2 ]

with E[w(t) f(t)] equal to the integral of f over lambda (continuous time, Kingma et al. 2021,
"Variational Diffusion Models", eq. 17) or to sum_k (SNR(k-1)/SNR(k) - 1) f(k) (discrete DDPM).
`sampling="lambda"` draws lambda uniformly (continuous) or k proportionally to its weight (discrete),
so the weight is constant: the variance-reduced default. `sampling="uniform"` draws t uniformly and
carries the weight. Both are unbiased for the same quantity.

The time `t` is the schedule's native time: a float in [t_data, t_noise] for continuous schedules
and a (float-typed) DDPM timestep index 0..T-1 for discrete ones, as a diffusers UNet expects.
"""
from __future__ import annotations

import math

import torch

SAMPLINGS = ("lambda", "uniform")
STRATA = ("item", "batch")


def _stratified_uniform(batch: int, n_draws: int, generator, device, strata: str = "item") -> torch.Tensor:
    """(batch * n_draws,) uniforms in [0, 1), each marginally U[0, 1).

    strata="item": stratified over the n_draws of each item (one uniform in each of n_draws equal bins).
    strata="batch": one rotated lattice over all N = batch * n_draws draws, u = (u_0 + k / N) mod 1
    (VDM's low-discrepancy sampler, Kingma et al. 2021), draw j of item i at k = i + batch * j: the batch
    covers [0, 1) evenly, so the batch mean's variance falls even with one draw per item, and each
    item's draws are 1/n_draws apart.
    """
    if strata == "batch":
        k = torch.arange(batch, device=device)[:, None] + batch * torch.arange(n_draws, device=device)
        u0 = torch.rand(1, generator=generator, device=device)
        return torch.remainder(u0 + k.reshape(-1) / (batch * n_draws), 1.0)
    if strata != "item":
        raise ValueError(f"unknown ELBO strata {strata!r}; choose from {STRATA}")
    u = torch.rand(batch, n_draws, generator=generator, device=device)
    offsets = torch.arange(n_draws, device=device) / n_draws
    return (offsets + u / n_draws).reshape(-1)


class Schedule:
    """Base class: alpha, sigma and log-SNR as functions of the native time t."""

    lambda_min: float  # log-SNR at the noise end
    lambda_max: float  # log-SNR at the data end
    t_data: float
    t_noise: float

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(sigmoid(lambda)), sigma_t = sqrt(sigmoid(-lambda)); same shape as t."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def sample_elbo_times(self, batch: int, n_draws: int = 1, sampling: str = "lambda",
                          generator: torch.Generator | None = None, device=None, strata: str = "item"):
        """(t, w), each (batch * n_draws,): E[w * f(t)] is the diffusion term's integral (or sum) of f;
        `strata` says how the draws are spread (see `_stratified_uniform`)."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError


class ContinuousSchedule(Schedule):
    """Continuous-time VP schedule on t in [0, 1], truncated to log-SNR in [lambda_min, lambda_max].

    kind="cosine": lambda(t) = -2 log tan(pi t / 2) (Nichol & Dhariwal 2021).
    kind="linear": the VP-SDE of Song et al. 2021, beta(t) = beta_min + t (beta_max - beta_min),
    alpha_t^2 = exp(-int_0^t beta); lambda_min/lambda_max then follow from t in [t_data, 1].
    """

    def __init__(self, kind: str = "cosine", lambda_min: float = -14.0, lambda_max: float = 14.0,
                 beta_min: float = 0.1, beta_max: float = 20.0, t_data: float = 1e-5):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown continuous schedule kind {kind!r} (cosine or linear)")
        self.kind, self.beta_min, self.beta_max = kind, beta_min, beta_max
        if kind == "cosine":
            if not lambda_min < lambda_max:
                raise ValueError("lambda_min must be below lambda_max")
            self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
            self.t_data = float(self._t_of_lambda(torch.tensor(lambda_max, dtype=torch.float64)))
            self.t_noise = float(self._t_of_lambda(torch.tensor(lambda_min, dtype=torch.float64)))
        else:
            self.t_data, self.t_noise = float(t_data), 1.0
            self.lambda_max = float(self.log_snr(torch.tensor(t_data, dtype=torch.float64)))
            self.lambda_min = float(self.log_snr(torch.tensor(1.0, dtype=torch.float64)))

    # B(t) = int_0^t beta(s) ds, so alpha^2 = exp(-B) and lambda = -log(expm1(B)).
    def _big_b(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def log_snr(self, t):
        if self.kind == "cosine":
            return -2.0 * torch.log(torch.tan(0.5 * math.pi * t))
        return -torch.log(torch.expm1(self._big_b(t)))

    def dlog_snr_dt(self, t):
        if self.kind == "cosine":
            return -2.0 * math.pi / torch.sin(math.pi * t)
        b = self._big_b(t)
        beta = self.beta_min + (self.beta_max - self.beta_min) * t
        return -beta / (-torch.expm1(-b))

    def _t_of_lambda(self, lam):
        if self.kind == "cosine":
            return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * lam))
        b = torch.nn.functional.softplus(-lam)
        db = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * db * b)) / db

    def sample_elbo_times(self, batch, n_draws=1, sampling="lambda", generator=None, device=None, strata="item"):
        u = _stratified_uniform(batch, n_draws, generator, device, strata)
        if sampling == "lambda":
            lam = self.lambda_min + u * (self.lambda_max - self.lambda_min)
            t = self._t_of_lambda(lam)
            w = torch.full_like(t, self.lambda_max - self.lambda_min)
        elif sampling == "uniform":
            t = self.t_data + u * (self.t_noise - self.t_data)
            w = (self.t_noise - self.t_data) * -self.dlog_snr_dt(t)
        else:
            raise ValueError(f"unknown ELBO time sampling {sampling!r}; choose from {SAMPLINGS}")
        return t, w

    def config(self):
        return {"type": "continuous", "kind": self.kind, "lambda_min": self.lambda_min,
                "lambda_max": self.lambda_max, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_data": self.t_data}


class DiscreteSchedule(Schedule):
    """Discrete DDPM schedule: timesteps k = 0..T-1 with cumulative products abar_k (diffusers indexing).

    ELBO weights (Ho et al. 2020 with the posterior-variance reverse step; docs/objective.md):
    w_k = SNR(k-1)/SNR(k) - 1 for k = 1..T-1; level 0 is the data end of the decoder term.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)  # a used scheduler may hold it on a GPU
        if abar.ndim != 1 or len(abar) < 2 or not ((abar > 0) & (abar < 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
        self.alphas_cumprod = abar
        self._lam = torch.log(abar) - torch.log1p(-abar)
        snr = torch.exp(self._lam)
        self._w = torch.cat([torch.zeros(1, dtype=torch.float64), snr[:-1] / snr[1:] - 1.0])
        self.lambda_max, self.lambda_min = float(self._lam[0]), float(self._lam[-1])
        self.t_data, self.t_noise = 0.0, float(len(abar) - 1)
        self._w_sum = float(self._w.sum())
        self._device_tables: dict = {}

    @classmethod
    def from_diffusers(cls, scheduler) -> "DiscreteSchedule":
        """From any diffusers scheduler that has `alphas_cumprod` (DDPM, DDIM, ...)."""
        return cls(scheduler.alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _on(self, name: str, device) -> torch.Tensor:
        """A table (_lam, _w) on `device`, copied there once: a host-to-device copy on every call would be
        a sync of its own, and cannot be captured in a CUDA graph."""
        device = torch.device(device if device is not None else "cpu")
        key = (name, str(device))
        if key not in self._device_tables:
            self._device_tables[key] = getattr(self, name).to(device)
        return self._device_tables[key]

    def log_snr(self, t):
        # Linear interpolation in log-SNR between integer timesteps (used by EDM-style conversions).
        lam = self._on("_lam", t.device)
        t64 = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t64.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        frac = t64 - lo
        out = lam[lo] * (1 - frac) + lam[hi] * frac
        return out.to(t.dtype if t.is_floating_point() else torch.get_default_dtype())

    def sample_elbo_times(self, batch, n_draws=1, sampling="lambda", generator=None, device=None, strata="item"):
        w = self._on("_w", device)
        if sampling == "lambda":
            # Importance sampling k ~ w_k / sum(w): the weight becomes the constant sum(w).
            u = _stratified_uniform(batch, n_draws, generator, device, strata).to(torch.float64)
            cdf = torch.cumsum(w, 0) / self._w_sum
            k = torch.searchsorted(cdf, u, right=True).clamp(1, self.num_timesteps - 1)
            weight = torch.full(k.shape, self._w_sum, dtype=torch.float64, device=device)
        elif sampling == "uniform" and strata == "batch":
            u = _stratified_uniform(batch, n_draws, generator, device, strata)
            k = (1 + (u * (self.num_timesteps - 1)).long()).clamp(max=self.num_timesteps - 1)
            weight = (self.num_timesteps - 1) * w[k]
        elif sampling == "uniform":
            k = torch.randint(1, self.num_timesteps, (batch * n_draws,), generator=generator, device=device)
            weight = (self.num_timesteps - 1) * w[k]
        else:
            raise ValueError(f"unknown ELBO time sampling {sampling!r}; choose from {SAMPLINGS}")
        dtype = torch.get_default_dtype()
        return k.to(dtype), weight.to(dtype)

    def config(self):
        return {"type": "discrete", "alphas_cumprod": self.alphas_cumprod.tolist()}


def schedule_from_config(cfg: dict) -> Schedule:
    """Inverse of `Schedule.config()`."""
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind == "continuous":
        return ContinuousSchedule(**cfg)
    if kind == "discrete":
        return DiscreteSchedule(torch.tensor(cfg["alphas_cumprod"]))
    raise ValueError(f"unknown schedule type {kind!r}")
