"""DiffusersPrior: file round trips, frozen weights, offline errors, and agreement with the exact mixture prior."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import nn

from aps.errors import ApsError
from aps.priors import DiffusersPrior, GaussianMixturePrior
from aps.recipes.prior import PriorTrainConfig, augment
from aps.recipes.prior_eval import bits_per_dim, dequantize, memorisation_report, to_pixels
from aps.schedules import DiscreteSchedule

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "mnist-prior"
TINY = ["--block-out-channels", "8", "16", "--attention", "false", "true", "--layers-per-block", "1",
        "--norm-num-groups", "4"]


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)


def tiny_prior(**opts):
    return DiffusersPrior(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), **opts)


def test_save_and_load_round_trip(tmp_path):
    prior = tiny_prior()
    prior.save_pretrained(tmp_path / "p")
    loaded = DiffusersPrior.from_pretrained(tmp_path / "p")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 17.5, 999.0])
    assert loaded.event_shape == (1, 8, 8)
    assert torch.equal(prior.eps(x, t), loaded.eps(x, t))
    assert loaded.config() == {"type": "diffusers", "path": str(tmp_path / "p")}
    assert torch.equal(DiffusersPrior.from_config(loaded.config()).eps(x, t), loaded.eps(x, t))
    pipe = DDPMPipeline.from_pretrained(tmp_path / "p")  # the folder is a plain diffusers pipeline
    assert isinstance(pipe.unet, UNet2DModel)


def test_loads_a_unet_folder_with_scheduler_config_beside(tmp_path):
    prior = tiny_prior()
    prior.unet.save_pretrained(tmp_path)
    prior.scheduler.save_pretrained(tmp_path)
    loaded = DiffusersPrior.from_pretrained(tmp_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 400.0])
    assert torch.equal(prior.eps(x, t), loaded.eps(x, t))


def test_schedule_matches_the_scheduler_wherever_its_tensors_live():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)  # as add_noise leaves it, moved
    prior = DiffusersPrior(tiny_unet(), scheduler)
    ref = DiscreteSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    torch.testing.assert_close(prior.schedule.alphas_cumprod, ref.alphas_cumprod)


def test_weights_get_no_gradient_but_the_input_does():
    prior = tiny_prior(gradient_checkpointing=True)
    prior.train()  # an owner switching to train mode must not unfreeze it
    assert not prior.unet.training
    assert all(not p.requires_grad for p in prior.parameters())
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    prior.elbo(x, n_draws=2, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())


def test_bf16_autocast_returns_the_input_dtype():
    prior = tiny_prior(autocast_bf16=True)
    x = torch.randn(2, 1, 8, 8)
    eps = prior.eps(x, torch.tensor([5.0, 500.0]))
    assert eps.dtype == torch.float32
    ref = tiny_prior().eps(x, torch.tensor([5.0, 500.0]))
    assert (eps - ref).norm() / ref.norm() < 5e-2


def test_hub_id_loads_from_a_local_cache_and_fails_at_once_offline(offline_hub):
    """No network: a tiny prior saved into a local hub cache loads by its hub id; an id that is not cached fails
    with one clear line, without even trying to connect (the fixture closes sockets)."""
    prior = tiny_prior()
    offline_hub(prior, "aps-test/tiny-ddpm")
    loaded = DiffusersPrior.from_pretrained("aps-test/tiny-ddpm")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eps(x, t), prior.eps(x, t))
    with pytest.raises(ApsError, match="local folder") as err:
        DiffusersPrior.from_pretrained("no-such-owner/no-such-ddpm-model")
    assert "\n" not in str(err.value)


def test_missing_or_wrong_local_folder_fails_clearly(tmp_path):
    with pytest.raises(ApsError, match="does not exist"):
        DiffusersPrior.from_pretrained(tmp_path / "missing" / "prior")
    with pytest.raises(ApsError, match="not a diffusion prior folder"):
        DiffusersPrior.from_pretrained(tmp_path)


def test_sampling_shape_and_per_sample_seeds():
    prior = tiny_prior()
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x3 = prior.sample(3, generator=gens, num_inference_steps=5)
    x2 = prior.sample(2, generator=[torch.Generator().manual_seed(i) for i in range(2)], num_inference_steps=5)
    assert x3.shape == (3, 1, 8, 8) and torch.isfinite(x3).all()
    assert torch.allclose(x3[:2], x2, atol=1e-5)  # sample i does not depend on the batch


class MixtureEpsNet(nn.Module):
    """A UNet stand-in: forward(x_t, t).sample is the exact eps of a Gaussian mixture on (1, 2, 2) images."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture
        self.config = {"in_channels": 1, "sample_size": 2}

    def forward(self, x_t, t):
        return SimpleNamespace(sample=self.mixture.eps(x_t.flatten(1), t).reshape(x_t.shape))


