"""Training from the prior alone: the prior bank (drawn, cached, reused, redrawn when foreign or damaged),
train.py --data prior, and measurements without ground truth (--measurements)."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

import aps.prior_bank as bank_module
from aps.config import TrainConfig
from aps.errors import ApsError
from aps.prior_bank import prior_bank, read_bank
from aps.priors import DiffusersPrior
from cli_helpers import assert_one_line_error, run
from test_image_training import TINY_FLOW, save_tiny_prior


def tiny_prior(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return DiffusersPrior(unet, DDPMScheduler(num_train_timesteps=100))


@pytest.fixture
def counted(monkeypatch):
    """Counts the images that aps.prior_bank actually draws (calls of the prior's sampler)."""
    drawn = []
    real = bank_module.draw

    def draw(prior, start, stop, *args, **kwargs):
        drawn.append((start, stop))
        yield from real(prior, start, stop, *args, **kwargs)

    monkeypatch.setattr(bank_module, "draw", draw)
    return drawn


def test_bank_is_drawn_cached_and_reused(tmp_path, counted):
    prior = tiny_prior()
    images, info = prior_bank(prior, 6, sampler="ddim", steps=4, batch=4, cache_dir=tmp_path, progress=False)
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8 and images.float().std() > 0
    assert info["n"] == 6 and info["sampler"] == "ddim" and info["steps"] == 4
    assert counted == [(0, 6)] and len(list(tmp_path.glob("*.safetensors"))) == 1
    again, info2 = prior_bank(prior, 6, sampler="ddim", steps=4, batch=3, cache_dir=tmp_path, progress=False)
    assert counted == [(0, 6)]  # the second call drew nothing
    assert torch.equal(again, images) and info2 == info
    # image i has its own seed: fewer images are a prefix, more draw only the missing ones
    few, _ = prior_bank(prior, 4, sampler="ddim", steps=4, cache_dir=tmp_path, progress=False)
    assert torch.equal(few, images[:4]) and counted == [(0, 6)]
    more, _ = prior_bank(prior, 8, sampler="ddim", steps=4, batch=5, cache_dir=tmp_path, progress=False)
    assert counted == [(0, 6), (6, 8)] and torch.equal(more[:6], images)
    fresh, _ = prior_bank(prior, 8, sampler="ddim", steps=4, batch=8, cache_dir=tmp_path / "other", progress=False)
    assert torch.equal(fresh, more)  # whatever the batch size


def test_an_interrupted_draw_resumes_from_its_last_save(tmp_path, monkeypatch):
    prior = tiny_prior()
    whole, _ = prior_bank(prior, 6, sampler="ddim", steps=3, cache_dir=tmp_path / "whole", progress=False)
    real = bank_module.draw

    def interrupted(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(bank_module, "SAVE_EVERY", 0.0)
    monkeypatch.setattr(bank_module, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prior_bank(prior, 6, sampler="ddim", steps=3, batch=2, cache_dir=tmp_path, progress=False)
    calls = []
    monkeypatch.setattr(bank_module, "draw", lambda p, start, stop, *a, **k: calls.append(start) or real(p, start, stop, *a, **k))
    resumed, _ = prior_bank(prior, 6, sampler="ddim", steps=3, batch=2, cache_dir=tmp_path, progress=False)
    assert calls == [2] and torch.equal(resumed, whole)


def test_another_prior_or_sampler_gets_another_bank(tmp_path, counted):
    a, info_a = prior_bank(tiny_prior(0), 3, sampler="ddim", steps=4, cache_dir=tmp_path, progress=False)
    b, info_b = prior_bank(tiny_prior(1), 3, sampler="ddim", steps=4, cache_dir=tmp_path, progress=False)
    c, info_c = prior_bank(tiny_prior(0), 3, sampler="ddpm", steps=4, cache_dir=tmp_path, progress=False)
    d, info_d = prior_bank(tiny_prior(0), 3, sampler="ddim", steps=5, cache_dir=tmp_path, progress=False)
    assert len({info_a["key"], info_b["key"], info_c["key"], info_d["key"]}) == 4 and len(counted) == 4
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_foreign_or_damaged_cache_file_is_redrawn(tmp_path, counted):
    prior = tiny_prior()
    images, info = prior_bank(prior, 4, sampler="ddim", steps=3, cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{info['key']}.safetensors"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        redrawn, _ = prior_bank(prior, 4, sampler="ddim", steps=3, cache_dir=tmp_path, progress=False)
    assert torch.equal(redrawn, images) and len(counted) == 2

    save_file({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, str(path),
              metadata={"format": bank_module.FORMAT, "key": "0123456789abcdef"})  # another bank's file
    with pytest.warns(UserWarning, match="another prior"):
        prior_bank(prior, 4, sampler="ddim", steps=3, cache_dir=tmp_path, progress=False)
    assert len(counted) == 3

    flipped = bytearray(path.read_bytes())
    flipped[-1] ^= 0xFF  # one pixel changed: the checksum no longer matches
    path.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match="checksum"):
        assert read_bank(path, info["key"], (1, 8, 8)) is None
    with pytest.warns(UserWarning, match="checksum"):
        assert torch.equal(prior_bank(prior, 4, sampler="ddim", steps=3, cache_dir=tmp_path, progress=False)[0], images)


def test_ddim_sampling_is_the_schedulers_and_deterministic():
    prior = tiny_prior()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    a = prior.sample(3, generator=gens(), num_inference_steps=5, sampler="ddim")
    b = prior.sample(3, generator=gens(), num_inference_steps=5, sampler="ddim")
    c = prior.sample(3, generator=gens(), num_inference_steps=5, sampler="ddpm")
    assert torch.equal(a, b) and not torch.allclose(a, c) and a.abs().max() <= 1  # clip_sample
    with pytest.raises(ApsError, match="unknown prior sampler"):
        prior.sample(1, sampler="euler")


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("prior") / "p")


TRAIN = ["--operator", "denoise", "--batch-size", "4", "--n-z", "1", "--n-elbo", "1", "--warmup", "1",
         "--log-every", "1", "--sample-every", "2", "--cpu", "--steps", "2", *TINY_FLOW]


@pytest.mark.slow
def test_train_py_from_prior_samples(prior_folder, tmp_path):
    """draw_prior_bank.py draws the bank into the cache; train.py --data prior then reads it, drawing nothing."""
    cache = tmp_path / "cache"
    proc = run("scripts/draw_prior_bank.py", "--prior", prior_folder, "--n", "16", "--sampler", "ddim", "--steps", "3",
               "--batch", "5", "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    drawn = json.loads(proc.stdout.strip().splitlines()[-1])
    assert drawn["stored"] == 16 and "drawing prior images" in proc.stderr
    bank = ["--data", "prior", "--prior-sampler", "ddim", "--prior-steps", "3", "--prior-bank", "16",
            "--prior-cache", cache, "--aps-weight", "0", "--fkl-weight", "1"]
    stamp = Path(drawn["file"]).stat().st_mtime_ns
    proc = run("train.py", "--prior", prior_folder, *TRAIN, *bank, "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert "drawing prior images" not in proc.stderr and Path(drawn["file"]).stat().st_mtime_ns == stamp
    task = json.loads((tmp_path / "a" / "config.json").read_text())["task"]
    assert task["data"] == "prior"
    assert task["prior_bank"] == {k: drawn[k] for k in ("sampler", "steps", "seed", "key", "n")}
    assert [f.stem for f in cache.glob("*.safetensors")] == [task["prior_bank"]["key"]]
    proc = run("benchmark.py", tmp_path / "a", "--solvers", "aps", "--n-measurements", "2", "--n-samples", "2",
               "--n-tune", "1", "--tune-first", "2", "--heldout-data", "digits8", "--no-figures", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    proc = run("sample.py", tmp_path / "a", "--heldout", "0:2", "--n", "3", "--out", tmp_path / "s.safetensors")
    assert_one_line_error(proc, "sample.py", "--heldout-data")
    proc = run("sample.py", tmp_path / "a", "--heldout", "0:2", "--heldout-data", "digits8", "--n", "3",
               "--out", tmp_path / "s.safetensors")
    assert proc.returncode == 0, proc.stderr


def test_measurements_only_trains_the_aps_term_on_those_y(prior_folder, tmp_path, monkeypatch):
    """The APS term's y are rows of the file (no images are loaded); the forward-KL pairs come from the prior."""
    from aps import training
    from aps.tasks import make_task

    y_file = tmp_path / "y.safetensors"
    ys = torch.randn(5, 1, 8, 8)
    save_file({"y": ys}, str(y_file))
    cfg = TrainConfig(prior=str(prior_folder), operator="denoise", measurements=str(y_file), batch_size=4).validate()
    task = make_task(cfg)
    assert task.images is None and task.config()["measurements"]["n"] == 5
    seen = []

    def model(y, prior, operator, cfg, beta, x_pairs=None, y_pairs=None, **kwargs):
        seen.append((y, x_pairs, y_pairs))
        return {"loss": (y * 0).sum().requires_grad_()}

    class Acc:
        sync_gradients = False

        def accumulate(self, m):
            import contextlib
            return contextlib.nullcontext()

        def backward(self, loss):
            pass

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    training.training_step(Acc(), model, opt, task, cfg, 1.0, 0.1)
    y, x_pairs, y_pairs = seen[-1]
    assert x_pairs is None and y_pairs is None
    assert all(any(torch.equal(row, r) for r in ys) for row in y)  # every y is one of the file's

    cfg = TrainConfig(prior=str(prior_folder), operator="denoise", measurements=str(y_file), data="prior",
                      prior_bank=8, prior_steps=2, prior_cache=str(tmp_path / "c"), fkl_weight=1.0,
                      batch_size=4).validate()
    task = make_task(cfg)
    training.training_step(Acc(), model, opt, task, cfg, 1.0, 0.1)
    y, x_pairs, y_pairs = seen[-1]
    assert all(any(torch.equal(row, r) for r in ys) for row in y)
    assert x_pairs.shape == (4, 1, 8, 8)
    assert y_pairs.shape == x_pairs.shape and not any(torch.equal(y_pairs[0], r) for r in ys)


@pytest.mark.slow
def test_train_py_with_measurements_only(prior_folder, tmp_path):
    y_file = tmp_path / "y.safetensors"
    save_file({"y": torch.randn(6, 1, 8, 8)}, str(y_file))
    proc = run("train.py", "--prior", prior_folder, *TRAIN, "--measurements", y_file, "--fkl-weight", "0",
               "--aps-weight", "1", "--out", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    task = json.loads((tmp_path / "m" / "config.json").read_text())["task"]
    assert task["measurements"]["n"] == 6 and (tmp_path / "m" / "samples").is_dir()


def test_measurements_nonsense_is_refused(prior_folder, tmp_path):
    from aps.tasks import make_task

    y_file = tmp_path / "y.safetensors"
    save_file({"y": torch.randn(3, 1, 8, 8)}, str(y_file))
    base = dict(prior=str(prior_folder), operator="denoise", measurements=str(y_file))
    with pytest.raises(ApsError, match="--aps-weight 0 would never see them"):
        TrainConfig(**base, aps_weight=0, fkl_weight=1, data="prior").validate()
    with pytest.raises(ApsError, match="for image tasks"):
        TrainConfig(mcgdiff="2,1,0", measurements=str(y_file)).validate()
    save_file({"y": torch.randn(3, 1, 4, 4)}, str(tmp_path / "small.safetensors"))  # another operator's y
    with pytest.raises(ApsError, match="must have shape"):
        make_task(TrainConfig(**{**base, "measurements": str(tmp_path / "small.safetensors")}))
    save_file({"x": torch.randn(3, 1, 8, 8)}, str(tmp_path / "nox.safetensors"))
    with pytest.raises(ApsError, match="no array named 'y'"):
        make_task(TrainConfig(**{**base, "measurements": str(tmp_path / "nox.safetensors")}))
    from aps.tasks import heldout_images
    with pytest.raises(ApsError, match="--heldout-data"):
        heldout_images("prior", (1, 8, 8))


def test_measurements_with_forward_kl_but_no_pairs_is_one_line(prior_folder, tmp_path):
    y_file = tmp_path / "y.safetensors"
    save_file({"y": torch.randn(3, 1, 8, 8)}, str(y_file))
    proc = run("train.py", "--prior", prior_folder, *TRAIN, "--measurements", y_file, "--fkl-weight", "1", "--aps-weight", "1",
               "--out", tmp_path / "x")
    assert_one_line_error(proc, "train.py", "--data prior")
    assert not (tmp_path / "x").exists()


def test_prior_frac_mixes_bank_images_into_each_batch(prior_folder, tmp_path):
    """--prior-frac f: round(f n) rows of every forward-KL batch are bank images, the others the data set's."""
    from PIL import Image

    from aps.prior_bank import to_float
    from aps.tasks import make_task

    folder = tmp_path / "black"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8)).save(folder / f"{i}.png")  # every data image is all background (-1)
    cfg = TrainConfig(prior=str(prior_folder), operator="denoise", data=str(folder), prior_frac=0.25, prior_bank=6,
                      prior_steps=2, prior_cache=str(tmp_path / "c"), fkl_weight=1.0, aps_weight=0.0).validate()
    task = make_task(cfg)
    bank = to_float(prior_bank(task.prior, 6, steps=2, cache_dir=tmp_path / "c", progress=False)[0])
    assert task.config()["prior_frac"] == 0.25 and task.config()["prior_bank"]["n"] == 6
    x = task.sample_x(8)
    grey = 1 / 255  # dequantisation moves a pixel by at most half a grey level (of width 2/255)
    assert x.shape == (8, 1, 8, 8) and (x[:6] + 1).abs().max() <= grey
    for row in x[6:]:
        assert min((row - b).abs().max().item() for b in bank) <= grey  # each of the last two is a bank image
    assert bank.flatten(1).amax(1).gt(-1 + 2 * grey).all()  # no bank image is all background: the rows tell apart
    assert (task.sample_x(3)[:2] + 1).abs().max() <= grey  # round(0.75) = 1 bank row of 3


@pytest.mark.parametrize("extra, words", [
    (["--prior-frac", "1"], "[0, 1)"),
    (["--prior-frac", "-0.1"], "[0, 1)"),
    (["--prior-frac", "0.5", "--data", "prior"], "other than prior"),
    (["--prior-frac", "0.5", "--fkl-weight", "0", "--aps-weight", "1"], "--fkl-weight 0"),
])
def test_prior_frac_nonsense_is_one_line(prior_folder, tmp_path, extra, words):
    proc = run("train.py", "--prior", prior_folder, *TRAIN, "--fkl-weight", "1", *extra, "--out", tmp_path / "x")
    assert_one_line_error(proc, "train.py", words)
    assert not (tmp_path / "x").exists()
