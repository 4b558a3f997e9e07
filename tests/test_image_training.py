"""Image tasks end to end on CPU: train.py on a tiny 8x8 diffusers prior, resume, sample.py, clear errors,
and two real CPU processes ending with the same weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import ENV, ROOT, assert_one_line_error, run

TINY_FLOW = ["--glow-levels", "2", "--glow-steps", "1", "--glow-hidden", "8", "--glow-cond", "8"]
TINY = ["--data", "digits8", "--batch-size", "4", "--n-z", "2", "--n-elbo", "1", "--fkl-weight", "1",
        "--warmup", "1", "--log-every", "1", "--checkpoint-every", "2", "--sample-every", "2", "--ema-decay", "0.99",
        "--cpu", *TINY_FLOW]


def save_tiny_prior(folder, seed=0):
    from diffusers import DDPMScheduler, UNet2DModel

    from aps.priors import DiffusersPrior

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DiffusersPrior(unet, DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def save_tiny_classifier(folder):
    """A random 8x8 SmallCNN classifier folder (model.safetensors + config.json) for the classifier operator."""
    from safetensors.torch import save_file

    from aps.operators.classifier import SmallCNN

    folder.mkdir(parents=True)
    save_file(SmallCNN((1, 8, 8), widths=(4, 4, 4)).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format_version": 1, "architecture": "SmallCNN",
                                                    "image_shape": [1, 8, 8], "widths": [4, 4, 4], "n_classes": 10}))
    return folder


def reset_accelerate():
    """accelerate keeps one process-wide state; in-process runs with other settings need it cleared."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate()
    yield


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("prior") / "p")


@pytest.fixture(scope="module")
def trained(prior, tmp_path_factory):
    """sr x2 with A^T y fed to the encoder, 2 steps, then resumed to 4."""
    out = tmp_path_factory.mktemp("run") / "sr"
    proc = run("train.py", "--prior", prior, "--operator", "sr", "--op-arg", "factor=2", "--backprojection",
               "--out", out, "--steps", "2", *TINY)
    assert proc.returncode == 0, proc.stderr
    return out


def test_train_writes_an_image_checkpoint(trained, prior):
    meta = json.loads((trained / "config.json").read_text())
    assert meta["step"] == 2 and meta["flow"]["type"] == "glow" and meta["flow"]["y_kind"] == "small_image"
    assert meta["flow"]["extra_channels"] == 1
    task = meta["task"]
    assert task["kind"] == "image" and task["data"] == "digits8" and task["prior"]["path"] == str(prior)
    assert task["operator"] == {"name": "sr", "image_shape": [1, 8, 8], "sigma_y": 0.05, "factor": 2}
    assert (trained / "samples" / "step_0000002.png").is_file()
    card = (trained / "README.md").read_text()  # the model card shows the last grid and names the prior's weights
    assert (trained / "samples.png").is_file() and "](samples.png)" in card and task["prior"]["fingerprint"] in card
    assert list((trained / "logs").rglob("events.out.tfevents*"))


