"""The conditional Gaussian-mixture base of the vector flow: exact log q, unbiased stratified
expectations, gradients into the weights, seeded sampling, save/load and a train.py run."""
import json
import math

import pytest
import torch

from aps import objective
from aps.checkpoint import load_flow, save_checkpoint
from aps.flows.mixture_base import ConditionalGaussianMixture
from aps.flows.vector import ConditionalVectorFlow
from aps.problems import mcgdiff_problem
from aps.sampling import PosteriorSampler
from cli_helpers import run

K = 4


def mixture_flow(d=2, dy=1, layers=2, seed=0):
    """A flow with a K-component base whose weights, means and scales depend on y and a non-trivial spline warp."""
    torch.manual_seed(seed)
    flow = ConditionalVectorFlow(d, dy, n_layers=layers, hidden=16, bins=6, tail_bound=4.0, base_components=K)
    with torch.no_grad():
        for p in flow.parameters():  # move everything off its (near-identity, y-independent) initialisation
            p.add_(0.15 * torch.randn_like(p))
        flow.mixture_base.net[-1].weight.mul_(0.5)
        flow.mixture_base._set_bias(torch.tensor([1.5, -1.0, 0.0, 0.5]),  # clearly unequal weights
                                    torch.tensor([[-2.5, 0.0], [0.0, 2.0], [2.0, -1.0], [0.5, 0.5]])[:, :d],
                                    torch.tensor([-0.5, -1.0, -0.3, -0.7])[:, None].expand(K, d))
    return flow


