"""ConditionalGlow: shapes, invertibility, log-det against autograd, gradients, config round-trip, size."""
import doctest
import json

import pytest
import torch

from aps.checkpoint import build_flow
from aps.errors import ApsError
from aps.flows.base import ConditionalFlow, standard_normal_log_prob
from aps.flows.image import ConditionalGlow

EVENT = (1, 8, 8)
SMALL = dict(levels=2, steps_per_level=2, hidden_channels=16, cond_channels=8)
# name -> (y_kind, y_shape, extra constructor arguments)
CASES = {
    "image": ("image", (2, 8, 8), {}),
    "small_image": ("small_image", (1, 4, 4), {}),
    "vector": ("vector", (12,), {}),
    "vector_backprojection": ("vector", (12,), dict(extra_channels=1)),
    "class": ("class", (), dict(n_classes=10)),
    "class_template": ("class", (), dict(n_classes=10, class_template=True)),
    "color_3_levels": ("image", (3, 8, 8), dict(levels=3)),
    "encoder_blocks": ("small_image", (1, 4, 4), dict(encoder_blocks=1)),
    "color_encoder_blocks_3_levels": ("image", (3, 8, 8), dict(levels=3, encoder_blocks=2)),
    "residual_attention": ("image", (2, 8, 8), dict(coupling_blocks=2, attention_levels=1)),
    "color_attention_all_levels": ("vector", (12,), dict(levels=3, attention_levels=3, encoder_blocks=1)),
    "tarflow": ("image", (2, 8, 8), dict(tarflow_blocks=2, tarflow_width=16, tarflow_layers=2)),  # 4 tokens of 16
    "color_tarflow_1_level": ("small_image", (3, 4, 4), dict(levels=1, tarflow_blocks=2, tarflow_width=8,
                                                             tarflow_layers=1)),  # 16 tokens of 12
    "class_template_tarflow": ("class", (), dict(n_classes=10, class_template=True, tarflow_blocks=1, tarflow_width=8)),
}
A = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))


def make_flow(name, perturb=True, dtype=torch.float32):
    kind, y_shape, extra = CASES[name]
    event = (3, 8, 8) if name.startswith("color") else EVENT
    torch.manual_seed(0)
    flow = ConditionalGlow(event, y_shape, kind, **{**SMALL, **extra}).to(dtype)
    if extra.get("extra_channels"):
        flow.backprojection = lambda y: (y @ A.to(y.dtype)).view(-1, 1, 8, 8)  # A^T y as an image
    if perturb:
        # move off the zero-initialised coupling outputs and the identity ActNorms, so every
        # parameter matters and the flow is not linear
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.03 * torch.randn_like(p))
    return flow