def test_agreement_with_the_exact_mixture_prior():
    schedule = DiscreteSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(3)
    mixture = GaussianMixturePrior(2 * torch.randn(3, 4, generator=g), torch.tensor([0.3, 0.5, 0.2]),
                                   0.05 + 0.2 * torch.rand(3, 4, generator=g), schedule)
    wrapped = DiffusersPrior(MixtureEpsNet(mixture), DDPMScheduler(num_train_timesteps=1000))
    x = mixture.sample(64, generator=g)  # (64, 4)
    t = torch.randint(0, 1000, (64,), generator=g).float()
    x_t = x + torch.randn(x.shape, generator=g)
    torch.testing.assert_close(wrapped.eps(x_t.reshape(64, 1, 2, 2), t).flatten(1), mixture.eps(x_t, t))
    torch.testing.assert_close(wrapped.denoise(x_t.reshape(64, 1, 2, 2), t).flatten(1), mixture.denoise(x_t, t))
    for sampling in ("lambda", "uniform"):
        ref = mixture.elbo(x, n_draws=8, sampling=sampling, generator=torch.Generator().manual_seed(7))
        got = wrapped.elbo(x.reshape(64, 1, 2, 2), n_draws=8, sampling=sampling,
                           generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, ref)


def test_bits_per_dim_change_of_variables():
    d = 1024
    # uniform density on the dequantised cube [-1 - 1/255, 1 + 1/255]^d (width 256 / 127.5): exactly 8 bits/dim
    assert float(bits_per_dim(torch.tensor(d * math.log(256 / 127.5)), d)) == pytest.approx(8.0)
    x = torch.randint(0, 256, (4, 1, 8, 8)).float() / 127.5 - 1
    xd = dequantize(x, torch.Generator().manual_seed(0))
    assert torch.equal(to_pixels(xd), to_pixels(x)) and ((xd - x).abs() <= 0.5 / 127.5 + 1e-6).all()


def test_augmentation_without_flips_or_blur():
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    same = augment(x, PriorTrainConfig(shift_px=0, affine_prob=0.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    shifted = augment(x, PriorTrainConfig(shift_px=2, affine_prob=0.0), torch.Generator().manual_seed(0))
    # integer shifts only move pixels: every interior output pixel is an input pixel of the same image
    for i in range(4):
        found = any(torch.allclose(shifted[i, :, 2:-2, 2:-2], torch.roll(x[i], (dy, dx), (1, 2))[:, 2:-2, 2:-2],
                                   atol=1e-5) for dy in range(-2, 3) for dx in range(-2, 3))
        assert found


def test_memorisation_report_flags_copies():
    train = torch.rand(50, 1, 4, 4)
    test = torch.rand(20, 1, 4, 4)
    rep = memorisation_report(train[:10] + 1e-3, train, test)
    assert rep["median_ratio"] < 0.01 and rep["frac_below_test_p05"] == 1.0


def test_train_and_evaluate_scripts_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import evaluate_prior
    import train_prior

    out = tmp_path / "prior"
    assert train_prior.main(["--steps", "3", "--batch-size", "4", "--cpu", "--mixed-precision", "no",
                             "--log-every", "1", "--warmup", "1", "--out", str(out),
                             "--logging-dir", str(tmp_path / "logs"), *TINY]) == 0
    stats = json.loads((out / "train_config.json").read_text())
    assert stats["steps"] == 3 and stats["final"] and len(stats["history"]) == 3
    assert evaluate_prior.main([str(out), "--n-samples", "4", "--grid", "4", "--sampling-steps", "3",
                                "--n-test", "4", "--n-draws", "2", "--device", "cpu"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert math.isfinite(report["elbo"]["bits_per_dim"]) and (out / "samples.png").is_file()
    assert train_prior.main(["--batch-size", "0", "--out", str(out)]) == 2  # ApsError -> one line, exit 2


@pytest.mark.skipif(not (SHIPPED / "unet").is_dir(), reason="no shipped MNIST prior")
def test_shipped_checkpoint_loads_offline():
    unet = UNet2DModel.from_pretrained(str(SHIPPED), subfolder="unet")
    assert unet.config.sample_size == 32 and unet.config.in_channels == 1
    assert sum(p.numel() for p in unet.parameters()) < 3_000_000
    prior = DiffusersPrior.from_pretrained(SHIPPED)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert prior.eps(x, torch.tensor([10.0, 900.0])).shape == (2, 1, 32, 32)