def reference_log_q(flow, x, y):
    """log q(x | y) by the change of variables, computed independently of the flow's log_prob:
    z by inversion, q0 by torch.distributions, log|det dx/dz| by the autograd Jacobian."""
    out = []
    for xi, yi in zip(x, y):
        z, _ = flow.nf.inverse_and_log_det(xi[None], flow.encode(yi[None]))
        jac = torch.autograd.functional.jacobian(lambda zz: flow(zz[None], yi[None])[0][0], z[0])
        log_w, mu, log_s = flow.mixture_base.params(flow.encode(yi[None]))
        q0 = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=log_w[0]),
            torch.distributions.Independent(torch.distributions.Normal(mu[0], log_s[0].exp()), 1))
        out.append(q0.log_prob(z[0]) - torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def test_log_q_is_the_change_of_variables_of_the_full_mixture(float64):
    flow = mixture_flow()
    y = torch.randn(3, 1)
    x, log_q = flow.sample(y, 4)
    x, y_rep = x.flatten(0, 1), y.repeat_interleave(4, 0)
    ref = reference_log_q(flow, x, y_rep)
    torch.testing.assert_close(flow.log_prob(x, y_rep), ref, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(log_q.flatten(), ref, atol=1e-8, rtol=1e-8)
    # the stratified draws carry the same exact density
    xw, log_qw, _ = flow.sample_weighted(y[:1], 8)
    torch.testing.assert_close(log_qw[0], reference_log_q(flow, xw[0], y[:1].expand(len(xw[0]), 1)), atol=1e-8, rtol=1e-8)


def test_q_integrates_to_one_on_a_grid(float64):
    flow = mixture_flow()
    for y in (torch.tensor([[0.0]]), torch.tensor([[1.3]])):
        h = 0.04
        axis = torch.arange(-12.0, 12.0, h) + h / 2
        grid = torch.cartesian_prod(axis, axis)  # (N, 2)
        with torch.no_grad():
            mass = flow.log_prob(grid, y.expand(len(grid), 1)).exp().sum() * h * h
            # the grid must hold (almost) all of q: check with samples
            x, _ = flow.sample(y, 4000)
        inside = (x.abs() < 12).all(-1).double().mean()
        assert float(inside) > 0.999
        assert float(mass) == pytest.approx(1.0, abs=0.01)


def test_stratified_weighted_mean_is_unbiased(float64):
    flow = mixture_flow()
    y = torch.tensor([[0.7], [-0.4]])

    def f(x):
        return torch.sin(x[..., 0]) + 0.1 * x[..., 1] ** 2  # (B, n)

    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x, _ = flow.sample(y, 200_000, generator=g)  # ancestral: i.i.d. draws of q
        exact, se_exact = f(x).mean(1), f(x).std(1) / math.sqrt(x.shape[1])
        estimates = []
        for _ in range(2000):
            xw, _, w = flow.sample_weighted(y, K, generator=g)  # one draw per component
            assert xw.shape == (2, K, 2) and torch.allclose(w.sum(1), torch.ones(2))
            estimates.append(objective.expectation(f(xw), w))
        est = torch.stack(estimates)  # (R, B)
        unweighted = torch.stack([f(flow.sample_weighted(y, K, generator=g)[0]).mean(1) for _ in range(2000)])
    se = (est.std(0) ** 2 / len(est) + se_exact ** 2).sqrt()
    assert (est.mean(0) - exact).abs().max() < 4 * se.max(), (est.mean(0), exact, se)
    # the weights matter: a plain mean over the strata estimates something else here
    assert (unweighted.mean(0) - exact).abs().max() > 10 * se.max()


def test_the_loss_reaches_the_mixture_weights_and_every_parameter():
    pb = mcgdiff_problem(2, 1, seed=0)
    flow = mixture_flow()
    mean, cov = pb.prior.moments()
    flow.frame.fit(mean, cov, pb.operator.A, pb.operator.sigma_y)
    y = pb.operator.measure(pb.prior.sample(8)).float()
    terms = objective.aps_terms(flow, pb.prior, pb.operator, y, n_z=K, exact_prior=True)
    assert terms["x"].shape == (8, K, 2) and terms["weight"].shape == (8, K)
    objective.expectation(objective.aps_loss(terms, beta=0.5), terms["weight"]).mean().backward()
    bias_grad = flow.mixture_base.net[-1].bias.grad
    assert bias_grad[:K].abs().min() > 0  # every logit
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_standard_normal_base_is_unchanged():
    flow = ConditionalVectorFlow(2, 1, n_layers=2, hidden=16, bins=6)
    assert flow.mixture_base is None and flow.config()["base_components"] == 0
    y = torch.randn(3, 1)
    x, log_q = flow.sample(y, 5, generator=torch.Generator().manual_seed(1))
    x2, log_q2 = flow(torch.randn(15, 2, generator=torch.Generator().manual_seed(1)), y)
    torch.testing.assert_close(x, x2.reshape(3, 5, 2))
    xw, _, w = flow.sample_weighted(y, 5)
    assert xw.shape == (3, 5, 2) and torch.allclose(w, torch.full((3, 5), 0.2))


def test_fit_spreads_the_components_over_the_samples():
    flow = ConditionalVectorFlow(2, 1, n_layers=1, hidden=8, bins=4, base_components=3)
    centres = torch.tensor([[-6.0, 0.0], [0.0, 5.0], [6.0, 0.0]])
    u = (centres[:, None] + 0.3 * torch.randn(3, 500, 2)).flatten(0, 1)
    flow.mixture_base.fit(u, generator=torch.Generator().manual_seed(0))
    log_w, mu, log_s = flow.mixture_base.params(torch.zeros(1, 1))
    found = mu[0][torch.cdist(centres, mu[0]).argmin(1)]
    assert torch.allclose(found, centres, atol=0.1)
    assert torch.allclose(log_w.exp(), torch.full((1, 3), 1 / 3))
    assert torch.allclose(log_s.exp(), torch.full((1, 3, 2), 0.3), atol=0.05)


def test_checkpoint_round_trip_and_seeded_sampling(tmp_path):
    pb = mcgdiff_problem(2, 1, seed=0)
    flow = mixture_flow()
    save_checkpoint(tmp_path, flow, {"kind": "mixture"}, {}, step=1)
    flow2, meta = load_flow(tmp_path)
    assert meta["flow"]["base_components"] == K and flow2.mixture_base is not None
    y = torch.randn(3, 1)
    s1 = PosteriorSampler(flow.eval(), pb.operator).sample(y, 50, seed=3)
    s2 = PosteriorSampler(flow2, pb.operator).sample(y, 50, seed=3)
    torch.testing.assert_close(s1, s2)
    # measurement i gets the same samples whatever else is in the batch
    s3 = PosteriorSampler(flow2, pb.operator).sample(y[2:], 50, seed=3, first_index=2)
    torch.testing.assert_close(s3[0][0], s1[0][2])


def test_train_py_with_a_mixture_base(tmp_path):
    import aps

    out = tmp_path / "flow"
    proc = run("train.py", "--mcgdiff", "2,1,0", "--out", out, "--flow-base-components", K, "--steps", "6",
               "--batch-size", "16", "--n-z", "2", "--n-elbo", "2", "--flow-layers", "2", "--flow-hidden", "16",
               "--fkl-weight", "1", "--checkpoint-every", "3", "--log-every", "3", "--cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "config.json").read_text())
    assert meta["flow"]["base_components"] == K and meta["train"]["flow"]["flow_base_components"] == K
    x, log_q = aps.load(out).sample(torch.tensor([[0.5], [-1.0]]), 20)
    assert x.shape == (2, 20, 2) and torch.isfinite(log_q).all()


# -- the gated base (Gaussian mixture regression): full-covariance components, a Gaussian gate on y, means linear in y

def gated_flow(d=2, dy=1, seed=0):
    """A flow with a gated K-component base, every gate/slope/mixing parameter moved off its initial value."""
    torch.manual_seed(seed)
    flow = ConditionalVectorFlow(d, dy, n_layers=2, hidden=16, bins=6, tail_bound=4.0, base_components=K, base_gate=True)
    base = flow.mixture_base
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.15 * torch.randn_like(p))
        base.gate_centre.copy_(torch.randn(K, dy))
        base.gate_log_width.fill_(-0.3)
        base.slope.copy_(torch.randn(K, d, dy))
        base.mix.copy_(0.8 * torch.randn(K, d, d))
    return flow


def test_gated_base_log_q_is_the_change_of_variables(float64):
    flow = gated_flow()
    base = flow.mixture_base
    y = torch.randn(3, 1)
    x, log_q = flow.sample(y, 4)
    x, y_rep = x.flatten(0, 1), y.repeat_interleave(4, 0)
    # independent reference: z by inversion, q0 as torch's full-covariance mixture, log-det by autograd
    ref = []
    for xi, yi in zip(x, y_rep):
        z, _ = flow.nf.inverse_and_log_det(xi[None], flow.encode(yi[None]))
        jac = torch.autograd.functional.jacobian(lambda zz: flow(zz[None], yi[None])[0][0], z[0])
        log_w, mu, log_s = base.params(flow.encode(yi[None]))
        tril = (torch.tril(base.mix, -1) + torch.eye(2)) * log_s[0].exp()[:, None, :]  # (I + N_k) diag(s_k)
        q0 = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=log_w[0]),
            torch.distributions.MultivariateNormal(mu[0], scale_tril=tril))
        ref.append(q0.log_prob(z[0]) - torch.linalg.slogdet(jac).logabsdet)
    ref = torch.stack(ref)
    torch.testing.assert_close(flow.log_prob(x, y_rep), ref, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(log_q.flatten(), ref, atol=1e-8, rtol=1e-8)
    xw, log_qw, w = flow.sample_weighted(y[:1], K)  # stratified draws: the same density, weights from the gate
    torch.testing.assert_close(log_qw[0], flow.log_prob(xw[0], y[:1].expand(K, 1)), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(w[0], base.params(flow.encode(y[:1]))[0][0].exp() / 1, atol=1e-12, rtol=0)


def test_gated_base_draws_follow_its_density(float64):
    """Ancestral draws of the full-covariance components match q0's own mean and covariance per component."""
    flow = gated_flow()
    base = flow.mixture_base
    ctx = flow.encode(torch.tensor([[0.4]]))
    with torch.no_grad():
        z = base.sample_ancestral(ctx, 200_000, generator=torch.Generator().manual_seed(0))
        log_w, mu, log_s = base.params(ctx)
        tril = (torch.tril(base.mix, -1) + torch.eye(2)) * log_s[0].exp()[:, None, :]
        cov = tril @ tril.transpose(1, 2)
        w = log_w[0].exp()
        mean = (w[:, None] * mu[0]).sum(0)
        second = (w[:, None, None] * (cov + mu[0][:, :, None] * mu[0][:, None, :])).sum(0)
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), second - mean[:, None] * mean[None], atol=0.06, rtol=0.02)


