"""Sampling at a temperature T: latents N(0, T^2 I), log_q the tempered sampler's density (against a brute-force
Jacobian), T = 1 the flow itself, bad temperatures and flows with their own base refused, and benchmark.py choosing
T by calibration on the tuning digits; an image flow sampled channels-last."""
import json
import math

import pytest
import torch

from aps.errors import ApsError
from aps.flows.base import standard_normal_log_prob
from aps.sampling import PosteriorSampler
from test_image_flow import make_flow, make_y


class Identity:
    """The least operator a PosteriorSampler needs: y passes its check unchanged."""

    def check_y(self, y):
        return y

    def to(self, device):
        return self


def sampler_of(name="image", dtype=torch.float32):
    return PosteriorSampler(make_flow(name, dtype=dtype), Identity())


def test_tempered_samples_and_log_q_against_the_jacobian(float64):
    s = sampler_of(dtype=torch.float64)
    y = make_y("image", 2, dtype=torch.float64)
    t = 0.7
    x, log_q = s.sample(y, 3, seed=5, temperature=t)
    u = s.latents(1, 3, 5, y[1:2])  # measurement 1's untempered latents
    for j in range(3):
        x_j, _ = s.flow((t * u[j:j + 1]), y[1:2])  # x = G(T u)
        torch.testing.assert_close(x[1, j].float(), x_j[0].float())
        jac = torch.autograd.functional.jacobian(lambda v: s.flow(t * v.view_as(u[j:j + 1]), y[1:2])[0].flatten(),
                                                 u[j].flatten())
        expected = standard_normal_log_prob(u[j:j + 1])[0] - torch.linalg.slogdet(jac)[1]  # log N(u) - log|dx/du|
        torch.testing.assert_close(log_q[1, j].float(), expected.float(), atol=1e-4, rtol=1e-6)  # the sampler returns float32


def test_temperature_one_is_the_flow_and_lower_is_narrower():
    s = sampler_of()
    y = make_y("image", 2)
    x, log_q = s.sample(y, 64, seed=1)
    x1, log_q1 = s.sample(y, 64, seed=1, temperature=1.0)
    assert torch.equal(x, x1) and torch.equal(log_q, log_q1)
    x_cold, log_q_cold = s.sample(y, 64, seed=1, temperature=0.5)
    assert x_cold.std(1).mean() < 0.75 * x.std(1).mean()
    # the same latents, scaled: measurement 0's sample j at T = 0.5 is G(0.5 u_j)
    torch.testing.assert_close(x_cold[0, :4], s.flow(0.5 * s.latents(0, 64, 1, y[:1])[:4], y[:1])[0])
    assert torch.isfinite(log_q_cold).all()


def test_an_image_flow_samples_channels_last_as_it_would_contiguous():
    """The sampler keeps an image flow's convolution weights channels-last (faster); its samples and log_q are the
    contiguous flow's to float rounding, and come back contiguous (safetensors writes only those)."""
    y = make_y("image", 2)
    plain = make_flow("image")
    z = torch.randn(8, *plain.event_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x_ref, log_q_ref = plain(z, y[:1])
    s = sampler_of()
    convs = [p for p in s.flow.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    x, log_q = s._flow(z, y[:1], None)
    assert x.is_contiguous()
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_q, log_q_ref, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("t", [0, -1, math.nan, math.inf])
def test_bad_temperature(t):
    with pytest.raises(ApsError, match="temperature must be a positive number"):
        sampler_of().sample(make_y("image", 1), 4, temperature=t)


def test_a_flow_with_its_own_base_refuses_a_temperature():
    from aps.flows.vector import ConditionalVectorFlow

    plain = PosteriorSampler(ConditionalVectorFlow(2, 1, n_layers=1, hidden=8), Identity())
    assert plain.check_temperature(0.8) == 0.8
    s = PosteriorSampler(ConditionalVectorFlow(2, 1, n_layers=1, hidden=8, base_components=3), Identity())
    assert s.check_temperature(1) == 1.0  # T = 1 is always the flow itself
    with pytest.raises(ApsError, match="standard normal base"):
        s.check_temperature(0.8)
