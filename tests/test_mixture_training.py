"""The whole pipeline against the truth, small enough for CI: a bimodal d = 2 posterior on CPU (~1-2 min).

A 4-component prior observed through one noisy linear measurement: most y leave two modes, and plain
reverse KL is known to drop one of them. aps's recipe (tempered APS loss + the forward-KL term on
prior pairs) must keep both: mode-weight TV <= 0.2 on held-out measurements.
"""
import pytest
import torch

import aps
from aps.config import TrainConfig
from aps.evaluate import evaluate_mixture
from aps.operators import MatrixOperator
from aps.priors import GaussianMixturePrior
from aps.problems import MixtureProblem, load_problem, mcgdiff_problem
from aps.sampling import PosteriorSampler
from aps.tasks import MixtureTask
from aps.training import train


@pytest.mark.slow
def test_small_bimodal_problem_keeps_its_modes(tmp_path):
    problem = MixtureProblem(
        GaussianMixturePrior(torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]]),
                             torch.tensor([0.2, 0.3, 0.1, 0.4]), torch.ones(4)),
        MatrixOperator(torch.tensor([[1.0, 0.25]]), 0.5))
    problem.save(tmp_path / "problem.npz")
    cfg = TrainConfig(problem=str(tmp_path / "problem.npz"), out=str(tmp_path / "run"), steps=1000, cpu=True,
                      flow_layers=4, flow_hidden=64, fkl_weight=1.0, checkpoint_every=1000, log_every=100)
    train(cfg)
    result = evaluate_mixture(aps.load(tmp_path / "run"), load_problem(tmp_path / "run" / "problem.safetensors"),
                              n_measurements=8, n_samples=2000)
    flow, prior = result["summary"]["flow"], result["summary"]["prior"]
    assert flow["modes"]["mean"] >= 1.5  # the held-out y really are multimodal
    assert flow["tv"]["mean"] <= 0.2, flow
    assert flow["kl"]["mean"] <= 0.3, flow
    assert flow["sw"]["mean"] < 0.5 * prior["sw"]["mean"], (flow, prior)



@pytest.mark.slow
def test_gated_recipe_on_an_mcgdiff_problem_trains_to_its_exact_posterior(tmp_path):
    """aps's recipe for vector problems (gated mixture base + forward KL: BENCHMARKS.md "Mixtures (exact posteriors)") on the MCGdiff
    d = 2 benchmark problem (25 components, 2-3 modes per held-out y), briefly: the base fitted to prior draws is the
    start, and training must bring it to the d = 2 targets' neighbourhood (TV <= 0.1, KL well below the start)."""
    steps = 600
    cfg = TrainConfig(mcgdiff="2,1,0", out=str(tmp_path / "run"), steps=steps, cpu=True, flow_layers=4,
                      flow_hidden=64, flow_base_components=25, flow_base_gate=True, flow_fourier=16, fkl_weight=1.0,
                      temper_start=1.0, n_z=1, batch_size=64, checkpoint_every=steps, log_every=100)
    problem = mcgdiff_problem(2, 1, 0)
    torch.manual_seed(0)
    fitted = MixtureTask(problem).make_flow(cfg).eval()  # what training starts from: the base fitted, no step taken
    start = evaluate_mixture(PosteriorSampler(fitted, problem.operator), problem, n_measurements=8,
                             n_samples=2000)["summary"]["flow"]
    train(cfg)
    result = evaluate_mixture(aps.load(tmp_path / "run"), load_problem(tmp_path / "run" / "problem.safetensors"),
                              n_measurements=8, n_samples=2000)["summary"]["flow"]
    assert result["modes"]["mean"] >= 2  # multimodal held-out posteriors
    assert result["tv"]["mean"] <= 0.1, result
    assert result["kl"]["mean"] <= 0.1 and result["kl"]["mean"] < 0.5 * start["kl"]["mean"], (start, result)