def make_y(name, b, dtype=torch.float32):
    kind, y_shape, _ = CASES[name]
    g = torch.Generator().manual_seed(2)
    if kind == "class":
        return torch.randint(0, 10, (b,), generator=g)
    return torch.randn(b, *y_shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", CASES)
def test_sample_shapes(name):
    flow = make_flow(name)
    x, log_q = flow.sample(make_y(name, 3), n=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 5, *flow.event_shape) and log_q.shape == (3, 5)
    assert torch.isfinite(x).all() and torch.isfinite(log_q).all()


@pytest.mark.parametrize("name", CASES)
def test_invertible(name):
    flow = make_flow(name)
    y = make_y(name, 3)
    z = torch.randn(3 * 4, *flow.event_shape)
    with torch.no_grad():
        x, log_q = flow(z, y)
        # context once per y (broadcast over the 4 samples) and repeated: both must invert
        z_back, log_det_inv = flow.nf.inverse_and_log_det(x, context=flow.encode(y))
        z_rep = flow.nf.inverse(x, context=flow.encode(y.repeat_interleave(4, 0)))
    assert (z_back - z).abs().max() < 1e-4
    assert (z_rep - z).abs().max() < 1e-4
    torch.testing.assert_close(standard_normal_log_prob(z) + log_det_inv, log_q, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_log_q_equals_log_prob(name):
    flow = make_flow(name)
    y = make_y(name, 3)
    with torch.no_grad():
        x, log_q = flow.sample(y, n=4)
        log_p = flow.log_prob(x.flatten(0, 1), y.repeat_interleave(4, 0))
    torch.testing.assert_close(log_p, log_q.flatten(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_broadcast_context_equals_repeated_context(name):
    flow = make_flow(name)
    y, z = make_y(name, 3), torch.randn(3 * 4, *flow.event_shape)
    with torch.no_grad():
        x, log_q = flow(z, y)
        x_rep, log_q_rep = ConditionalFlow.forward(flow, z, y)  # the interface's repeat_interleave
    torch.testing.assert_close(x, x_rep)
    torch.testing.assert_close(log_q, log_q_rep)


@pytest.mark.parametrize("name", CASES)
def test_log_det_against_jacobian(name, float64):
    flow = make_flow(name, dtype=torch.float64)
    y = make_y(name, 1, dtype=torch.float64)
    z = torch.randn(1, *flow.event_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(z), y)[0].flatten(), z.flatten())
    log_det_autograd = torch.linalg.slogdet(jac)[1]
    with torch.no_grad():
        _, log_q = flow(z, y)
    log_det = standard_normal_log_prob(z) - log_q
    # float64 default dtype (fixture): normflows sums the layers' log-dets into a default-dtype tensor
    torch.testing.assert_close(log_det[0], log_det_autograd, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_parameter(name):
    flow = make_flow(name)
    x, log_q = flow.sample(make_y(name, 4), n=2)
    (x.pow(2).mean() + log_q.mean()).backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", CASES)
def test_config_round_trip(name):
    flow = make_flow(name)
    config = json.loads(json.dumps(flow.config()))
    rebuilt = build_flow(config)  # the checkpoint loader's path
    assert type(rebuilt) is ConditionalGlow
    rebuilt.load_state_dict(flow.state_dict())
    rebuilt.backprojection = flow.backprojection
    assert rebuilt.config() == flow.config()
    y, z = make_y(name, 2), torch.randn(6, *flow.event_shape)
    with torch.no_grad():
        for a, b in zip(flow(z, y), rebuilt(z, y)):
            assert torch.equal(a, b)


def test_starts_as_a_rotation():
    flow = make_flow("image", perturb=False)
    z = torch.randn(5, *EVENT)
    with torch.no_grad():
        x, log_q = flow(z, make_y("image", 5))
    torch.testing.assert_close(log_q, standard_normal_log_prob(z))
    torch.testing.assert_close(x.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1))


def test_class_template_starts_as_the_class_gaussian():
    """Started from class statistics, q(x | c) is exactly N(mean_c, diag max(std_c, 0.05)^2): the Glow is a rotation."""
    flow = make_flow("class_template", perturb=False)
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(10, *EVENT, generator=g), torch.rand(10, *EVENT, generator=g)
    flow.init_class_template(mean, std)
    y = torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        x, log_q = flow.sample(y, n=500, generator=g)
    m, s = mean[y][:, None], std[y].clamp_min(0.05)[:, None]
    exact = torch.distributions.Normal(m, s).log_prob(x).flatten(2).sum(2)
    torch.testing.assert_close(log_q, exact, atol=1e-3, rtol=1e-5)
    # and the samples have those moments (500 per class: a few standard errors)
    assert (x.mean(1) - m[:, 0]).abs().div(s[:, 0]).max() < 0.3
    assert (x.std(1) / s[:, 0]).sub(1).abs().max() < 0.25
    assert torch.equal(flow.encoder.lift.weight, mean.mean(1).flatten(1))
    with pytest.raises(ApsError, match="shape"):
        flow.init_class_template(mean[:3], std[:3])
    with pytest.raises(ApsError, match="without class_template"):
        make_flow("class").init_class_template(mean, std)


@pytest.mark.parametrize("name", ["image", "residual_attention", "tarflow"])
def test_bf16_autocast_keeps_the_stream_fp32(name):
    flow = make_flow(name)
    y, z = make_y(name, 2), torch.randn(4, *EVENT)
    with torch.no_grad():
        x32, log_q32 = flow(z, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x16, log_q16 = flow(z, y)
    assert x16.dtype == torch.float32 and log_q16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    assert (x16 - x32).abs().max() < 0.1 and (log_q16 - log_q32).abs().max() < 1.0


def test_default_config_is_small():
    # the image kind is the smallest encoder, a vector of 256 the largest (a 256 x 1024 linear lift)
    for kind, y_shape in [("image", (2, 32, 32)), ("vector", (256,))]:
        flow = ConditionalGlow((1, 32, 32), y_shape, kind)
        assert sum(p.numel() for p in flow.parameters()) < 5_000_000
    with torch.no_grad():
        x, _ = flow.sample(torch.randn(1, 256), n=2)
    assert x.shape == (1, 2, 1, 32, 32)


def test_docstring_example():
    import aps.flows.image

    assert doctest.testmod(aps.flows.image).failed == 0


def test_bad_arguments():
    with pytest.raises(ApsError):
        ConditionalGlow((1, 8, 8), (1, 8, 8), "wavelet")
    with pytest.raises(ApsError):
        ConditionalGlow((1, 12, 12), (1, 12, 12), "image", levels=3)
    with pytest.raises(ApsError):
        ConditionalGlow((1, 8, 8), (1, 3, 3), "small_image", levels=2)
    with pytest.raises(ApsError, match="class_template needs y_kind 'class'"):
        ConditionalGlow((1, 8, 8), (1, 8, 8), "image", levels=2, class_template=True)
    flow = make_flow("vector_backprojection")
    flow.backprojection = None
    with pytest.raises(ApsError):
        flow.sample(make_y("vector", 1), n=1)
    with pytest.raises(ApsError):
        make_flow("image").sample(torch.randn(1, 1, 8, 8), n=1)


def test_checkpoint_save_and_load(tmp_path):
    from aps.checkpoint import load_flow, save_checkpoint

    flow = make_flow("class")
    save_checkpoint(tmp_path, flow, task={}, train={}, step=0)
    loaded, _ = load_flow(tmp_path)
    y, z = make_y("class", 2), torch.randn(4, *EVENT)
    with torch.no_grad():
        assert torch.equal(flow(z, y)[0], loaded(z, y)[0])


def test_encoder_top_down_path_sees_all_of_y():
    """With encoder blocks, the finest map at one corner depends on y at the far corner (the plain pyramid's does not)."""
    for blocks, far in ((0, False), (1, True)):
        torch.manual_seed(0)
        flow = ConditionalGlow((1, 32, 32), (1, 32, 32), "image", levels=3, steps_per_level=1, hidden_channels=8,
                               cond_channels=8, encoder_blocks=blocks)
        y = torch.randn(1, 1, 32, 32, requires_grad=True)
        flow.encode(y)[0][0, :, 0, 0].sum().backward()  # map of level 0 (16x16), top-left pixel
        assert (y.grad[0, 0, -4:, -4:].abs().sum() > 0) == far


def test_default_config_records_no_new_options():
    """Flows built at the defaults write the same config as before the options existed (old checkpoints load)."""
    config = ConditionalGlow((1, 8, 8), (1, 8, 8), "image", levels=2).config()
    assert set(config) == {"type", "event_shape", "y_shape", "y_kind", "levels", "steps_per_level", "hidden_channels",
                           "cond_channels", "clamp", "n_classes", "extra_channels"}


@pytest.mark.parametrize("reverse", [False, True])
def test_tarflow_block_is_autoregressive_over_tokens(reverse):
    """dx_t/dz_s = 0 for tokens s after t in the block's order: the block Jacobian is triangular (lower, or upper reversed)."""
    from aps.flows.tarflow import ConditionalTarFlowBlock

    torch.manual_seed(0)
    block = ConditionalTarFlowBlock(3, 5, (2, 3), width=8, layers=2, clamp=2.0, level=0, reverse=reverse)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context = (torch.randn(1, 5, 2, 3),)
    z = torch.randn(1, 3, 2, 3)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view_as(z), context)[0].flatten(), z.flatten())
    # raster position p of pixel (i, j) is i * 3 + j; values flatten as (channel, position)
    jac = jac.view(3, 6, 3, 6).abs().sum((0, 2))  # (position of x, position of z)
    later = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    assert jac[later.T if reverse else later].max() == 0
    assert jac[~(later.T if reverse else later)].min() > 0  # and it does depend on every earlier token
