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


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    """Diagonal Gaussians: FD = |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2; a set against itself is 0."""
    from aps.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    mu_b = torch.tensor([0.3, -1.0, 2.0])
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * sd_a
    b = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * sd_b + mu_b
    exact = float(mu_b.pow(2).sum() + (sd_a - sd_b).pow(2).sum())
    assert abs(frechet_distance(a, b) - exact) < 0.03 * exact
    assert abs(frechet_distance(a, a)) < 1e-6


def test_classifier_features_rank_real_digits_closer_than_noise():
    """The judge's pooled features: other real digits are near the digits, blurred noise is far."""
    from aps.data import load_mnist
    from aps.evaluate_images import classifier_features
    from aps.metrics import frechet_distance
    from aps.operators.classifier import load_classifier

    net, _ = load_classifier("checkpoints/mnist-classifier-heldout")
    x = load_mnist("test")[:300]
    f_a, f_b = classifier_features(net, x[:150]), classifier_features(net, x[150:])
    noise = torch.nn.functional.avg_pool2d(torch.rand(150, 1, 32, 32, generator=torch.Generator().manual_seed(1)),
                                           3, 1, 1) * 2 - 1
    assert f_a.shape == (150, net.head.in_features // 16)
    assert frechet_distance(f_a, f_b) < 0.2 * frechet_distance(classifier_features(net, noise), f_b)


def test_out_of_range_counts_the_samples_with_a_far_pixel():
    from aps.evaluate_images import score_image_samples
    from aps.operators import build

    op = build("denoise", image_shape=(1, 8, 8))
    x = torch.zeros(2, 10, 1, 8, 8)
    x[0, 3, 0, 2, 2] = 1.6   # one pixel of one sample beyond 1.5
    x[0, 7, 0, 5, 1] = -40.0
    x[1, :, 0, 0, 0] = 1.5   # at the edge: in range
    row = score_image_samples(x, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), op)
    assert row["out_of_range"].tolist() == [0.2, 0.0]
