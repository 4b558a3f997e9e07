"""Solvers: the EDM view against the VP denoiser, the exact ODE consistency function against closed forms,
the learned CM's boundary condition and distillation, and the samplers' costs and behaviour."""
import math
from pathlib import Path

import pytest
import torch

from aps.priors import GaussianMixturePrior
from aps.problems import mcgdiff_problem
from aps.schedules import ContinuousSchedule, DiscreteSchedule
from aps.solvers import (CMDPS, DPS, CMInversion, EDMDenoiser, ExactConsistency, PriorSamples, karras_sigmas,
                         measurement_loss, pf_ode)
from aps.solvers.edm import to_vp


pytestmark = pytest.mark.usefixtures("one_thread")


def ddpm_schedule(n=1000):
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return DiscreteSchedule(torch.cumprod(1 - betas, 0))


def small_mixture(schedule=None):
    g = torch.Generator().manual_seed(0)
    return GaussianMixturePrior(3 * torch.randn(3, 2, generator=g), torch.tensor([0.2, 0.3, 0.5]),
                                torch.tensor([0.5, 1.0, 2.0]), schedule)


# ---------------------------------------------------------------- the EDM view

def test_karras_grid():
    s = karras_sigmas(18)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002) and (s[1:] < s[:-1]).all()
    i = 5
    assert s[i] == pytest.approx((80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)


@pytest.mark.parametrize("schedule", [ContinuousSchedule(), ContinuousSchedule("linear"), ddpm_schedule()],
                         ids=["cosine", "vp-linear", "ddpm"])
def test_edm_denoiser_matches_vp_denoiser(float64, schedule):
    prior = small_mixture(schedule)
    D = EDMDenoiser(prior)
    lo, hi = D.sigma_range
    sigma = torch.exp(torch.linspace(math.log(lo) + 1e-3, math.log(hi) - 1e-3, 7))
    t = D.t_of_sigma(sigma)
    # t(sigma) inverts the schedule: log-SNR(t) = -2 log sigma (exact, also between DDPM integers).
    torch.testing.assert_close(schedule.log_snr(t), -2 * torch.log(sigma), rtol=0, atol=1e-9)
    x = 4 * torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(D(x, sigma), prior.denoise(to_vp(x, sigma), t))
    # x_vp = x_edm / sqrt(1 + sigma^2) is alpha_t x_edm
    alpha, _ = schedule.alpha_sigma(t)
    torch.testing.assert_close(to_vp(x, sigma), alpha[:, None] * x)


def test_edm_denoiser_discrete_grid_points(float64):
    # At the DDPM integers, t(sigma_k) = k exactly.
    sched = ddpm_schedule(50)
    D = EDMDenoiser(small_mixture(sched))
    k = torch.tensor([0.0, 7.0, 49.0])
    sigma = torch.exp(-0.5 * sched.log_snr(k))
    torch.testing.assert_close(D.t_of_sigma(sigma), k)


def test_edm_denoiser_on_a_diffusers_prior():
    # The network prior: at the DDPM integers t(sigma_k) = k, and D is the VP denoiser of x_vp = alpha x.
    prior = tiny_diffusers_prior()
    D = EDMDenoiser(prior)
    k = torch.tensor([0.0, 13.0, 57.0, 99.0])
    sigma = torch.exp(-0.5 * prior.schedule.log_snr(k.double()))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * (1 + sigma.float()[:, None, None, None])
    with torch.no_grad():
        torch.testing.assert_close(D(x, sigma), prior.denoise(to_vp(x, sigma), k), rtol=1e-4, atol=1e-4)


def test_fast_mixture_denoiser_is_the_same_function(float64):
    from aps.solvers.exact_cm import MixtureEDMDenoiser

    prior = mcgdiff_problem(8, 2, 0).prior.double()
    x = 10 * torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.exp(2 * torch.randn(50, generator=torch.Generator().manual_seed(1)))
    # the expanded |x - mu|^2 = |x|^2 - 2 x.mu + |mu|^2 loses a few digits at |x| ~ 30
    torch.testing.assert_close(MixtureEDMDenoiser(prior)(x, sigma), EDMDenoiser(prior)(x, sigma), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(MixtureEDMDenoiser(prior)(x, 3.0), EDMDenoiser(prior)(x, 3.0))


# ---------------------------------------------------------------- the exact consistency function

def test_exact_cm_single_gaussian_closed_form(float64):
    # For p = N(mu, v I) the PF-ODE solution is x(s) = mu + sqrt((v + s^2) / (v + s0^2)) (x(s0) - mu).
    mu, v = torch.tensor([[1.0, -2.0]]), 0.7
    prior = GaussianMixturePrior(mu, torch.ones(1), torch.tensor([v]))
    cm = ExactConsistency(prior, steps=128)  # RK4: error ~ steps^-4 (2e-5 at 64 steps, 1e-6 at 128)
    x = 30 * torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    for s in (80.0, 3.0, 0.1):
        expect = mu + math.sqrt((v + 0.002 ** 2) / (v + s ** 2)) * (x - mu)
        torch.testing.assert_close(cm(x, s), expect, rtol=0, atol=5e-6)


def test_exact_cm_boundary_and_round_trip(float64):
    prior = mcgdiff_problem(2, 1, 0).prior.double()
    cm = ExactConsistency(prior, steps=128)
    x0 = prior.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cm(x0, 0.002), x0)  # the boundary condition, bit for bit
    sigma = torch.tensor([0.05, 0.5, 2.0, 8.0, 80.0]).repeat_interleave(64 // 5 + 1)[:64]
    # Forward along the ODE from (x0, s_min) to (x, sigma), then the CM back: the same trajectory.
    x = pf_ode(cm.denoiser, x0, 0.002, sigma, 256)
    err = (cm(x, sigma) - x0).norm(dim=1)
    assert err.max() < 1e-3, err.max()
    # A consistency function is constant along trajectories: CM(x, sigma) = CM(x', sigma') on one of them.
    x_mid = pf_ode(cm.denoiser, x, sigma, sigma / 3, 64)
    assert (cm(x_mid, sigma / 3) - cm(x, sigma)).norm(dim=1).max() < 1e-3


def test_exact_cm_pushes_prior_to_noise(float64):
    # The PF-ODE preserves marginals: prior samples moved to sigma = 80 have the variance of p_80.
    prior = small_mixture()
    x0 = prior.sample(4000, generator=torch.Generator().manual_seed(0))
    x80 = pf_ode(EDMDenoiser(prior), x0, 0.002, 80.0, 32)
    mean, cov = prior.moments()
    torch.testing.assert_close(x80.var(0), torch.diagonal(cov) + 6400, rtol=0.06, atol=0)


# ---------------------------------------------------------------- the learned consistency model

def tiny_unet(size=8):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def tiny_diffusers_prior():
    from diffusers import DDPMScheduler

    from aps.priors.diffusers_prior import DiffusersPrior

    return DiffusersPrior(tiny_unet(), DDPMScheduler(num_train_timesteps=100))


def test_learned_cm_boundary_and_scalings(tmp_path):
    from aps.solvers.consistency_model import ConsistencyModel, boundary_scalings

    cm = ConsistencyModel(tiny_unet())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(cm(x, 0.002), x)  # f(x, s_min) = x exactly, whatever the network
        assert not torch.allclose(cm(x, 1.0), x)
    sched = cm.scheduler()
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = boundary_scalings(sigma)
    ref_skip, ref_out = sched.get_scalings_for_boundary_condition(sigma)
    torch.testing.assert_close(c_skip, ref_skip)
    torch.testing.assert_close(c_out, ref_out)
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + 0.25).sqrt())
    # diffusers format round trip
    cm.save_pretrained(tmp_path / "cm")
    assert (tmp_path / "cm" / "scheduler" / "scheduler_config.json").is_file()
    loaded = ConsistencyModel.from_pretrained(tmp_path / "cm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3.0), cm(x, 3.0))


def test_tiny_distillation_reduces_loss():
    from aps.solvers.consistency_model import ConsistencyModel
    from aps.solvers.distillation import ConsistencyDistillation, heun_step

    torch.manual_seed(0)
    prior = tiny_diffusers_prior()
    student = ConsistencyModel.from_teacher(prior)
    cd = ConsistencyDistillation(student, prior, n_steps=10, ema=0.95, metric="pseudo_huber")
    # the Heun teacher step moves along the teacher's ODE: a zero-length step is the identity
    x = torch.randn(2, 1, 8, 8)
    s = torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(heun_step(cd.teacher, x, s, s), x)
    data = torch.tanh(2 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)))

    def eval_loss():
        with torch.no_grad():
            return cd.loss(data, torch.Generator().manual_seed(2)).mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    for step in range(30):
        idx = torch.randint(0, 64, (8,), generator=g)
        loss = cd.loss(data[idx], g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cd.update_target()
    after = eval_loss()
    assert after < 0.85 * before, (before, after)
    assert not any(p.requires_grad for p in cd.target.parameters())
    assert all(p.grad is None for p in prior.parameters())  # the teacher stays frozen


# ---------------------------------------------------------------- the samplers

@pytest.fixture(scope="module")
def problem():
    return mcgdiff_problem(2, 1, 0)


def _y(problem, b=2):
    from aps.evaluate import held_out_measurements

    return held_out_measurements(problem, b)[1]


def test_dps_without_guidance_samples_the_prior():
    # zeta = 0: plain DDPM ancestral sampling with the exact eps draws the prior (mean and variance).
    prior = GaussianMixturePrior(torch.tensor([[1.0, -2.0]]), torch.ones(1), torch.tensor([0.5]))
    from aps.operators import MatrixOperator

    op = MatrixOperator(torch.eye(2)[:1], 0.1)
    x = DPS(zeta=0.0, steps=200).sample(prior, op, torch.zeros(1, 1), 4000, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(x.mean(0), torch.tensor([1.0, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor([0.5, 0.5]), atol=0.05, rtol=0)


def test_solvers_shapes_costs_and_guidance(problem):
    from aps.evaluate import score_samples, summarize_rows

    y = _y(problem, 4)
    post = problem.prior.posterior(problem.operator, y)
    cm = ExactConsistency(problem.prior, 16)
    tv = {}
    cases = [(PriorSamples(), 0), (DPS(zeta=1.0, steps=100), 200), (CMDPS(cm, zeta=0.03, steps=20), 60),
             (CMInversion(cm, k1=5, k2=5), 22)]
    for solver, nfe in cases:
        x = solver.sample(problem.prior, problem.operator, y, 200, torch.Generator().manual_seed(0))
        assert x.shape == (4, 200, 2) and torch.isfinite(x).all()
        assert solver.stats["nfe"] == nfe, (solver.name, solver.stats)
        tv[solver.name] = summarize_rows(score_samples(post, x.double()))["tv"]["mean"]
    assert tv["dps"] < tv["prior"] - 0.2, tv  # the measurement is used
    assert tv["cm1"] < tv["prior"], tv


def test_dps_rows_independent(problem):
    # Sample j of a measurement does not depend on the other rows of the batch (losses are per row).
    y = _y(problem, 2)
    s = DPS(zeta=1.0, steps=20)
    a = s.sample(problem.prior, problem.operator, y, 3, torch.Generator().manual_seed(0))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    y_rep = y.repeat_interleave(3, 0)
    loss = measurement_loss(problem.operator, y_rep, x)
    (g,) = torch.autograd.grad(loss.sum(), x)
    (g0,) = torch.autograd.grad(measurement_loss(problem.operator, y_rep[:1], x[:1]).sum(), x)
    torch.testing.assert_close(g[:1], g0[:1])
    assert a.shape == (2, 3, 2)


def test_measurement_loss_categorical():
    from torch import nn

    class Logits(nn.Module):  # a stand-in neural operator: sigma_y None, forward gives logits
        sigma_y = None

        def forward(self, x):
            return torch.stack([x.sum(1), -x.sum(1)], 1)

    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss = measurement_loss(Logits(), torch.tensor([0, 0]), x)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(Logits()(x), torch.tensor([0, 0]), reduction="none"))
    assert loss[0] < loss[1]


def test_shipped_cm_loads_offline_in_aps_and_in_diffusers_pipeline():
    """checkpoints/mnist-cm: aps's wrapper and diffusers' ConsistencyModelPipeline give the same 1-step images."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    from aps.solvers.consistency_model import ConsistencyModel

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist-cm"
    cm = ConsistencyModel.from_pretrained(folder)
    pipe = ConsistencyModelPipeline(unet=UNet2DModel.from_pretrained(folder / "unet"),
                                    scheduler=CMStochasticIterativeScheduler.from_pretrained(folder / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt", num_inference_steps=1).images
    img = torch.as_tensor(img)
    img = img.permute(0, 3, 1, 2) if img.shape[-1] == 1 else img
    x_T = torch.randn((3, 1, 32, 32), generator=torch.Generator().manual_seed(0)) * cm.sigma_max
    with torch.no_grad():
        ours = cm(x_T, cm.sigma_max).clamp(-1, 1)
    torch.testing.assert_close(ours, img.float() * 2 - 1, atol=1e-4, rtol=0)
    assert ours.std() > 0.3  # digits on a black background, not a constant image


def test_cm_hub_id_loads_from_the_local_cache_and_fails_cleanly_offline(offline_hub):
    """No network: a tiny CM saved into a local hub cache (models--owner--name/snapshots/<rev>) loads by its
    hub id; an id that is not cached fails with one ApsError line (hub offline, sockets closed)."""
    from aps.errors import ApsError
    from aps.solvers.consistency_model import ConsistencyModel

    cm = ConsistencyModel(tiny_unet())
    offline_hub(cm, "aps-test/tiny-cm")
    loaded = ConsistencyModel.from_pretrained("aps-test/tiny-cm")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3.0), cm(x, 3.0))
    with pytest.raises(ApsError, match="cannot load the consistency model") as err:
        ConsistencyModel.from_pretrained("no-such-owner/no-such-cm")
    assert "\n" not in str(err.value)
    with pytest.raises(ApsError, match="not a consistency-model folder"):
        ConsistencyModel.from_pretrained("/nonexistent/cm-folder")
