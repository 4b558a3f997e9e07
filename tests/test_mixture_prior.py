"""The exact Gaussian-mixture prior: every closed form against autograd, Monte Carlo or a numeric integral."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from aps.operators import MatrixOperator
from aps.priors import GaussianMixturePrior
from aps.schedules import ContinuousSchedule, DiscreteSchedule


def small_prior(d=2, schedule=None):
    g = torch.Generator().manual_seed(1)
    means = 3 * torch.randn(3, d, generator=g)
    return GaussianMixturePrior(means, torch.tensor([0.2, 0.5, 0.3]), 0.3 + torch.rand(3, d, generator=g), schedule)


def test_log_prob_integrates_to_one_in_1d(float64):
    p = small_prior(d=1)
    grid = torch.linspace(-20, 20, 40001)[:, None]
    mass = torch.trapezoid(p.log_prob(grid).exp(), grid[:, 0])
    assert mass == pytest.approx(1.0, abs=1e-6)


def test_score_and_eps_match_autograd(float64):
    p = small_prior()
    x = 3 * torch.randn(16, 2)
    t = torch.rand(16) * 0.9 + 0.05
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p.log_prob_t(xr, t).sum(), xr)
    assert torch.allclose(p.score(x, t), grad, atol=1e-10)
    _, sigma = p.schedule.alpha_sigma(t)
    assert torch.allclose(p.eps(x, t), -sigma[:, None] * grad, atol=1e-10)


def test_denoiser_is_posterior_mean_by_numeric_integral(float64):
    """E[x0 | x_t] in 1-D by quadrature of x0 * p(x0) N(x_t; alpha x0, sigma^2)."""
    p = small_prior(d=1)
    grid = torch.linspace(-25, 25, 200001)
    for t_val, xt_val in [(0.3, 1.0), (0.7, -2.0), (0.95, 0.5)]:
        t = torch.tensor([t_val])
        alpha, sigma = p.schedule.alpha_sigma(t)
        w = p.log_prob(grid[:, None]).exp() * torch.exp(-0.5 * (xt_val - alpha * grid) ** 2 / sigma ** 2)
        expected = torch.trapezoid(w * grid, grid) / torch.trapezoid(w, grid)
        assert p.denoise(torch.tensor([[xt_val]]), t)[0, 0] == pytest.approx(float(expected), abs=1e-6)


def test_posterior_matches_grid_posterior_in_2d(float64):
    p = small_prior()
    op = MatrixOperator(torch.tensor([[0.8, -0.5]]), 0.4)
    y = torch.tensor([[0.7]])
    post = p.posterior(op, y)
    xs = torch.linspace(-14, 14, 701)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    log_unnorm = p.log_prob(grid) + op.log_likelihood(y.expand(len(grid), 1), grid)
    cell = (xs[1] - xs[0]) ** 2
    log_evidence = torch.logsumexp(log_unnorm, 0) + torch.log(cell)
    exact = post.log_prob(grid[None])[0]
    mask = log_unnorm > log_unnorm.max() - 20
    assert torch.allclose(exact[mask], (log_unnorm - log_evidence)[mask], atol=1e-4)
    # the grid's posterior mean equals the closed-form mixture mean
    w = torch.softmax(log_unnorm, 0)
    assert torch.allclose(w @ grid, post.weights[0] @ post.means[0], atol=1e-6)


def test_posterior_samples_have_the_closed_form_moments(float64):
    p = small_prior(d=3)
    op = MatrixOperator(torch.randn(2, 3, generator=torch.Generator().manual_seed(3)), 0.2)
    y = op.measure(p.sample(2, generator=torch.Generator().manual_seed(4)), torch.Generator().manual_seed(5))
    post = p.posterior(op, y)
    s = post.sample(200000, generator=torch.Generator().manual_seed(6))
    mean = (post.weights[..., None] * post.means).sum(1)
    assert torch.allclose(s.mean(1), mean, atol=0.02)
    # every sample is most likely under a component with non-negligible weight
    assert (post.weights.gather(1, post.assign(s)) > 1e-4).all()


def test_elbo_is_tight_with_the_exact_eps(float64):
    """With exact eps and a wide log-SNR range, the ELBO equals -log p(x) (up to Monte-Carlo error)."""
    p = small_prior()
    x = p.sample(4, generator=torch.Generator().manual_seed(0))
    est = p.elbo(x, n_draws=200000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(est, -p.log_prob(x), atol=0.15)


def test_elbo_time_samplings_agree(float64):
    """Uniform-t draws carrying their weight estimate the same bound as uniform-lambda draws."""
    p = small_prior(schedule=ContinuousSchedule("cosine", lambda_min=-6, lambda_max=6))
    x = p.sample(3, generator=torch.Generator().manual_seed(0))
    a = p.elbo(x, n_draws=200000, sampling="lambda", generator=torch.Generator().manual_seed(1))
    b = p.elbo(x, n_draws=200000, sampling="uniform", generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, atol=0.15)


def test_discrete_schedule_elbo_is_an_upper_bound(float64):
    """The T = 1000 linear-beta DDPM bound is loose by ~0.45 nats/dim here (its first log-SNR steps are
    ~0.8 wide), and tightens as the grid gets finer."""
    x = small_prior().sample(4, generator=torch.Generator().manual_seed(0))
    gaps = []
    for steps in (1000, 4000):
        sched = DDPMScheduler(num_train_timesteps=steps, beta_start=1e-4 * 1000 / steps, beta_end=0.02 * 1000 / steps)
        p = small_prior(schedule=DiscreteSchedule.from_diffusers(sched))
        est = p.elbo(x, n_draws=100000, generator=torch.Generator().manual_seed(1))
        gaps.append(est + p.log_prob(x))
    assert (gaps[0] > 0).all() and (gaps[0] < 2.0).all()
    assert (gaps[1] < gaps[0]).all()


def test_bad_mixture_parameters_raise():
    from aps.errors import ApsError

    with pytest.raises(ApsError, match="weights"):
        GaussianMixturePrior(torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2))
    with pytest.raises(ApsError, match="variances"):
        GaussianMixturePrior(torch.zeros(2, 2), torch.ones(2), torch.ones(3))
    with pytest.raises(ApsError, match="NaN"):
        GaussianMixturePrior(torch.tensor([[0.0, math.nan], [0, 0]]), torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("strata,antithetic", [("batch", False), ("item", True), ("batch", True)])
def test_elbo_estimators_agree(strata, antithetic, float64):
    """Batch-stratified times and antithetic noise estimate the same bound as the default draws, per x."""
    p = small_prior(schedule=ContinuousSchedule("cosine", lambda_min=-6, lambda_max=6))
    x = p.sample(3, generator=torch.Generator().manual_seed(0))
    ref = p.elbo(x, n_draws=200000, generator=torch.Generator().manual_seed(1))
    got = p.elbo(x, n_draws=200000, strata=strata, antithetic=antithetic, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got, ref, atol=0.15)

