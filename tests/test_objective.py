"""The APS objective where KL is known in closed form, and where its gradients go."""
import pytest
import torch

from aps import objective
from aps.flows.vector import ConditionalVectorFlow
from aps.operators import MatrixOperator
from aps.priors import GaussianMixturePrior


def gaussian_kl(m1, s1, m2, s2):
    """KL(N(m1, s1) || N(m2, s2)) for full covariances."""
    d = len(m1)
    s2inv = torch.linalg.inv(s2)
    diff = m2 - m1
    return 0.5 * (torch.trace(s2inv @ s1) + diff @ s2inv @ diff - d + torch.logdet(s2) - torch.logdet(s1))


def gaussian_setup():
    g = torch.Generator().manual_seed(0)
    d, dy = 3, 2
    m0, v0 = torch.randn(1, d, generator=g), 0.5 + torch.rand(1, d, generator=g)
    prior = GaussianMixturePrior(m0, torch.ones(1), v0)
    op = MatrixOperator(torch.randn(dy, d, generator=g), 0.3)
    y = op.measure(prior.sample(1, generator=g), g)
    # q(x | y) = N(M y + b, L L^T): a flow of the Gaussian frame alone, deliberately not the posterior
    flow = ConditionalVectorFlow(d, dy, n_layers=0)
    flow.frame.M.copy_(torch.randn(d, dy, generator=g) * 0.3)
    flow.frame.b.copy_(torch.randn(d, generator=g))
    flow.frame.L.copy_(torch.tril(0.2 * torch.randn(d, d, generator=g), -1) + torch.diag(0.3 + torch.rand(d, generator=g)))
    return prior, op, y, flow


def closed_form(prior, op, y, flow):
    """KL(q || p(.|y)) - log p(y), all Gaussian."""
    post = prior.posterior(op, y)
    mq = flow.frame.M @ y[0] + flow.frame.b
    sq = flow.frame.L @ flow.frame.L.T
    kl = gaussian_kl(mq, sq, post.means[0, 0], post.covs[0])
    a, c = op.A, torch.diag(prior.variances[0])
    log_py = torch.distributions.MultivariateNormal(a @ prior.means[0], a @ c @ a.T + op.sigma_y ** 2 * torch.eye(len(y[0]))).log_prob(y[0])
    return kl - log_py


def test_loss_with_exact_prior_is_kl_minus_log_evidence(float64):
    prior, op, y, flow = gaussian_setup()
    torch.manual_seed(0)
    terms = objective.aps_terms(flow, prior, op, y, n_z=200000, exact_prior=True)
    per_sample = objective.aps_loss(terms)
    se = float(per_sample.std() / per_sample.numel() ** 0.5)  # Monte-Carlo standard error
    assert float(per_sample.mean()) == pytest.approx(float(closed_form(prior, op, y, flow)), abs=4 * se)


def test_loss_with_elbo_adds_only_the_elbo_gap(float64):
    """With the exact eps the ELBO is tight, so the ELBO-based loss also lands on KL - log p(y)."""
    prior, op, y, flow = gaussian_setup()
    g = torch.Generator().manual_seed(1)
    terms = objective.aps_terms(flow, prior, op, y, n_z=100000, n_elbo=4, generator=g)
    per_sample = objective.aps_loss(terms)
    se = float(per_sample.std() / per_sample.numel() ** 0.5)
    assert float(per_sample.mean()) == pytest.approx(float(closed_form(prior, op, y, flow)), abs=4 * se + 0.02)


def test_tempering_scales_only_the_target():
    terms = {"nll": torch.tensor([[2.0]]), "prior": torch.tensor([[3.0]]), "log_q": torch.tensor([[-1.0]])}
    assert float(objective.aps_loss(terms, beta=0.5)) == pytest.approx(0.5 * 5.0 - 1.0)


def test_likelihood_weight_scales_only_the_likelihood():
    """beta (w nll + prior) + log_q: the guidance scale w multiplies -log p(y|x) alone, under the tempering."""
    terms = {"nll": torch.tensor([[2.0]]), "prior": torch.tensor([[3.0]]), "log_q": torch.tensor([[-1.0]])}
    assert float(objective.aps_loss(terms, beta=0.5, likelihood_weight=3.0)) == pytest.approx(0.5 * (6.0 + 3.0) - 1.0)
    assert float(objective.aps_loss(terms, likelihood_weight=1.0)) == float(objective.aps_loss(terms))


class FrozenNetPrior(GaussianMixturePrior):
    """The exact mixture eps behind a frozen linear layer (identity): a prior with network weights."""

    def __init__(self, *args):
        super().__init__(*args)
        self.net = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.net.weight.copy_(torch.eye(2))
            self.net.bias.zero_()
        self.requires_grad_(False)

    def eps(self, x_t, t):
        return super().eps(self.net(x_t), t)


def test_gradients_reach_the_flow_through_the_frozen_prior_and_not_the_prior():
    prior = FrozenNetPrior(torch.tensor([[-4.0, 0.0], [4.0, 1.0]]), torch.ones(2), torch.ones(2))
    op = MatrixOperator(torch.tensor([[1.0, 0.5]]), 0.5)
    flow = ConditionalVectorFlow(2, 1, n_layers=2, hidden=16)
    y = op.measure(prior.sample(8))
    terms = objective.aps_terms(flow, prior, op, y, n_z=2, n_elbo=2)
    (objective.aps_loss(terms).mean() + objective.forward_kl(flow, prior.sample(8), y).mean()).backward()
    assert prior.net.weight.grad is None and prior.net.bias.grad is None
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in flow.parameters()) > 0

    # the prior term alone still sends gradient into x through eps_theta
    x = torch.randn(4, 2, requires_grad=True)
    prior.elbo(x, n_draws=4).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_aps_weight_ramp():
    """--aps-weight-start ramps the APS weight to --aps-weight: geometric from a positive start, linear from 0."""
    from aps.config import TrainConfig

    cfg = TrainConfig(mcgdiff="2,1,0", aps_weight=0.1, aps_weight_start=0.001, aps_ramp_frac=0.5).validate()
    assert cfg.aps_weight_at(0.0) == pytest.approx(0.001)
    assert cfg.aps_weight_at(0.25) == pytest.approx(0.01)
    assert cfg.aps_weight_at(0.5) == pytest.approx(0.1) and cfg.aps_weight_at(0.9) == pytest.approx(0.1)
    lin = TrainConfig(mcgdiff="2,1,0", aps_weight=1.0, aps_weight_start=0.0, aps_ramp_frac=0.5)
    assert lin.aps_weight_at(0.25) == pytest.approx(0.5)
    assert TrainConfig(mcgdiff="2,1,0", aps_weight=0.3).aps_weight_at(0.1) == 0.3
