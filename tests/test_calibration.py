"""Calibration diagnostics (aps.benchmark.calibration): exact samplers sit on the diagonal within their error,
over-confident ones below it; TARP of an exact sampler is uniform within its Kolmogorov bound."""
import torch

from aps.benchmark.calibration import (LEVELS, expected_coverage, hpd_ranks, ks_uniform, rank_histogram, ranks,
                                       tarp)


def gaussian_case(b=400, n=99, d=3, scale=1.0, seed=0):
    """Posterior N(m_i, I) per measurement; the truth is a posterior draw, samples have std `scale`."""
    g = torch.Generator().manual_seed(seed)
    m = 3 * torch.randn(b, d, generator=g)
    truth = m + torch.randn(b, d, generator=g)
    samples = m[:, None] + scale * torch.randn(b, n, d, generator=g)
    return samples, truth


def test_exact_sampler_coverage_lies_on_the_diagonal_within_its_band():
    samples, truth = gaussian_case()
    cov = expected_coverage(ranks(samples, truth))
    assert set(cov["curves"]) == {"all", "x0", "x1", "x2"} and cov["n_units"] == 400
    for name in ("x0", "x1", "x2"):  # each dimension: 400 independent pairs, the band is exact
        for a, c, w in zip(cov["levels"], cov["curves"][name], cov["band"]):
            assert abs(c - a) <= 1.5 * w, (name, a, c, w)  # 1.5 x the 95% band: 19 levels per curve


def test_over_confident_sampler_coverage_lies_below_the_diagonal():
    samples, truth = gaussian_case(scale=0.6)
    cov = expected_coverage(ranks(samples, truth))
    for a, c, w in zip(cov["levels"], cov["curves"]["all"], cov["band"]):
        if 0.3 <= a <= 0.95:
            assert c < a - w, (a, c, w)
    wide = expected_coverage(ranks(*gaussian_case(scale=1.6)))  # under-confident: above
    assert all(c > a for a, c in zip(wide["levels"][5:], wide["curves"]["all"][5:]))


def test_ranks_are_uniform_with_atoms_and_by_region():
    # a pixel that is exactly -1 in every sample and in the truth: randomised ties keep its rank uniform
    samples, truth = gaussian_case(b=300, d=2)
    samples[..., 1], truth[:, 1] = -1.0, -1.0
    u = ranks(samples, truth)
    assert ks_uniform(u[:, 1]) < 1.63 / 300 ** 0.5
    masks = {"atom": torch.tensor([False, True]).expand(300, 2), "free": torch.tensor([True, False]).expand(300, 2)}
    cov = expected_coverage(u, masks)
    assert set(cov["curves"]) == {"atom", "free"}
    assert max(abs(c - a) for a, c in zip(LEVELS, cov["curves"]["atom"])) < 0.1


def test_tarp_of_an_exact_sampler_is_uniform_and_of_an_over_confident_one_is_not():
    exact = tarp(*gaussian_case(b=500, d=5), seed=1)
    assert exact["ks"] < exact["ks_bound"], exact["ks"]
    assert max(abs(e - a) for a, e in zip(exact["levels"], exact["ecp"])) < exact["ks_bound"]
    narrow = tarp(*gaussian_case(b=500, d=5, scale=0.6), seed=1)
    assert narrow["ks"] > 2 * narrow["ks_bound"], narrow["ks"]


def test_hpd_ranks_and_rank_histogram():
    samples, truth = gaussian_case(b=500, d=2)
    m = 3 * torch.randn(500, 2, generator=torch.Generator().manual_seed(0))  # the posterior means of gaussian_case
    log_p = lambda x, c: -0.5 * (x - c).pow(2).sum(-1)  # noqa: E731  (N(m, I) up to a constant)
    u = hpd_ranks(log_p(samples, m[:, None]), log_p(truth, m))
    assert u.shape == (500,) and ks_uniform(u) < 1.63 / 500 ** 0.5
    hist = rank_histogram(ranks(samples, truth), bins=10)
    assert len(hist["counts"]) == 2 and sum(hist["counts"][0]) == 500
    assert all(abs(c - hist["expected"]) <= hist["band"] for row in hist["counts"] for c in row)
    over = rank_histogram(ranks(*gaussian_case(b=500, d=2, scale=0.5)), bins=10)
    assert max(over["counts"][0]) > over["expected"] + over["band"]  # truths piled in the tails


def test_tarp_with_other_measurements_as_references_in_many_dimensions():
    # images: pixels share a scale (no standardising) and another measurement's truth is the reference
    exact = tarp(*gaussian_case(b=400, d=64), seed=2, references="others", standardise=False, n_references=2)
    assert exact["n_units"] == 800 and exact["ks"] < 1.63 / 400 ** 0.5  # 2 references per pair: not independent
    narrow = tarp(*gaussian_case(b=400, d=64, scale=0.7), seed=2, references="others", standardise=False)
    assert narrow["ks"] > 2 * narrow["ks_bound"]
