"""benchmark.py end to end on CPU with tiny settings: every registered solver on a tiny mixture checkpoint and on
a tiny image flow, the JSON and figures written, the CM II budget honoured, and one error line for bad input."""
import importlib.util
import json
import subprocess

import pytest
import torch

from cli_helpers import ROOT, assert_one_line_error, run
from test_cli import TINY as TINY_MIXTURE
from test_image_training import TINY as TINY_IMAGE, save_tiny_prior
from test_solvers import tiny_unet

from aps.solvers.registry import NAMES

# every solver at a few steps: DPS 4 steps, CM I 3 Karras steps, CM II 2 + 2 Adam steps, a 4-step exact ODE CM
FAST = ["--dps-steps", "4", "--cm1-steps", "3", "--cm2-k", "2", "--cm-ode-steps", "4", "--ddrm-steps", "3",
        "--n-tune", "3", "--no-progress"]
FIGURES = {"quality_vs_time.png", "coverage.png", "tarp.png", "samples.png"}


def run_here(capsys, *args):
    """benchmark.py's main in this process (no interpreter start-up): a CompletedProcess-like result."""
    spec = importlib.util.spec_from_file_location("benchmark_entry", ROOT / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = 0
    try:
        module.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "flow"
    proc = run("train.py", "--mcgdiff", "2,1,0", "--out", out, *TINY_MIXTURE)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 2-step box-inpainting flow on the tiny 8x8 prior, and a random consistency model of the same shape."""
    from aps.solvers.consistency_model import ConsistencyModel

    root = tmp_path_factory.mktemp("img")
    prior = save_tiny_prior(root / "prior")
    proc = run("train.py", "--prior", prior, "--operator", "inpaint_box", "--out", root / "flow",
               "--steps", "2", *TINY_IMAGE)
    assert proc.returncode == 0, proc.stderr
    ConsistencyModel(tiny_unet()).save_pretrained(root / "cm")
    return root


def test_every_solver_on_a_mixture_checkpoint(mixture, tmp_path):
    out = tmp_path / "bench"
    proc = run("benchmark.py", mixture, "--solvers", *NAMES, "--n-measurements", "6", "--n-samples", "16",
               "--dps-zeta", "0.3", "1", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert [m["method"] for m in report["methods"]] == list(NAMES)
    for m in report["methods"]:
        assert f"| {m['method']} |" in proc.stdout
        assert len(m["rows"]) == 6 and 0 <= m["summary"]["tv"]["mean"] <= 1
        cal = m["calibration"]
        assert set(cal) == {"coverage", "hpd", "tarp", "sbc"} and set(cal["coverage"]["curves"]) == {"all", "x0", "x1"}
        assert len(cal["tarp"]["f"]) == 6 and len(cal["sbc"]["counts"]) == 2
        assert m["stats"]["seconds_per_sample"] > 0 and m["stats"]["samples_per_s"] > 0
    aps = report["methods"][0]
    assert "kl" in aps["summary"] and aps["throughput"]["samples_per_s"] > 0
    dps = next(m for m in report["methods"] if m["method"] == "dps")
    assert dps["tuning"]["grid"] == [0.3, 1.0] and dps["tuning"]["chosen"] in (0.3, 1.0)
    assert len(dps["tuning"]["candidates"]) == 2 and "seed 54321" in report["measurements"]["tune"]
    assert {p.name for p in (out / "figures").iterdir()} == FIGURES | {"sbc_ranks.png"}
    assert all(p.stat().st_size < 300_000 for p in (out / "figures").iterdir())


@pytest.mark.slow
def test_every_solver_on_an_image_flow(image, tmp_path):
    out = tmp_path / "bench"
    solvers = list(NAMES)
    proc = run("benchmark.py", image / "flow", "--solvers", *solvers, "--cm", image / "cm", "--n-measurements", "3",
               "--n-samples", "3", "--tune-first", "8", "--cm2-lr1", "0.1", "0.3", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert [m["method"] for m in report["methods"]] == solvers and report["kind"] == "image"
    for m in report["methods"]:
        s = m["summary"]
        assert {"psnr_mean", "psnr_sample", "coverage90", "coverage90_stroke", "coverage90_unobserved"} <= set(s)
        assert set(m["calibration"]["coverage"]["curves"]) == {"all", "stroke", "background", "observed", "unobserved"}
        assert len(m["calibration"]["tarp"]["f"]) == 3
    cm2 = next(m for m in report["methods"] if m["method"] == "cm2")
    assert cm2["tuning"]["option"] == "lr1" and "digits 8..10" in report["measurements"]["tune"]
    assert {p.name for p in (out / "figures").iterdir()} == FIGURES


def test_the_flow_temperature_is_chosen_by_calibration(image, tmp_path, capsys):
    out = tmp_path / "bench"
    proc = run_here(capsys, image / "flow", "--solvers", "aps", "--aps-temperature", "1", "0.2", "--n-measurements", "3",
                    "--n-samples", "8", "--n-tune", "3", "--tune-first", "8", "--no-figures", "--no-progress",
                    "--out", out)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "benchmark.json").read_text())["methods"][0]
    t = m["tuning"]
    assert t["option"] == "temperature" and t["grid"] == [1.0, 0.2] and "coverage90_stroke - 0.9|" in t["chosen_by"]
    gaps = {c["value"]: abs(c["coverage90_stroke"] - 0.9) for c in t["candidates"]}
    assert [c["score"] for c in t["candidates"]] == pytest.approx(list(gaps.values()))
    assert t["chosen"] == min(gaps, key=gaps.get) and m["config"]["temperature"] == t["chosen"]
    cold, warm = (next(c for c in t["candidates"] if c["value"] == v) for v in (0.2, 1.0))
    assert cold["coverage90_stroke"] <= warm["coverage90_stroke"]  # narrower intervals cover less
    assert f"temperature {t['chosen']:g} of [1.0, 0.2] (by calibration)" in proc.stdout


def test_cm2_stops_at_its_budget_and_says_so(mixture, tmp_path, capsys):
    out = tmp_path / "bench"
    proc = run_here(capsys, mixture, "--solvers", "cm2", "--cm2-k", "100000", "--cm2-lr1", "0.1",
               "--budget-s", "0.5", "--n-measurements", "2", "--n-samples", "4", "--no-figures", "--no-progress",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "benchmark.json").read_text())["methods"][0]
    assert m["stats"]["stopped"] and "stage" in m["stats"]["stopped"]
    assert m["stats"]["nfe"] < 2 * 100000 and "stopped at the budget" in proc.stdout


def test_a_budget_stops_every_iterative_solver_with_an_estimate():
    from aps.evaluate import held_out_measurements
    from aps.problems import mcgdiff_problem
    from aps.solvers import CMDPS, DPS, CMInversion, ExactConsistency

    problem = mcgdiff_problem(2, 1, 0)
    _, y = held_out_measurements(problem, 2)
    cm = ExactConsistency(problem.prior, 2)
    for solver in (DPS(1.0, 10_000), CMDPS(cm, 0.1, 10_000), CMInversion(cm, 10_000, 10_000)):
        x = solver.sample(problem.prior, problem.operator, y, 3, torch.Generator().manual_seed(0), budget_s=0.2)
        assert x.shape == (2, 3, 2) and torch.isfinite(x).all()
        assert solver.stats["stopped"] and solver.stats["nfe"] < 10_000, (solver.name, solver.stats)


@pytest.mark.parametrize("args, needle", [
    (["--solvers", "aps", "nope"], "unknown solver 'nope'"),
    (["--n-samples", "0"], "--n-samples must be at least 1"),
    (["--budget-s", "-3"], "--budget-s"),
    (["--dps-zeta", "abc"], "not a number"),
    (["--cm1-steps", "0"], "--cm1-steps must be at least 1"),
    (["--aps-temperature", "0"], "must be a positive number"),
    (["--solvers", "aps", "--aps-temperature", "0.8"], "needs a flow with a standard normal base"),
])
def test_bad_numbers_and_names_are_one_line(mixture, tmp_path, capsys, args, needle):
    assert_one_line_error(run_here(capsys, mixture, *args, "--out", tmp_path / "b"), "benchmark.py", needle)


def test_missing_or_corrupt_checkpoint_is_one_line(mixture, tmp_path, capsys):
    import shutil

    assert_one_line_error(run_here(capsys, tmp_path / "none", "--out", tmp_path / "b"), "benchmark.py", "not found")
    bad = tmp_path / "bad"
    shutil.copytree(mixture, bad)
    (bad / "flow.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_here(capsys, bad, "--out", tmp_path / "b"), "benchmark.py", "safetensors")
    (bad / "config.json").write_text("{not json")
    assert_one_line_error(run_here(capsys, bad, "--out", tmp_path / "b"), "benchmark.py", "not valid JSON")