def test_resume_continues_the_same_run(trained, tmp_path):
    before = load_file(trained / "flow.safetensors")
    # architecture comes from the checkpoint: another one on the command line is refused
    assert_one_line_error(run("train.py", "--out", trained, "--resume", "--glow-hidden", "99"), "train.py",
                          "--glow-hidden 8")
    proc = run("train.py", "--out", trained, "--resume", "--steps", "4")  # every other option as the run had it
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((trained / "config.json").read_text())
    assert meta["step"] == 4 and meta["flow"]["hidden_channels"] == 8
    after = load_file(trained / "flow.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    kept = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert kept == ["step_0000002", "step_0000004"]  # saved at steps 2 and 4; --keep 2
    proc = run("train.py", "--out", trained, "--resume", "--operator", "denoise", "--cpu")
    assert_one_line_error(proc, "train.py", '--operator "sr"')


def test_sample_heldout_and_png(trained, tmp_path):
    out = tmp_path / "s.safetensors"
    proc = run("sample.py", trained, "--heldout", "0:3", "--n", "40", "--show", "4", "--out", out,
               "--figure", tmp_path / "fig.png")
    assert proc.returncode == 0, proc.stderr
    assert "sample/s" in proc.stderr  # progress counts samples, with a rate
    assert (tmp_path / "fig.png").stat().st_size > 1000
    t = load_file(out)
    assert t["samples"].shape == (3, 40, 1, 8, 8) and t["mean"].shape == (3, 1, 8, 8) and t["std"].shape == (3, 1, 8, 8)
    assert t["x_true"].shape == (3, 1, 8, 8) and t["y"].shape == (3, 1, 4, 4) and t["labels"].shape == (3,)
    assert torch.isfinite(t["samples"]).all()
    pngs = sorted((tmp_path / "s_png").glob("*.png"))
    assert [p.name for p in pngs] == ["heldout00000.png", "heldout00001.png", "heldout00002.png"]  # by held-out index
    from PIL import Image
    # measurement, 4 samples, mean, std, truth: 8 tiles of 8+2 pixels, scaled 16x (nearest) so a digit is 128 pixels
    assert Image.open(pngs[0]).size == (8 * 10 * 16, 10 * 16)

    # the same measurements as a PNG give a checkpoint-shaped y; the python API agrees with the file
    import aps
    from aps.image_grid import save_png
    img = ((t["y"][0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    save_png(img, tmp_path / "low.png")
    proc = run("sample.py", trained, "--png", tmp_path / "low.png", "--n", "5", "--out", tmp_path / "p.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert load_file(tmp_path / "p.safetensors")["samples"].shape == (1, 5, 1, 8, 8)
    x, log_q = aps.load(trained).sample(t["y"], 40)
    assert torch.allclose(x, t["samples"], atol=1e-5) and log_q.shape == (3, 40)


def test_wrong_prior_operator_or_shape_is_one_line(trained, tmp_path):
    other = save_tiny_prior(tmp_path / "other", seed=1)
    cases = [
        (["--heldout", "0:2", "--operator", "sr", "--op-arg", "factor=4"], "trained for the operator sr"),
        (["--heldout", "0:2", "--prior", other], "trained with the prior"),
        (["--y", "1,2,3"], "must have shape (batch, 1, 4, 4)"),
    ]
    for args, needle in cases:
        assert_one_line_error(run("sample.py", trained, *args, "--out", tmp_path / "o.safetensors"), "sample.py", needle)
    import aps
    from aps.errors import ApsError
    from aps.operators import build
    with pytest.raises(ApsError, match="operator"):
        aps.load(trained, operator=build("sr", image_shape=(1, 8, 8), factor=4))
    with pytest.raises(ApsError, match="trained for the operator sr"):
        aps.load(trained, operator=build("denoise", image_shape=(1, 8, 8)))
    with pytest.raises(ApsError, match="shape"):
        aps.load(trained).sample(torch.zeros(2, 1, 8, 8), 3)
    from aps.sampling import heldout_measurements
    with pytest.raises(ApsError, match="outside"):
        heldout_measurements(aps.load(trained), 0, 9999)


@pytest.mark.parametrize("opts, needle", [
    ({"prior": ""}, "--prior and --operator go together"),
    ({"op_arg": ["factor"]}, "key=value"),
    ({"operator": "nope"}, "unknown operator"),
    ({"op_arg": ["factor=3"]}, "factor"),
    ({"data": "/nonexistent/folder"}, "does not exist"),
    ({"operator": "classifier", "backprojection": True}, "classifier"),
])
def test_train_bad_image_input(prior, tmp_path, opts, needle):
    from aps.config import TrainConfig
    from aps.errors import ApsError
    from aps.training import train

    cfg = dict(prior=str(prior), operator="sr", op_arg=["factor=2"], data="digits8", out=str(tmp_path / "o"),
               steps=1, cpu=True, glow_levels=2, glow_steps=1, glow_hidden=8, glow_cond=8)
    with pytest.raises(ApsError, match=needle.replace("(", r"\(")):
        train(TrainConfig(**{**cfg, **opts}))


def test_train_cli_error_is_one_line(prior, tmp_path):
    proc = run("train.py", "--prior", prior, "--operator", "sr", "--op-arg", "factor=3", "--out", tmp_path / "o", "--cpu")
    assert_one_line_error(proc, "train.py", "factor")


def test_every_conditioning_kind_trains_in_process(prior, tmp_path):
    """denoise (image), inpainting (mask channel), cs (vector) and a classifier (class), bf16 + accumulation."""
    from aps.config import TrainConfig
    from aps.training import train

    cls = save_tiny_classifier(tmp_path / "cls")
    for op, extra in [("denoise", []), ("inpaint_box", []), ("cs", ["m=16"]), ("classifier", [f"path={cls}"])]:
        cfg = TrainConfig(prior=str(prior), operator=op, op_arg=extra, data="digits8", out=str(tmp_path / op),
                          steps=2, batch_size=4, n_z=1, n_elbo=1, fkl_weight=1.0, warmup=1, log_every=1,
                          checkpoint_every=2, sample_every=0, cpu=True, glow_levels=2, glow_steps=1, glow_hidden=8,
                          glow_cond=8, grad_accum=2, mixed_precision="bf16" if op == "denoise" else "no")
        reset_accelerate()
        train(cfg)
        import aps
        from aps.sampling import heldout_measurements
        sampler = aps.load(tmp_path / op)
        y, x_true, labels = heldout_measurements(sampler, 0, 2)
        x, _ = sampler.sample(y, 3)
        assert x.shape == (2, 3, 1, 8, 8) and torch.isfinite(x).all(), op
        if op == "classifier":
            assert sampler.flow.config().get("class_template") is True  # the default for a class label
            from aps.evaluate_images import score_posterior
            scores = score_posterior(sampler, y, x_true, n_samples=4, judge=sampler.operator.net)
            assert 0 <= scores["class_accuracy"].min() <= scores["class_accuracy"].max() <= 1
            # judged by the operator's own network, the judge agrees with class_accuracy
            torch.testing.assert_close(scores["judge_accuracy"], scores["class_accuracy"])


def _two_rank_training(prior, out, marks):
    from aps.config import TrainConfig
    from aps.training import train

    def record(accelerator, model, step):
        if step == 3:
            sums = [p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters()]
            Path(marks, f"rank{accelerator.process_index}.json").write_text(
                json.dumps({"n": accelerator.num_processes, "sums": sums}))

    cfg = TrainConfig(prior=prior, operator="denoise", data="digits8", out=out, steps=3, batch_size=4, n_z=1,
                      n_elbo=1, fkl_weight=1.0, warmup=1, log_every=1, checkpoint_every=3, sample_every=0,
                      glow_levels=2, glow_steps=1, glow_hidden=8, glow_cond=8)
    train(cfg, callback=record)


def test_two_cpu_processes_end_with_the_same_weights(prior, tmp_path):
    # debug_launcher forks; a fresh interpreter forks cleanly (forking pytest after torch's thread pools
    # have run can hang the children)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from test_image_training import _two_rank_training; "
            f"from accelerate import debug_launcher; debug_launcher(_two_rank_training, "
            f"args=({str(prior)!r}, {str(tmp_path / 'ddp')!r}, {str(tmp_path)!r}), num_processes=2)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["n"] == ranks[1]["n"] == 2
    assert ranks[0]["sums"] == pytest.approx(ranks[1]["sums"], rel=1e-6, abs=1e-7)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["step"] == 3


@pytest.mark.parametrize("op", ["denoise", "inpaint_box", "sr", "deblur", "classifier", "classifier-calibrated"])
def test_shipped_mnist_flows_load_and_sample(op):
    import aps
    from aps.sampling import heldout_measurements

    folder = ROOT / "checkpoints" / f"mnist-{op}-flow"
    if not folder.is_dir():
        pytest.skip(f"{folder} not shipped")
    sampler = aps.load(folder)
    assert sampler.meta["task"]["prior"]["path"] == "checkpoints/mnist-prior"
    y, x_true, _ = heldout_measurements(sampler, 0, 2)
    x, log_q = sampler.sample(y, 3)
    assert x.shape == (2, 3, 1, 32, 32) and torch.isfinite(x).all() and torch.isfinite(log_q).all()


@pytest.mark.parametrize("op", ["denoise", "inpaint_box", "sr", "deblur", "classifier-calibrated"])
def test_shipped_mnist_flows_are_calibrated_where_the_digit_is(op):
    """The shipped flows' 90% intervals hold ~90% of held-out truth on the stroke pixels (and the inpainting box),
    not only on the background: before the calibration stages these were 14-33% (BENCHMARKS.md, "The reverse-KL
    weight and calibration")."""
    import aps
    from aps.evaluate_images import coverage_by_region
    from aps.sampling import heldout_measurements

    folder = ROOT / "checkpoints" / f"mnist-{op}-flow"
    if not folder.is_dir():
        pytest.skip(f"{folder} not shipped")
    sampler = aps.load(folder)
    y, x_true, _ = heldout_measurements(sampler, 0, 10)
    x, _ = sampler.sample(y, 100, seed=0)
    cov = coverage_by_region(x, x_true, sampler.operator)
    assert cov["stroke"][0] > 0.8, cov
    if "unobserved" in cov:
        assert cov["unobserved"][0] > 0.8, cov


def test_training_images_are_dequantised_within_one_grey_level():
    """The forward-KL pairs need a density: x = grid value + U(-1/2, 1/2) of a grey level, never on the grid."""
    from types import SimpleNamespace

    from aps.data import load_digits8
    from aps.operators import build
    from aps.tasks import ImageTask

    images = load_digits8("train")
    task = ImageTask(SimpleNamespace(event_shape=(1, 8, 8)), build("denoise", image_shape=[1, 8, 8], sigma_y=0.1),
                     "digits8", images)
    torch.manual_seed(0)
    x = task.sample_x(512)
    step = 2.0 / (task.levels - 1)  # 1/8 for 0..16 mapped to [-1, 1]
    offset = (x + 1) / step - ((x + 1) / step).round()  # position inside the grey level, in levels
    assert offset.abs().max() <= 0.5 + 1e-5
    assert offset.abs().mean() > 0.2  # uniform on (-1/2, 1/2): mean |u| = 1/4; 0 if not dequantised


def test_class_statistics_follow_the_operators_labels(tmp_path):
    """The class template starts at the mean and std of the training images the classifier puts in each class."""
    from types import SimpleNamespace

    from aps.operators import build
    from aps.tasks import ImageTask

    torch.manual_seed(0)
    op = build("classifier", image_shape=(1, 8, 8), path=str(save_tiny_classifier(tmp_path / "cls")))
    images = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    task = ImageTask(SimpleNamespace(event_shape=(1, 8, 8)), op, "digits8", images)
    mean, std = task.class_statistics(chunk=64)
    labels = op(images).argmax(1)
    assert mean.shape == std.shape == (10, 1, 8, 8)
    for c in range(10):
        xc = images[labels == c]
        if len(xc) >= 2:
            torch.testing.assert_close(mean[c], xc.mean(0))
            torch.testing.assert_close(std[c], xc.std(0))
        else:  # too few images in the class: the overall statistics
            torch.testing.assert_close(mean[c], images.mean(0))
    assert len(labels.unique()) >= 2  # the check above saw real classes


def test_stop_after_pauses_and_resume_finishes_with_one_clock(tmp_path):
    """--stop-after ends the invocation with the training state saved; --resume goes on and the run's clock adds up."""
    from aps.config import TrainConfig
    from aps.training import train

    steps = []
    cfg = TrainConfig(mcgdiff="2,1,0", out=str(tmp_path / "run"), steps=6, batch_size=8, n_z=1, n_elbo=1,
                      flow_layers=1, flow_hidden=8, flow_blocks=1, warmup=1, log_every=1, checkpoint_every=100,
                      cpu=True, stop_after=1e-9, max_seconds=1e4)
    train(cfg, callback=lambda acc, model, step: steps.append(step))
    first = json.loads((tmp_path / "run" / "config.json").read_text())
    assert steps == [1] and first["step"] == 1 and first["train_seconds"] >= 0  # paused after one step, saved
    reset_accelerate()
    cfg.resume, cfg.stop_after = True, 0.0
    train(cfg, callback=lambda acc, model, step: steps.append(step))
    done = json.loads((tmp_path / "run" / "config.json").read_text())
    assert steps == [1, 2, 3, 4, 5, 6] and done["step"] == 6
    assert done["train_seconds"] >= first["train_seconds"]


def test_init_from_starts_a_new_run_at_a_checkpoints_weights(tmp_path):
    """--init-from loads the weights (same task and architecture) and trains on with a fresh optimizer."""
    from aps.config import TrainConfig
    from aps.errors import ApsError
    from aps.training import train

    base = dict(mcgdiff="2,1,0", steps=2, batch_size=8, n_z=1, n_elbo=1, flow_layers=1, flow_hidden=8, flow_blocks=1,
                warmup=1, log_every=1, checkpoint_every=100, cpu=True)
    train(TrainConfig(**base, out=str(tmp_path / "a")))
    source = load_file(tmp_path / "a" / "flow.safetensors")
    reset_accelerate()
    train(TrainConfig(**{**base, "steps": 1, "seed": 7}, lr=1e-12, out=str(tmp_path / "b"), init_from=str(tmp_path / "a")))
    started = load_file(tmp_path / "b" / "flow.safetensors")
    assert all(torch.allclose(source[k], started[k], atol=1e-6) for k in source)  # a 1e-12 step moves nothing
    reset_accelerate()
    train(TrainConfig(**{**base, "steps": 1, "seed": 7}, lr=1e-12, out=str(tmp_path / "c")))
    fresh = load_file(tmp_path / "c" / "flow.safetensors")
    assert any(not torch.allclose(source[k], fresh[k], atol=1e-6) for k in source)  # without it: other weights
    for change, needle in [({"mcgdiff": "2,1,1"}, "another task"), ({"flow_hidden": 16}, "another architecture")]:
        reset_accelerate()
        with pytest.raises(ApsError, match=needle):
            train(TrainConfig(**{**base, **change}, out=str(tmp_path / "d"), init_from=str(tmp_path / "a")))


def test_stronger_image_flow_options_train_and_resume_from_the_checkpoint(prior, tmp_path):
    """The encoder blocks, coupling blocks, attention and TarFlow options train (APS + forward KL: both directions
    of every block), are saved with the flow, come back on --resume, and a change of them on resume is refused."""
    from aps.config import TrainConfig
    from aps.errors import ApsError
    from aps.training import train

    arch = dict(glow_enc_blocks=1, glow_blocks=1, glow_attention=1, glow_tarflow=2, glow_tarflow_width=8,
                glow_tarflow_layers=1)
    cfg = TrainConfig(prior=str(prior), operator="denoise", data="digits8", out=str(tmp_path / "run"), steps=2,
                      batch_size=4, n_z=2, n_elbo=1, fkl_weight=1.0, warmup=1, log_every=1, checkpoint_every=1,
                      sample_every=0, cpu=True, glow_levels=2, glow_steps=1, glow_hidden=8, glow_cond=8, **arch)
    train(cfg)
    flow = json.loads((tmp_path / "run" / "config.json").read_text())["flow"]
    assert (flow["encoder_blocks"], flow["coupling_blocks"], flow["attention_levels"], flow["tarflow_blocks"]) == (1, 1, 1, 2)
    reset_accelerate()
    with pytest.raises(ApsError, match="cannot change"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True, "steps": 3, "glow_tarflow": 0, "glow_blocks": 3}))
    reset_accelerate()
    train(TrainConfig(**{**cfg.to_dict(), "resume": True, "steps": 3}))
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["step"] == 3 and meta["flow"] == flow
    saved = TrainConfig.from_dict(meta["train"])
    assert all(getattr(saved, k) == v for k, v in arch.items())
