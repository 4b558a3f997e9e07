"""DDRM: its update per spectral coordinate against the paper's recursion in closed form, the exact posterior
in the limit it is exact for, and the image path through the dense matrix of an image operator."""
import pytest
import torch

from aps.errors import ApsError
from aps.operators import InpaintBox, MatrixOperator
from aps.priors import GaussianMixturePrior
from aps.operators.base import Operator
from aps.priors.base import Prior
from aps.schedules import DiscreteSchedule
from aps.solvers import DDRM
from aps.solvers.ddrm import spectral
from aps.solvers.dps import vp_time_grid


pytestmark = pytest.mark.usefixtures("one_thread")


class EpsOnly(Prior):
    """A prior seen through eps alone (as a network is): DDRM takes the generic VP-denoiser path."""

    def __init__(self, prior, schedule):
        super().__init__()
        self.inner, self.schedule, self.event_shape = prior, schedule, prior.event_shape
        prior.schedule = schedule

    def eps(self, x_t, t):
        return self.inner.eps(x_t, t)


def ddpm_schedule(n=200):
    betas = torch.linspace(1e-4, 0.04, n, dtype=torch.float64)
    return DiscreteSchedule(torch.cumprod(1 - betas, 0))


def problem(d=4, dy=2, sigma_y=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 2 * torch.randn(1, d, generator=g)
    prior = GaussianMixturePrior(mu, torch.ones(1), torch.ones(1))  # N(mu, I): one component, unit variance
    a = torch.randn(dy, d, generator=g)
    return prior, MatrixOperator(a, sigma_y), g


def reference_moments(prior, operator, y, eta, eta_b, steps):
    """Mean and variance of DDRM's output per spectral coordinate for a N(mu, I) prior, by the paper's eq. 8:
    every update is affine in x_bar with independent noise, so both follow in closed form, coordinate by coordinate."""
    u, s, vt = spectral(operator)
    r = s.numel()
    mu_bar = vt @ prior.means[0].double()
    y_bar = (u.T @ y.double())[:r] / s
    c = operator.sigma_y / s
    alphas, sig_vp = prior.schedule.alpha_sigma(vp_time_grid(prior.schedule, steps))
    sig = (sig_vp / alphas).tolist() + [0.0]
    mean, var = torch.zeros_like(mu_bar), torch.full_like(mu_bar, sig[0] ** 2)
    seen = c < sig[0]
    mean[:r][seen], var[:r][seen] = y_bar[seen], sig[0] ** 2 - c[seen] ** 2
    k0 = 1 - eta ** 2
    for i, s_t in enumerate(sig[:-1]):
        k = 1 / (1 + s_t ** 2)  # D(x; s) = k x + (1 - k) mu for a unit-variance Gaussian
        x0_mean, x0_var = k * mean + (1 - k) * mu_bar, k ** 2 * var
        s_n = sig[i + 1]
        if s_n == 0:
            return x0_mean, x0_var, r
        f = k0 ** 0.5 * s_n / s_t
        new_mean, new_var = x0_mean + f * (mean - x0_mean), (k + f * (1 - k)) ** 2 * var + eta ** 2 * s_n ** 2
        for j in range(r):
            if s_n < c[j]:
                g = k0 ** 0.5 * s_n / c[j]
                new_mean[j] = x0_mean[j] + g * (y_bar[j] - x0_mean[j])
                new_var[j] = ((1 - g) * k) ** 2 * var[j] + eta ** 2 * s_n ** 2
            else:
                new_mean[j] = (1 - eta_b) * x0_mean[j] + eta_b * y_bar[j]
                new_var[j] = ((1 - eta_b) * k) ** 2 * var[j] + s_n ** 2 - eta_b ** 2 * c[j] ** 2
        mean, var = new_mean, new_var
    raise AssertionError("the grid must end at sigma = 0")


@pytest.mark.parametrize("eta,eta_b", [(0.85, 1.0), (0.3, 0.6)])
def test_ddrm_follows_the_papers_update_per_spectral_coordinate(float64, eta, eta_b):
    prior, op, g = problem(sigma_y=0.4)
    y = op.measure(prior.sample(1, g), g)
    n, steps = 20_000, 30
    x = DDRM(eta=eta, eta_b=eta_b, steps=steps).sample(prior, op, y, n, g)[0]  # (n, d)
    _, _, vt = spectral(op)
    x_bar = x @ vt.T
    mean, var, r = reference_moments(prior, op, y[0], eta, eta_b, steps)
    # the noisy measurement is seen (c < sigma_T) and both regimes occur: noisier than y, then less noisy
    assert r == 2
    se = (var / n).sqrt()
    assert ((x_bar.mean(0) - mean).abs() < 5 * se + 1e-9).all(), (x_bar.mean(0), mean, se)
    torch.testing.assert_close(x_bar.var(0), var, rtol=0.06, atol=1e-6)


@pytest.mark.parametrize("generic", [False, True], ids=["mixture-denoiser", "eps-only-ddpm"])
def test_ddrm_gives_the_exact_posterior_of_a_gaussian_with_noiseless_y(float64, generic):
    # N(mu, I) and sigma_y -> 0: the observed spectral coordinates are pinned to y_bar and the missing ones
    # keep the prior's mean, which DDRM's updates reproduce (its spread in the missing directions is not
    # the prior's: 0.72 of it at 40 steps, eta = 0.85, as the recursion above says).
    prior, op, g = problem(d=5, dy=2, sigma_y=1e-3, seed=1)
    y = op.measure(prior.sample(2, g), g)
    post = prior.posterior(op, y)
    solver_prior = EpsOnly(prior, ddpm_schedule()) if generic else prior
    n = 8_000
    x = DDRM(steps=40).sample(solver_prior, op, y, n, g)  # (2, n, d)
    assert x.shape == (2, n, 5)
    se = (torch.diagonal(post.covs[0]) / n).sqrt()
    _, _, vt = spectral(op)
    for b in range(2):
        assert ((x[b].mean(0) - post.means[b, 0]).abs() < 5 * se + 5e-3).all()
        assert (x[b] @ vt[:2].T).var(0).max() < 1e-3  # spread where y pins x: the last sigma^2 (DDPM: 1e-4)


def test_ddrm_on_an_image_operator_keeps_the_observed_pixels():
    # A box inpainting on 8x8 images with a (random) network prior: A is built from the identity basis; its
    # masked rows are zero singular values (missing). With sigma_y small the observed pixels come back as y.
    from test_solvers import tiny_diffusers_prior

    torch.manual_seed(0)
    prior = tiny_diffusers_prior()
    op = InpaintBox((1, 8, 8), sigma_y=1e-3)
    x_true = torch.rand(2, 1, 8, 8) * 2 - 1
    y = op.measure(x_true, torch.Generator().manual_seed(1))
    solver = DDRM(steps=10)
    x = solver.sample(prior, op, y, 3, torch.Generator().manual_seed(2))
    assert x.shape == (2, 3, 1, 8, 8) and torch.isfinite(x).all()
    assert solver.stats["eps_fwd"] == 10 and solver.stats["nfe"] == 10
    seen = op.mask.bool().flatten()
    diff = (x.flatten(2) - y[:, :1].flatten(1)[:, None]).abs()  # (2, 3, 64); y[:, 1] is the mask
    assert diff[..., seen].max() < 0.05, diff[..., seen].max()
    assert diff[..., ~seen].max() > 0.05  # the box is filled in, not copied from y


def test_ddrm_refuses_bad_input():
    with pytest.raises(ApsError, match="eta"):
        DDRM(eta=1.5)
    prior, _, _ = problem()

    class Square(Operator):
        name, x_shape, y_shape, sigma_y = "square", (4,), (4,), 0.1

        def forward(self, x):
            return x ** 2

    with pytest.raises(ApsError, match="linear operator"):
        DDRM().sample(prior, Square(), torch.zeros(1, 4), 2)
