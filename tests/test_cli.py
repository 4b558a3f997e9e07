"""The entry scripts on CPU: train, resume, sample, and one clear line for every bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_one_line_error, run

TINY = ["--steps", "6", "--batch-size", "16", "--n-z", "2", "--n-elbo", "2", "--flow-layers", "2",
        "--flow-hidden", "16", "--checkpoint-every", "3", "--log-every", "3", "--cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "flow"
    proc = run("train.py", "--mcgdiff", "2,1,0", "--out", out, *TINY)
    assert proc.returncode == 0, proc.stderr
    return out


def test_train_writes_a_checkpoint_and_resume_continues(trained, tmp_path):
    meta = json.loads((trained / "config.json").read_text())
    assert meta["format"] == "aps-flow" and meta["step"] == 6 and meta["flow"]["type"] == "vector"
    assert (trained / "flow.safetensors").is_file() and (trained / "problem.safetensors").is_file()
    card = (trained / "README.md").read_text()  # the model card: hub metadata, recipe, command, steps
    import yaml
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "aps"
    assert "Recipe: `mixture-gated`. 6 steps" in card and "train.py --mcgdiff 2,1,0 --out" in card
    before = load_file(trained / "flow.safetensors")
    # resume: the architecture is the checkpoint's; another one on the command line is refused, the same one is fine
    proc = run("train.py", "--out", trained, "--resume", "--steps", "9", "--flow-hidden", "99")
    assert_one_line_error(proc, "train.py", "--flow-hidden 16")
    proc = run("train.py", "--out", trained, "--resume", *TINY[:-1], "--steps", "9", "--flow-hidden", "16", "--cpu")
    assert proc.returncode == 0, proc.stderr
    assert "resume: --steps 6 -> 9" in proc.stderr
    meta = json.loads((trained / "config.json").read_text())
    assert meta["step"] == 9 and meta["flow"]["hidden"] == 16
    after = load_file(trained / "flow.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sample_writes_samples_mean_std(trained, tmp_path):
    out = tmp_path / "s.safetensors"
    proc = run("sample.py", trained, "--from-prior", 3, "--n", 50, "--out", out)
    assert proc.returncode == 0, proc.stderr
    t = load_file(out)
    assert t["samples"].shape == (3, 50, 2) and t["mean"].shape == (3, 2) and t["std"].shape == (3, 2)
    assert t["x_true"].shape == (3, 2) and t["y"].shape == (3, 1) and torch.isfinite(t["samples"]).all()
    assert torch.allclose(t["mean"], t["samples"].mean(1), atol=1e-5)
    # seeded per measurement: the same seed gives the same samples with another chunk size
    out2 = tmp_path / "s2.npz"
    assert run("sample.py", trained, "--from-prior", 3, "--n", 50, "--chunk", 60, "--out", out2).returncode == 0
    import numpy as np
    assert np.allclose(np.load(out2)["samples"], t["samples"].numpy(), atol=1e-6)


def test_python_api(trained):
    import aps

    x, log_q = aps.load(trained).sample(torch.tensor([[0.5], [-1.0]]), 20)
    assert x.shape == (2, 20, 2) and log_q.shape == (2, 20)


@pytest.mark.parametrize("args, needle", [
    (["--y", "1,2"], "shape"),
    (["--y", "nan"], "NaN"),
    (["--y", "abc"], "comma-separated"),
    (["--n", "0", "--y", "1"], "at least 1"),
    (["--y-file", "missing.npz"], "not found"),
    (["--y", "1", "--out", "x.txt"], ".safetensors or .npz"),
    (["--y", "1", "--figure", "x.txt"], ".png, .pdf or .svg"),
    (["--y", "1", "--figure", "f.png"], "needs an image checkpoint"),
    (["--y", "1", "--temperature", "0"], "temperature must be a positive number"),
])
def test_sample_bad_input(trained, tmp_path, args, needle):
    args = [a if a != "x.txt" else tmp_path / "x.txt" for a in args]
    assert_one_line_error(run("sample.py", trained, *args), "sample.py", needle)


def test_sample_missing_or_foreign_checkpoint(tmp_path):
    assert_one_line_error(run("sample.py", tmp_path / "nope", "--y", "1"), "sample.py", "not found")
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    assert_one_line_error(run("sample.py", tmp_path, "--y", "1"), "sample.py", "not an aps flow checkpoint")


@pytest.mark.parametrize("args, needle", [
    (["--mcgdiff", "2,1,0", "--steps", "-3"], "--steps"),
    (["--mcgdiff", "2,x"], "three integers"),
    (["--problem", "missing.npz"], "not found"),
    ([], "--problem"),
    (["--mcgdiff", "2,1,0", "--temper-start", "0"], "--temper-start"),
    (["--mcgdiff", "2,1,0", "--likelihood-weight", "0"], "--likelihood-weight"),
    (["--mcgdiff", "2,1,0", "--stop-after", "-1"], "--stop-after"),
])
def test_train_bad_input(tmp_path, args, needle):
    assert_one_line_error(run("train.py", *args, "--out", tmp_path / "o", "--cpu"), "train.py", needle)


def test_train_foreign_problem_file(tmp_path):
    bad = tmp_path / "bad.npz"
    import numpy as np
    np.savez(bad, means=np.zeros((2, 2)))
    assert_one_line_error(run("train.py", "--problem", bad, "--out", tmp_path / "o", "--cpu"), "train.py", "missing")


def test_problem_file_round_trip_and_train_from_it(tmp_path):
    from aps.problems import load_problem, mcgdiff_problem

    pb = mcgdiff_problem(3, 1, seed=4)
    for name in ("p.npz", "p.safetensors"):
        pb.save(tmp_path / name)
        pb2 = load_problem(tmp_path / name)
        assert torch.allclose(pb2.prior.means, pb.prior.means) and torch.allclose(pb2.operator.A, pb.operator.A)
    proc = run("train.py", "--problem", tmp_path / "p.npz", "--out", tmp_path / "o", *TINY)
    assert proc.returncode == 0, proc.stderr


def test_cuda_graph_on_without_a_gpu_is_one_error_line(tmp_path):
    """--cuda-graph on asks for a CUDA process: on the CPU it stops with one line, before anything is written."""
    from aps.config import TrainConfig
    from aps.errors import ApsError
    from aps.training import train

    cfg = TrainConfig(mcgdiff="2,1,0", cuda_graph="on", cpu=True, steps=1, out=str(tmp_path / "run"))
    with pytest.raises(ApsError, match="cuda-graph on needs one process on a CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sample_compiled_gives_the_same_samples(tmp_path, monkeypatch):
    """sample.py --compile runs the flow's pass through torch.compile (it is compiled: dynamo made a graph) and
    gives the eager samples to float rounding. A flow of the base and frame alone keeps the compile short."""
    import runpy

    import torch._dynamo

    import aps
    from cli_helpers import ROOT

    flow = tmp_path / "flow"
    proc = run("train.py", "--mcgdiff", "2,1,0", "--out", flow, "--steps", "3", "--batch-size", "16", "--flow-layers",
               "0", "--log-every", "3", "--cpu")
    assert proc.returncode == 0, proc.stderr
    y = torch.tensor([[0.5], [-1.0]])
    eager, eager_log_q = aps.load(flow).sample(y, 40, chunk=30)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "compiled.safetensors"
    monkeypatch.setattr("sys.argv", ["sample.py", str(flow), "--y-file", str(tmp_path / "y.safetensors"), "--n", "40",
                                     "--chunk", "30", "--device", "cpu", "--compile", "--out", str(out)])
    from safetensors.torch import save_file
    save_file({"y": y}, str(tmp_path / "y.safetensors"))
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    compiled = load_file(out)
    assert torch.allclose(compiled["samples"], eager, atol=1e-4) and torch.allclose(compiled["log_q"], eager_log_q, atol=1e-3)
    assert not torch.equal(eager[0], eager[1])  # (two measurements, two sample sets)
