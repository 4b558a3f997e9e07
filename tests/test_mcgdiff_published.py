"""MCGdiff's benchmark as published: the generator against its description, the conditioned frame and the diagonal
gated base (the high-dimensional recipe) in closed form and trained on a d = 8 case, and the table script."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aps.config import TrainConfig
from aps.errors import ApsError
from aps.problems import grid_means, make_mcgdiff, mcgdiff_problem, mcgdiff_published_problem, parse_mcgdiff, problem_source

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_published_generator_matches_its_description(float64):
    d, dy, seed = 6, 2, 3
    p = mcgdiff_published_problem(d, dy, seed)
    rng = np.random.default_rng(seed)  # the draws in the documented order
    g = rng.standard_normal(25)
    for _ in range(2):  # U (dy x dy), then V (d x d)
        rng.standard_normal((dy, dy) if _ == 0 else (d, d))
    s = np.sort(rng.uniform(size=dy))[::-1]
    u = rng.uniform()
    w = p.prior.log_weights.double().exp().numpy()
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w, g ** 2 / (g ** 2).sum(), rtol=1e-10)
    means = p.prior.means.double().numpy()
    assert means.shape == (25, d) and set(np.unique(means)) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    # component (i, j) = (-2, 2), row 5 (i + 2) + j + 2 = 4, has mean (8 i, 8 j, 8 i, 8 j, ...)
    np.testing.assert_array_equal(means[4], [-16, 16, -16, 16, -16, 16])
    np.testing.assert_array_equal(means, grid_means(d))
    np.testing.assert_array_equal(means[:, 2:4], means[:, :2])  # the grid tiled over d
    torch.testing.assert_close(p.prior.variances, torch.ones(25, d, dtype=p.prior.variances.dtype))
    a = p.operator.A.double().numpy()
    sv = np.linalg.svd(a, compute_uv=False)
    assert ((sv > 0) & (sv < 1)).all()
    np.testing.assert_allclose(sv, s, rtol=1e-10)
    assert 0 < p.operator.sigma_y <= sv.max()
    assert p.operator.sigma_y == pytest.approx(u * s.max(), rel=1e-12)
    # A's rows are orthogonal directions scaled: A A^T has the squared singular values as eigenvalues
    np.testing.assert_allclose(np.linalg.eigvalsh(a @ a.T)[::-1], s ** 2, rtol=1e-10)
    # the same seed makes the same problem; another seed another one; the variant is a different problem
    again, other = mcgdiff_published_problem(d, dy, seed).arrays(), mcgdiff_published_problem(d, dy, seed + 1).arrays()
    for key, value in p.arrays().items():
        np.testing.assert_array_equal(value, again[key])
    assert not np.allclose(p.arrays()["weights"], other["weights"])
    assert mcgdiff_problem(d, dy, seed).operator.sigma_y == 0.1


def test_mcgdiff_specs_name_their_generator(float64):
    assert parse_mcgdiff("8,2,0") == (8, 2, 0, "variant")
    assert parse_mcgdiff("8, 2, 0, published") == (8, 2, 0, "published")
    assert make_mcgdiff("4,1,5,published").operator.sigma_y == mcgdiff_published_problem(4, 1, 5).operator.sigma_y
    assert problem_source({"task": {"mcgdiff": "8,2,0,published"}}) == {"mcgdiff": "8,2,0", "generator": "published"}
    assert problem_source({"mcgdiff": "8,2,0"})["generator"] == "variant"
    for bad, match in (("8,2,0,paper", "unknown generator"), ("8,2", "three integers"), ("8,2,x,published", "three")):
        with pytest.raises(ApsError, match=match):
            parse_mcgdiff(bad)
    with pytest.raises(ApsError, match="unknown generator"):
        TrainConfig(mcgdiff="8,2,0,paper").validate()


def test_flow_options_are_validated():
    with pytest.raises(ApsError, match="--flow-base-gate"):
        TrainConfig(mcgdiff="8,2,0", flow_base_components=25, flow_base_cov="diag").validate()
    with pytest.raises(ApsError, match="--flow-layers"):
        TrainConfig(mcgdiff="8,2,0", flow_layers=-1).validate()
    TrainConfig(mcgdiff="8,2,0", flow_layers=0, flow_frame="conditioned", flow_base_components=25,
                flow_base_gate=True, flow_base_cov="diag").validate()
    assert {"flow_base_cov", "flow_frame", "flow_layers"} <= set(TrainConfig.ARCH_FIELDS)


def test_the_conditioned_frame_makes_every_posterior_component_a_fixed_unit_gaussian(float64):
    # x = K y + b + L u with one component's posterior gain K and covariance L L^T: component k's posterior,
    # N(m_k(y), C), is N(L^-1 (m_k(y) - K y - b), I) in u, at the same place for every y
    from aps.flows.vector import ConditionalVectorFlow

    p = mcgdiff_published_problem(8, 2, 1)
    flow = ConditionalVectorFlow(8, 2, n_layers=0, base_components=25, base_gate=True, base_cov="diag").double()
    gain, cov = p.prior.component_posterior_frame(p.operator)
    mean, mcov = p.prior.moments()
    flow.frame.fit(mean, mcov, p.operator.matrix(), p.operator.sigma_y, scale_cov=cov, gain=gain)
    y = torch.randn(5, 2, dtype=torch.float64) * 10
    post = p.prior.posterior(p.operator, y)
    assert post.shared
    L = flow.frame.L
    linv = torch.linalg.inv(L)
    torch.testing.assert_close(linv @ post.covs[0] @ linv.T, torch.eye(8, dtype=torch.float64))
    ctx = flow.encode(y)
    u = torch.stack([flow.frame.inverse(post.means[:, k], ctx)[0] for k in range(25)], 1)  # (5, 25, 8)
    torch.testing.assert_close(u, u[:1].expand_as(u))


def test_the_shared_covariance_path_of_the_exact_posterior_agrees_with_the_general_one(float64):
    p = mcgdiff_published_problem(5, 2, 0)
    y = p.operator.measure(p.prior.sample(3, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    post = p.prior.posterior(p.operator, y)
    x = post.sample(200, generator=torch.Generator().manual_seed(2))
    fast, fast_x = post.component_log_probs(x), post.sample(50, generator=torch.Generator().manual_seed(3))
    post.shared, post._chol = False, torch.linalg.cholesky(post.covs)
    torch.testing.assert_close(fast, post.component_log_probs(x))
    torch.testing.assert_close(fast_x, post.sample(50, generator=torch.Generator().manual_seed(3)))


def test_the_high_dimensional_recipe_learns_a_published_d8_posterior(tmp_path):
    import aps
    from aps.evaluate import evaluate_mixture
    from aps.recipe import resolve
    from aps.training import train

    out = tmp_path / "d8"
    cfg = resolve(dict(recipe="mixture-highdim", mcgdiff="8,2,0,published", out=str(out), steps=60, cpu=True,
                       checkpoint_every=60, log_every=20, sample_every=0)).cfg
    assert cfg.flow_layers == 0 and cfg.flow_frame == "conditioned" and cfg.flow_base_cov == "diag"
    train(cfg)
    sampler = aps.load(out)
    assert sampler.flow.config()["base_cov"] == "diag" and sampler.flow.config()["n_layers"] == 0
    res = evaluate_mixture(sampler, make_mcgdiff("8,2,0,published"), n_measurements=4, n_samples=1000)
    flow, prior = res["summary"]["flow"], res["summary"]["prior"]
    assert prior["tv"]["mean"] > 0.5  # the y carry information: the prior is far off
    assert flow["tv"]["mean"] <= 0.2, flow["tv"]
    assert flow["kl"]["mean"] < 0.5, flow["kl"]


def test_the_table_script_writes_one_line_per_problem_and_method(tmp_path):
    out = tmp_path / "t.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "mcgdiff_table.py"), "--dims", "4", "--dys", "1", "--seeds", "0",
           "--methods", "aps", "dps", "ddrm", "--workers", "2", "--n-measurements", "2", "--n-samples", "64",
           "--n-tune", "2", "--tune-samples", "16", "--aps-steps", "5", "--dps-steps", "5", "--ddrm-steps", "4:5",
           "--dps-zeta", "0.1", "1", "--out", str(out), "--run-dir", str(tmp_path / "runs")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["aps", "ddrm", "dps"]
    for r in rows:
        assert r["generator"] == "published" and (r["d"], r["dy"], r["seed"]) == (4, 1, 0)
        assert 0 <= r["tv_mean"] <= r["tv_max"] <= 1 and r["sw_floor_mean"] > 0 and r["seconds_per_sample"] > 0
    aps_row = next(r for r in rows if r["method"] == "aps")
    assert aps_row["train_steps"] == 5 and aps_row["kl_mean"] is not None
    assert aps_row["recipe"] == "mixture-highdim-fkl"  # the recipe of the nearest d in the per-d table (8)
    dps_row = next(r for r in rows if r["method"] == "dps")
    assert dps_row["tuning"]["grid"] == [0.1, 1.0] and dps_row["nfe"] == 10
    assert "seed 54321" in dps_row["tune_measurements"]
    # a rerun skips what is there
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    assert "0 jobs (3 already" in again.stderr


def test_the_isotropic_path_of_the_mixture_prior_agrees_with_the_general_one(float64):
    from aps.priors import GaussianMixturePrior

    g = torch.Generator().manual_seed(0)
    prior = GaussianMixturePrior(4 * torch.randn(5, 7, generator=g), torch.rand(5, generator=g) + 0.1,
                                 torch.rand(5, generator=g) + 0.2)  # one variance per component, not all equal
    assert prior.isotropic
    x, t = 3 * torch.randn(40, 7, generator=g), torch.rand(40, generator=g)
    fast = prior.score_exact(x, t), prior.log_prob_t(x, t)
    prior.isotropic = False
    for a, b in zip(fast, (prior.score_exact(x, t), prior.log_prob_t(x, t))):
        torch.testing.assert_close(a, b)
    assert not GaussianMixturePrior(torch.zeros(2, 3), torch.ones(2), torch.rand(2, 3) + 0.5).isotropic


@pytest.mark.parametrize("layers", [0, 2])
def test_stratified_draws_of_a_diagonal_base_have_the_flows_own_log_density(float64, layers):
    from aps.flows.vector import ConditionalVectorFlow

    torch.manual_seed(0)
    flow = ConditionalVectorFlow(6, 2, n_layers=layers, hidden=16, base_components=5, base_gate=True,
                                 base_cov="diag").double()
    with torch.no_grad():
        for prm in flow.mixture_base.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    y = torch.randn(3, 2, dtype=torch.float64)
    x, log_q, weight = flow.sample_weighted(y, 10)
    assert x.shape == (3, 10, 6) and weight.shape == (3, 10)
    torch.testing.assert_close(log_q, flow.log_prob(x.flatten(0, 1), y.repeat_interleave(10, 0)).reshape(3, 10))


def test_the_table_script_starts_no_job_after_start_until(tmp_path):
    """--start-until: jobs that have not begun by then are left for a rerun, not run on a cut budget."""
    out = tmp_path / "t.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "mcgdiff_table.py"), "--dims", "4", "--dys", "1", "--seeds", "0",
           "--methods", "ddrm", "dps", "--workers", "1", "--n-measurements", "2", "--n-samples", "64",
           "--n-tune", "2", "--tune-samples", "16", "--dps-steps", "5", "--ddrm-steps", "5", "--start-until", "1e-6",
           "--out", str(out), "--run-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    assert "0 rows written" in proc.stderr and (not out.exists() or out.read_text() == "")
