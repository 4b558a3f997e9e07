"""A run that loses nothing: non-finite steps caught and named, one run per folder, no pickle, crash-safe states."""
import hashlib
import multiprocessing
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aps.config import TrainConfig
from aps.errors import ApsError
from aps.train_state import list_states
from aps.training import train

TINY = dict(mcgdiff="2,1,0", steps=6, batch_size=16, n_z=2, n_elbo=2, flow_layers=2, flow_hidden=16, warmup=1,
            checkpoint_every=2, log_every=3, cpu=True)


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


def finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())


# -- non-finite guard --------------------------------------------------------------------------------

def nan_after(monkeypatch, cls, name, calls, values=lambda out: out * float("nan")):
    """Make cls.name return NaNs from its `calls`-th call on."""
    original, count = getattr(cls, name), [0]

    def patched(self, *args, **kwargs):
        count[0] += 1
        out = original(self, *args, **kwargs)
        return values(out) if count[0] >= calls else out

    monkeypatch.setattr(cls, name, patched)


@pytest.mark.parametrize("where, needle", [("prior", "prior (the prior's ELBO"), ("measurement", "the measurements y")])
def test_nonfinite_prior_or_measurement_stops_the_run_and_names_it(tmp_path, monkeypatch, where, needle):
    from aps.operators import MatrixOperator
    from aps.priors import GaussianMixturePrior

    if where == "prior":
        nan_after(monkeypatch, GaussianMixturePrior, "elbo", 3)
    else:
        nan_after(monkeypatch, MatrixOperator, "measure", 3)
    with pytest.raises(ApsError, match="step 3: not finite") as err:
        train(tiny(tmp_path))
    assert needle in str(err.value) and "stays at step 2" in str(err.value)
    run = tmp_path / "run"
    assert finite(run / "flow.safetensors") and [p.name for p in list_states(run)] == ["step_0000002"]


def test_nonfinite_skip_steps_over_a_bad_step(tmp_path, monkeypatch, capsys):
    from aps.priors import GaussianMixturePrior

    original, count = GaussianMixturePrior.elbo, [0]

    def once(self, *args, **kwargs):  # NaN on the 3rd call (step 3) only
        count[0] += 1
        out = original(self, *args, **kwargs)
        return out * float("nan") if count[0] == 3 else out

    monkeypatch.setattr(GaussianMixturePrior, "elbo", once)
    train(tiny(tmp_path, nonfinite="skip", ema_decay=0.9))
    assert "step 3 skipped: not finite" in capsys.readouterr().out
    assert finite(tmp_path / "run" / "flow.safetensors")


def test_nonfinite_skip_gives_up_after_many_in_a_row(tmp_path, monkeypatch):
    from aps.priors import GaussianMixturePrior

    nan_after(monkeypatch, GaussianMixturePrior, "elbo", 2)
    with pytest.raises(ApsError, match="10 steps in a row"):
        train(tiny(tmp_path, nonfinite="skip", steps=20, checkpoint_every=100))
    assert not (tmp_path / "run" / "flow.safetensors").exists()  # nothing was ever saved


def test_nan_in_the_flow_parameters_is_named(tmp_path):
    def poison(accelerator, model, step):
        if step == 3:
            with torch.no_grad():
                next(accelerator.unwrap_model(model).flow.parameters()).view(-1)[0] = float("nan")

    with pytest.raises(ApsError, match="step 4: not finite: 1 flow parameters"):
        train(tiny(tmp_path), callback=poison)


def test_huge_lr_on_resume_keeps_the_good_run(tmp_path):
    """--lr 1e30 makes the loss NaN from step 2: the run stops and the saved flow and states stay as they were."""
    cfg = tiny(tmp_path)
    train(cfg)
    before = hashes(tmp_path / "run")
    cfg = tiny(tmp_path, steps=12, resume=True, lr=1e30, warmup=1)
    with pytest.raises(ApsError, match="not finite"):
        train(cfg)
    assert hashes(tmp_path / "run") == before


def test_huge_lr_cli_one_line(tmp_path):
    from cli_helpers import assert_one_line_error, run

    proc = run("train.py", "--mcgdiff", "2,1,0", "--out", tmp_path / "o", "--lr", "1e30", "--steps", "4",
               "--batch-size", "16", "--flow-layers", "2", "--flow-hidden", "16", "--warmup", "1", "--cpu")
    assert_one_line_error(proc, "train.py", "not finite")
    assert not (tmp_path / "o" / "flow.safetensors").exists()