def test_gated_fit_recovers_a_joint_gaussian_mixture(float64):
    """Fitted to draws of a known joint mixture over (z, y), the gated base's q0(z | y) is that mixture's conditional."""
    g = torch.Generator().manual_seed(0)
    k, d = 3, 2
    pi = torch.tensor([0.5, 0.3, 0.2])
    mean = torch.tensor([[-4.0, 0.0, -1.0], [0.0, 3.0, 0.0], [4.0, -1.0, 1.0]])  # (K, d + dy): (z, y)
    chol = torch.tensor([[[1.0, 0, 0], [0.4, 0.5, 0], [0.3, 0, 0.3]],
                         [[0.6, 0, 0], [-0.2, 0.8, 0], [0, 0.2, 0.4]],
                         [[0.5, 0, 0], [0.1, 0.3, 0], [-0.2, 0.1, 0.35]]])
    joint = torch.distributions.MultivariateNormal(mean, scale_tril=chol)
    comp = torch.multinomial(pi, 20_000, replacement=True, generator=g)
    torch.manual_seed(1)
    pts = joint.sample((20_000,))[torch.arange(20_000), comp]  # (N, 3)
    base = ConditionalGaussianMixture(d, 1, k, hidden=8, gate_dim=1)
    base.fit(pts[:, :d], y=pts[:, d:], generator=torch.Generator().manual_seed(0))
    # the exact conditional density of the joint mixture at test points
    test = joint.sample((50,))[torch.arange(50), torch.multinomial(pi, 50, replacement=True, generator=g)]
    z, y = test[:, :d], test[:, d:]
    log_joint = torch.logsumexp(pi.log() + joint.log_prob(test[:, None, :]), 1)
    y_marg = torch.distributions.Normal(mean[:, d], (chol[:, d] ** 2).sum(-1).sqrt())
    log_y = torch.logsumexp(pi.log() + y_marg.log_prob(y), 1)
    with torch.no_grad():
        fitted = base.log_prob(z, y)
    err = (fitted - (log_joint - log_y)).abs()  # sampling error of a fit to 20k draws: a few hundredths
    assert err.mean() < 0.05 and err.max() < 0.25, err


