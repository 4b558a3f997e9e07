"""Coverage by region: a sampler of the very distribution the truth came from covers `level` on every region chosen
from y alone; an over-confident one does not, and the aggregate can hide it; mask regions follow the operator."""
import torch

from aps.evaluate_images import coverage_by_region
from aps.operators import InpaintBox


def draws(mean, scale, n, g):
    """n draws per image of N(mean, scale^2) per pixel: mean (B, C, H, W), scale a number or like mean -> (B, n, C, H, W)."""
    scale = torch.as_tensor(scale, dtype=torch.float64).expand_as(mean)[:, None]
    return mean[:, None] + scale * torch.randn(mean.shape[0], n, *mean.shape[1:], generator=g, dtype=torch.float64)


def test_exact_sampler_covers_the_level_on_every_region():
    g = torch.Generator().manual_seed(0)
    # a "posterior" per image: ink (mean 0.5, std 0.3) on the left half, background (mean -1, std 0.01) elsewhere
    mean = torch.full((64, 1, 8, 8), -1.0, dtype=torch.float64)
    mean[..., :4] = 0.5
    scale = torch.full_like(mean, 0.01)
    scale[..., :4] = 0.3
    truth = mean + scale * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    exact = draws(mean, scale, 2000, g)
    cov = coverage_by_region(exact, truth)
    for region in ("all", "stroke", "background"):
        assert abs(cov[region][0] - 0.9) < 0.03, (region, cov)
    assert abs(cov["stroke"][1] - 0.5) < 0.01  # the stroke region is the ink half, found from the samples' mean
    # too narrow on the ink only: the aggregate still looks fair, the stroke region does not
    narrow = draws(mean, torch.where(scale > 0.1, 0.1, scale), 2000, g)
    cov = coverage_by_region(narrow, truth)
    assert cov["stroke"][0] < 0.5 and cov["background"][0] > 0.85 and cov["all"][0] > cov["stroke"][0] + 0.2


def test_mask_regions_follow_the_operator():
    op = InpaintBox(image_shape=(1, 16, 16), box=[4, 4, 8, 8])
    g = torch.Generator().manual_seed(1)
    truth = torch.zeros(3, 1, 16, 16, dtype=torch.float64)
    samples = draws(truth, 1.0, 500, g)
    samples[..., 4:12, 4:12] *= 0.01  # over-confident inside the box only
    cov = coverage_by_region(samples, truth + 0.5, op)  # truth off-centre: only wide intervals reach it
    assert cov["unobserved"][1] == 0.25 and cov["observed"][1] == 0.75
    assert cov["unobserved"][0] == 0.0 and cov["observed"][0] > 0.5


def test_dequantised_coverage_scores_a_point_mass_posterior_at_its_level():
    """A sampler of the dequantised posterior of a known image (x* + u, u uniform over one grey level): raw x* sits at
    the centre of every interval (coverage90 = 1), the dequantised truth is covered 90% of the time."""
    from types import SimpleNamespace

    from aps.evaluate_images import score_posterior

    truth = torch.randint(0, 256, (30, 1, 12, 12)).float() / 127.5 - 1.0

    def sample(y, n, seed=0, first_index=0, chunk=None, autocast_dtype=None):
        g = torch.Generator().manual_seed(seed + first_index)
        u = torch.rand(len(y), n, *y.shape[1:], generator=g) - 0.5
        return y[:, None] + u / 127.5, None

    identity = SimpleNamespace(y_shape=(1, 12, 12))  # y is the image itself
    sampler = SimpleNamespace(operator=identity, task=SimpleNamespace(levels=256), device="cpu", sample=sample)
    scores = score_posterior(sampler, truth, truth, n_samples=400, per_pass=7)
    assert float(scores["coverage90"].min()) == 1.0
    assert abs(float(scores["coverage90_dequantised"].mean()) - 0.9) < 0.02
    del sampler.task  # a task without grey levels (a mixture problem): no dequantised score
    assert "coverage90_dequantised" not in score_posterior(sampler, truth[:3], truth[:3], n_samples=50)