# -- a run folder belongs to one run ---------------------------------------------------------------

def test_a_new_run_refuses_a_folder_with_a_run_and_overwrite_replaces_it(tmp_path):
    train(tiny(tmp_path, steps=2))
    before = hashes(tmp_path / "run")
    with pytest.raises(ApsError, match="holds a run already"):
        train(tiny(tmp_path, steps=2, mcgdiff="2,1,1"))
    assert hashes(tmp_path / "run") == before  # nothing written (problem.safetensors included)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(tiny(tmp_path, steps=4, mcgdiff="2,1,1", overwrite=True))
    assert hashes(tmp_path / "run") != before and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_states(tmp_path / "run")] == ["step_0000002", "step_0000004"]
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_second_process_cannot_train_into_a_locked_folder(tmp_path):
    from aps.run_folder import RunLock

    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()

    def hold():
        with RunLock(tmp_path / "run"):
            ready.set()
            done.wait(30)

    holder = ctx.Process(target=hold)
    holder.start()
    assert ready.wait(30)
    with pytest.raises(ApsError, match=f"in use by a run of pid {holder.pid}"):
        train(tiny(tmp_path))
    assert not (tmp_path / "run" / "problem.safetensors").exists()
    done.set()
    holder.join()
    # a lock left by a killed process is no lock: the kernel dropped it
    ready.clear()
    done.clear()
    holder = ctx.Process(target=hold)
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert (tmp_path / "run" / ".lock").exists()
    train(tiny(tmp_path, steps=2))


# -- no pickle ------------------------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["APS_PAYLOAD_MARK"]),))


def test_a_planted_pickle_never_runs(tmp_path, monkeypatch):
    """Each file of a run folder in turn replaced by a pickle that would create a file when unpickled:
    --resume, aps.load and sample.py read it as data (fail with one line, or fall back to an older
    training state) and never execute it."""
    import shutil

    import aps
    from cli_helpers import run_here

    mark = tmp_path / "executed"
    monkeypatch.setenv("APS_PAYLOAD_MARK", str(mark))
    pristine = tmp_path / "pristine"
    train(tiny(tmp_path, "pristine", steps=4, ema_decay=0.9))
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file() and "logs" not in p.parts)
    assert len(files) >= 12  # config, flow, problem and 2 x (model, ema, optimizer, rng, state.json)
    payload = pickle.dumps(Payload())
    for rel in files:
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        (run / rel).write_bytes(payload)
        try:
            train(tiny(tmp_path, steps=6, resume=True, ema_decay=0.9))
        except ApsError:
            pass
        try:
            aps.load(run)
        except ApsError:
            pass
        proc = run_here("sample.py", run, "--y", "1", "--n", "4", "--out", tmp_path / f"s{len(rel.parts)}.npz",
                        "--overwrite")
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (rel, proc.stderr)
        assert not mark.exists(), rel


def test_no_torch_load_or_pickle_in_the_library():
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("aps/**/*.py"), *root.glob("*.py")]:
        text = path.read_text()
        for word in ("torch.load(", "pickle.load", "register_for_checkpointing", "accelerator.load_state(", "allow_pickle=True"):
            assert word not in text, f"{path}: {word}"


# -- crash-safe states ----------------------------------------------------------------------------

def _attempt(cfg_dict, kill_at, events, reached):
    """A training attempt in a forked child that SIGKILLs itself at its kill_at-th event (0: never).

    Events: each optimizer step, each safetensors file about to be written and just written, and each
    rename about to happen and just done, so kills land between steps and at every point inside a save."""
    import aps.checkpoint
    import aps.train_state

    count = [0]

    def event():
        count[0] += 1
        events.value = count[0]
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn):
        def wrapper(*args, **kwargs):
            event()
            result = fn(*args, **kwargs)
            event()
            return result
        return wrapper

    aps.train_state.save_file = counted(aps.train_state.save_file)
    aps.checkpoint.save_file = counted(aps.checkpoint.save_file)
    os.replace = counted(os.replace)
    torch.set_num_threads(1)
    def step_done(acc, model, step):
        reached.value = step
        event()

    train(TrainConfig(**cfg_dict), callback=step_done)


def _run_attempt(cfg: TrainConfig, kill_at: int) -> tuple[int, int]:
    ctx = multiprocessing.get_context("fork")
    events, reached = ctx.Value("i", 0), ctx.Value("i", 0)
    p = ctx.Process(target=_attempt, args=(cfg.to_dict(), kill_at, events, reached))
    p.start()
    p.join(120)
    return p.exitcode, events.value, reached.value