def test_gated_checkpoint_round_trip_and_train_py(tmp_path):
    import aps

    flow = gated_flow()
    save_checkpoint(tmp_path / "a", flow, {"kind": "mixture"}, {}, step=1)
    flow2, meta = load_flow(tmp_path / "a")
    assert meta["flow"]["base_gate"] is True
    y = torch.randn(3, 1)
    pb = mcgdiff_problem(2, 1, seed=0)
    torch.testing.assert_close(PosteriorSampler(flow.eval(), pb.operator).sample(y, 30, seed=2),
                               PosteriorSampler(flow2, pb.operator).sample(y, 30, seed=2))
    out = tmp_path / "flow"
    proc = run("train.py", "--mcgdiff", "2,1,0", "--out", out, "--flow-base-components", K, "--flow-base-gate",
               "--steps", "4", "--batch-size", "8", "--n-z", "1", "--n-elbo", "2", "--flow-layers", "1",
               "--flow-hidden", "8", "--fkl-weight", "1", "--checkpoint-every", "4", "--log-every", "2", "--cpu")
    assert proc.returncode == 0, proc.stderr
    x, log_q = aps.load(out).sample(torch.tensor([[0.5]]), 10)
    assert x.shape == (1, 10, 2) and torch.isfinite(log_q).all()
    bad = run("train.py", "--mcgdiff", "2,1,0", "--out", tmp_path / "bad", "--flow-base-gate",
                "--flow-base-components", "0", "--cpu")
    assert bad.returncode == 2 and "needs a mixture base" in bad.stderr and "Traceback" not in bad.stderr
