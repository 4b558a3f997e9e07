"""The vector flow: invertible, exact log-det, gradients everywhere, save/load."""
import torch

from aps.checkpoint import load_flow, save_checkpoint
from aps.flows.vector import ConditionalVectorFlow
from aps.problems import mcgdiff_problem


def fitted_flow(d=3, dy=2, layers=3):
    pb = mcgdiff_problem(d, dy, seed=0)
    flow = ConditionalVectorFlow(d, dy, n_layers=layers, hidden=16, bins=6)
    mean, cov = pb.prior.moments()
    flow.frame.fit(mean, cov, pb.operator.A, pb.operator.sigma_y)
    return pb, flow


def test_sample_log_q_equals_log_prob_and_inverts(float64):
    pb, flow = fitted_flow()
    y = pb.operator.measure(pb.prior.sample(5))
    x, log_q = flow.sample(y, 7)
    assert x.shape == (5, 7, 3) and log_q.shape == (5, 7)
    lp = flow.log_prob(x.reshape(35, 3), y.repeat_interleave(7, 0))
    assert torch.allclose(lp, log_q.reshape(35), atol=1e-8)
    z, _ = flow.nf.inverse_and_log_det(x.reshape(35, 3), flow.encode(y.repeat_interleave(7, 0)))
    x2, _ = flow(z, y)
    assert torch.allclose(x2, x.reshape(35, 3), atol=1e-8)


def test_log_det_matches_the_autograd_jacobian(float64):
    _, flow = fitted_flow()
    y = torch.randn(1, 2)
    z = torch.randn(1, 3)
    _, log_q = flow(z, y)
    jac = torch.autograd.functional.jacobian(lambda zz: flow(zz[None], y)[0][0], z[0])
    log_n = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    assert torch.allclose(log_q[0], log_n - torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


def test_every_parameter_gets_a_gradient():
    pb, flow = fitted_flow()
    y = pb.operator.measure(pb.prior.sample(16)).float()
    x, log_q = flow.sample(y, 2)
    (x.pow(2).sum() + log_q.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_checkpoint_round_trip(tmp_path):
    pb, flow = fitted_flow()
    save_checkpoint(tmp_path, flow, {"kind": "mixture"}, {}, step=3)
    flow2, meta = load_flow(tmp_path)
    assert meta["step"] == 3
    y = torch.randn(4, 2)
    z = torch.randn(4, 3)
    assert torch.allclose(flow.eval()(z, y)[0], flow2(z, y)[0])


def test_fourier_context_flow_is_a_density_and_round_trips(tmp_path):
    """--flow-fourier: the context gains sin/cos features of y; log q of a sample equals log_prob, and
    the fixed frequencies travel with the checkpoint."""
    from aps.checkpoint import load_flow, save_checkpoint
    from aps.flows.vector import ConditionalVectorFlow

    torch.manual_seed(0)
    flow = ConditionalVectorFlow(2, 1, n_layers=2, hidden=16, fourier=4, fourier_scale=5.0)
    assert flow.encode(torch.zeros(3, 1)).shape == (3, 1 + 2 * 4)
    y = torch.randn(3, 1)
    x, log_q = flow.sample(y, 5)
    torch.testing.assert_close(flow.log_prob(x.flatten(0, 1), y.repeat_interleave(5, 0)), log_q.flatten(),
                               atol=1e-4, rtol=1e-4)
    # features of y reach the couplings: nearby y give different samples from the same z
    z = torch.randn(1, 2)
    x1, _ = flow(z, torch.tensor([[0.0]]))
    x2, _ = flow(z, torch.tensor([[0.1]]))
    assert not torch.allclose(x1, x2)
    save_checkpoint(tmp_path / "f", flow, task={}, train={}, step=0)
    loaded, _ = load_flow(tmp_path / "f")
    torch.testing.assert_close(loaded.freqs, flow.freqs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, y[:1])[0], flow(z, y[:1])[0])
