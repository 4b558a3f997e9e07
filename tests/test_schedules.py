"""The schedules: log-SNR inverses, derivatives, and unbiased ELBO time draws."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from aps.schedules import ContinuousSchedule, DiscreteSchedule, schedule_from_config


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_continuous_inverse_and_derivative(kind, float64):
    s = ContinuousSchedule(kind)
    t = torch.linspace(s.t_data, s.t_noise, 101)[1:-1].requires_grad_(True)
    lam = s.log_snr(t)
    assert torch.allclose(s._t_of_lambda(lam), t, atol=1e-9)
    (grad,) = torch.autograd.grad(lam.sum(), t)
    assert torch.allclose(s.dlog_snr_dt(t), grad, rtol=1e-7)
    a, sg = s.alpha_sigma(t.detach())
    assert torch.allclose(a ** 2 + sg ** 2, torch.ones_like(a))
    assert s.log_snr(torch.tensor(s.t_data)) == pytest.approx(s.lambda_max)
    assert s.log_snr(torch.tensor(s.t_noise)) == pytest.approx(s.lambda_min)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("sampling", ["lambda", "uniform"])
def test_continuous_elbo_times_integrate_over_lambda(kind, sampling, float64):
    """E[w f(t)] = integral of f over lambda in [lambda_min, lambda_max]; f = sigmoid(-lambda) integrates to a softplus difference.

    (f is small at the data end: uniform-t draws are heavy-tailed there, which is why lambda is the default.)"""
    # a moderate log-SNR range: uniform-t draws carry a weight ~ 1/t near the ends (heavy-tailed)
    s = ContinuousSchedule(kind, lambda_min=-6, lambda_max=6) if kind == "cosine" else ContinuousSchedule(kind, t_data=1e-3)
    g = torch.Generator().manual_seed(0)
    t, w = s.sample_elbo_times(20000, 4, sampling, g)
    est = (w * torch.sigmoid(-s.log_snr(t))).mean()
    exact = math.log1p(math.exp(-s.lambda_min)) - math.log1p(math.exp(-s.lambda_max))
    assert est == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("sampling", ["lambda", "uniform"])
def test_discrete_elbo_times_sum_weights(sampling, float64):
    s = DiscreteSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(0)
    t, w = s.sample_elbo_times(50000, 4, sampling, g)
    assert t.min() >= 1 and t.max() <= 999 and torch.equal(t, t.round())
    f = lambda k: torch.cos(k / 300.0) + 2  # noqa: E731
    exact = (s._w * f(torch.arange(1000.0))).sum()
    assert (w * f(t)).mean() == pytest.approx(float(exact), rel=0.02)


def test_schedule_config_round_trip():
    for s in (ContinuousSchedule("cosine", -10, 12), ContinuousSchedule("linear"),
              DiscreteSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=50))):
        s2 = schedule_from_config(s.config())
        t = torch.tensor([s.t_data, 0.5 * (s.t_data + s.t_noise), s.t_noise])
        assert torch.allclose(s.log_snr(t), s2.log_snr(t))


def test_batch_strata_are_a_rotated_lattice():
    """strata='batch': N draws sit one in each bin of width 1/N, and each is uniform on [0, 1) marginally."""
    from aps.schedules import _stratified_uniform

    g = torch.Generator().manual_seed(0)
    u = _stratified_uniform(16, 2, g, None, "batch")
    assert torch.equal(torch.sort((u * 32).floor()).values, torch.arange(32.0))
    first = torch.stack([_stratified_uniform(4, 1, g, None, "batch")[0] for _ in range(4000)])
    assert first.mean() == pytest.approx(0.5, abs=0.02) and first.var() == pytest.approx(1 / 12, abs=0.01)
    with pytest.raises(ValueError):
        _stratified_uniform(4, 1, g, None, "nope")