@pytest.mark.slow
def test_killed_anywhere_a_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL at many points (between steps, before/after each file of a save, around each rename), --keep 1:
    each resume loses at most one checkpoint interval, and the final flow equals an uninterrupted run's.

    In a fresh interpreter on one thread: forking this pytest process after torch's thread pools have run
    can hang the children."""
    import subprocess
    import sys

    from cli_helpers import ENV, ROOT

    code = (f"import sys, torch; torch.set_num_threads(1); sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            f"from pathlib import Path; from test_reliability import kill_chain; kill_chain(Path({str(tmp_path)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kills" in proc.stdout and int(proc.stdout.split("kills")[1].split()[0]) >= 5


def kill_chain(tmp_path):
    """Attempts killed one after another until one completes (the test above runs it)."""
    base = dict(steps=8, checkpoint_every=2, keep=1, ema_decay=0.9)
    train(tiny(tmp_path, "whole", **base))  # in this process: the forked attempts find everything imported
    code, total, _ = _run_attempt(tiny(tmp_path, "count", **base), 0)
    assert code == 0
    reference = load_file(tmp_path / "whole" / "flow.safetensors")
    run = tmp_path / "run"
    kills, attempt, step_before = 0, 0, 0
    while True:
        has_state = bool(list_states(run))
        cfg = tiny(tmp_path, **base, resume=has_state, overwrite=not has_state)
        kill_at = 3 + (5 * attempt) % (total // 2)  # a different point of the save cycle each attempt
        code, _, reached = _run_attempt(cfg, kill_at)
        attempt += 1
        states = list_states(run)
        assert len(states) <= 1 and not list((run / "checkpoints").glob(".tmp-*")) or code != 0
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kills += 1
        step_now = int(states[-1].name.split("_")[1]) if states else 0
        assert step_now >= step_before  # a kill never loses a state that was complete
        assert reached - step_now <= base["checkpoint_every"]  # at most one interval lost
        step_before = step_now
        assert attempt < 40
    assert kills >= 5
    final = load_file(run / "flow.safetensors")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list(run.glob(".*.tmp-*"))
    print("kills", kills, "attempts", attempt)


# -- sampling streams ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_flow(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    train(tiny(out, steps=2))
    return out / "run"


def test_stream_is_lazy_and_the_same_for_any_chunk(small_flow):
    import aps
    from aps.sampling import BLOCK

    sampler = aps.load(small_flow)
    y = torch.tensor([[0.5], [-1.0]])
    n = BLOCK + 904  # two latent blocks
    x_a, lq_a = sampler.sample(y, n, seed=2, chunk=700)
    x_b, lq_b = sampler.sample(y, n, seed=2, chunk=3 * n)
    torch.testing.assert_close(x_a, x_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(lq_a, lq_b, rtol=0, atol=1e-4)
    i, j, x, log_q = next(sampler.stream(y, 10**9, chunk=256))  # a billion samples: the first piece comes at once
    assert (i, j) == (0, 0) and x.shape == (1, 256, 2) and log_q.shape == (1, 256)


def test_sample_py_streams_into_the_file(small_flow, tmp_path):
    import numpy as np

    import aps
    from cli_helpers import run_here

    n = 5000
    for name in ("s.safetensors", "s.npz"):
        proc = run_here("sample.py", small_flow, "--y", "0.5", "--n", n, "--chunk", 600, "--seed", 1,
                        "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    t = load_file(tmp_path / "s.safetensors")
    z = {k: torch.from_numpy(v) for k, v in np.load(tmp_path / "s.npz").items()}
    x, log_q = aps.load(small_flow).sample(torch.tensor([[0.5]]), n, seed=1)
    for f in (t, z):
        torch.testing.assert_close(f["samples"], x, rtol=0, atol=1e-5)
        torch.testing.assert_close(f["log_q"], log_q, rtol=0, atol=1e-4)
        torch.testing.assert_close(f["mean"], x.mean(1), rtol=0, atol=1e-5)
        torch.testing.assert_close(f["std"], x.std(1), rtol=0, atol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    before = (tmp_path / "s.npz").read_bytes()
    proc = run_here("sample.py", small_flow, "--y", "0.5", "--n", 10, "--out", tmp_path / "s.npz")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and (tmp_path / "s.npz").read_bytes() == before
