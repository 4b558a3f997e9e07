"""Bad input over train.py and sample.py, as a table: every case gives one `error:` line on stderr, a non-zero
exit, no traceback, and leaves every file it was given as it was. The scripts run in this process (fast)."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import run_here

MIX = ["--steps", "2", "--batch-size", "8", "--n-z", "2", "--n-elbo", "2", "--flow-layers", "2", "--flow-hidden", "8",
       "--warmup", "1", "--cpu"]
IMG = ["--data", "digits8", "--steps", "2", "--batch-size", "4", "--n-z", "2", "--n-elbo", "1", "--warmup", "1",
       "--sample-every", "0", "--glow-levels", "2", "--glow-steps", "1", "--glow-hidden", "8", "--glow-cond", "8", "--cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints and files of every kind, good and bad, in one folder (made once)."""
    from test_image_training import save_tiny_prior

    w = tmp_path_factory.mktemp("world")
    for args in (["--mcgdiff", "2,1,0", "--out", w / "mix", *MIX], ["--mcgdiff", "2,1,1", "--out", w / "mix1", *MIX]):
        assert run_here("train.py", *args).returncode == 0
    save_tiny_prior(w / "prior")
    proc = run_here("train.py", "--prior", w / "prior", "--operator", "denoise", "--out", w / "img", *IMG)
    assert proc.returncode == 0, proc.stderr
    good = np.zeros((3, 1), np.float32)
    np.savez(w / "y.npz", y=good)
    np.savez(w / "y_nan.npz", y=np.full((3, 1), np.nan, np.float32))
    np.savez(w / "y_inf.npz", y=np.full((3, 1), np.inf, np.float32))
    np.savez(w / "y_empty.npz", y=np.zeros((0, 1), np.float32))
    np.savez(w / "y_0d.npz", y=np.float32(1.0))
    np.savez(w / "y_wide.npz", y=np.zeros((3, 5), np.float32))
    np.savez(w / "no_y.npz", x=good)
    save_file({"y": torch.zeros(2, 1, 4, 4)}, str(w / "y_small_img.safetensors"))
    (w / "garbage.npz").write_bytes(b"not a zip file at all")
    (w / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (w / "y.txt").write_text("1 2 3")
    # problems: NaN means, wrong shapes, missing key
    from aps.problems import mcgdiff_problem

    arrays = mcgdiff_problem(2, 1, 0).arrays()
    np.savez(w / "problem_nan.npz", **{**arrays, "means": arrays["means"] * np.nan})
    np.savez(w / "problem_shape.npz", **{**arrays, "A": np.zeros((1, 3))})
    np.savez(w / "problem_neg.npz", **{**arrays, "variances": -arrays["variances"]})
    np.savez(w / "problem_nosigma.npz", **{k: v for k, v in arrays.items() if k != "sigma_y"})
    # checkpoints broken in one way each (copies of the good mixture run)
    def broken(name, edit):
        folder = w / name
        shutil.copytree(w / "mix", folder)
        edit(folder)
        return folder

    def bad_key(f):
        meta = json.loads((f / "config.json").read_text())
        meta["flow"]["bogus"] = 1
        (f / "config.json").write_text(json.dumps(meta))

    def bad_value(f):
        meta = json.loads((f / "config.json").read_text())
        meta["flow"]["n_layers"] = "many"
        (f / "config.json").write_text(json.dumps(meta))

    broken("ck_corrupt_weights", lambda f: (f / "flow.safetensors").write_bytes(b"\x00" * 100))
    broken("ck_truncated", lambda f: (f / "flow.safetensors").write_bytes((f / "flow.safetensors").read_bytes()[:200]))
    broken("ck_bad_key", bad_key)
    broken("ck_bad_value", bad_value)
    broken("ck_config_text", lambda f: (f / "config.json").write_text("{not json"))
    broken("ck_config_binary", lambda f: (f / "config.json").write_bytes(b"\x80\x04\x95"))
    broken("ck_no_weights", lambda f: (f / "flow.safetensors").unlink())
    broken("ck_no_problem", lambda f: (f / "problem.safetensors").unlink())
    broken("ck_corrupt_problem", lambda f: (f / "problem.safetensors").write_bytes(b"junk"))
    broken("ck_foreign_weights", lambda f: shutil.copy(w / "mix1" / "flow.safetensors", f / "flow.safetensors"))
    broken("ck_foreign_format", lambda f: (f / "config.json").write_text(json.dumps({"format": "other"})))
    broken("ck_no_states", lambda f: shutil.rmtree(f / "checkpoints"))
    broken("ck_corrupt_state", lambda f: [(s / "optimizer.safetensors").write_bytes(b"junk")
                                          for s in (f / "checkpoints").iterdir()])
    (w / "a_file").write_text("x")
    (w / "dir.npz").mkdir()
    from PIL import Image

    Image.new("L", (6000, 6000)).save(w / "huge.png")
    (w / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("L", (8, 8)).save(w / "ok.png")
    return w


# (script, args, what the error line must mention); W/ is the world folder, T/ a fresh temporary folder
TRAIN = [
    # options of each kind
    ("--mcgdiff 2,1,0 --steps x", "--steps"),
    ("--mcgdiff 2,1,0 --lr abc", "--lr"),
    ("--mcgdiff 2,1,0 --flow-frame bogus", "--flow-frame"),
    ("--mcgdiff 2,1,0 --steps -3", "--steps"),
    ("--mcgdiff 2,1,0 --steps 0", "--steps"),
    ("--mcgdiff 2,1,0 --batch-size 0", "--batch-size"),
    ("--mcgdiff 2,1,0 --n-z 0", "--n-z"),
    ("--mcgdiff 2,1,0 --keep 0", "--keep"),
    ("--mcgdiff 2,1,0 --checkpoint-every 0", "--checkpoint-every"),
    ("--mcgdiff 2,1,0 --lr 0", "--lr"),
    ("--mcgdiff 2,1,0 --lr -1", "--lr"),
    ("--mcgdiff 2,1,0 --lr inf", "--lr"),
    ("--mcgdiff 2,1,0 --lr nan", "--lr"),
    ("--mcgdiff 2,1,0 --temper-start 0", "--temper-start"),
    ("--mcgdiff 2,1,0 --temper-start nan", "--temper-start"),
    ("--mcgdiff 2,1,0 --ema-decay 1", "--ema-decay"),
    ("--mcgdiff 2,1,0 --grad-clip -1", "--grad-clip"),
    ("--mcgdiff 2,1,0 --max-seconds -1", "--max-seconds"),
    ("--mcgdiff 2,1,0 --likelihood-weight 0", "--likelihood-weight"),
    ("--mcgdiff 2,1,0 --aps-weight 0 --fkl-weight 0", "nothing to train"),
    ("--mcgdiff 2,1,0 --flow-tail-bound 0", "--flow-tail-bound"),
    ("--mcgdiff 2,1,0 --flow-base-components 0 --flow-base-gate", "--flow-base-gate"),
    ("--mcgdiff 2,1,0 --nonfinite maybe", "--nonfinite"),
    ("--resume --overwrite --out W/mix", "--overwrite"),
    ("--mcgdiff 2,1,0 --op-arg factor=2", "--op-arg"),
    ("--mcgdiff 2,x", "three integers"),
    ("--mcgdiff 2,1,0,paper", "unknown generator"),
    ("--mcgdiff 1,1,0,published", "d >= 2"),
    ("--mcgdiff 2,1,0 --no-flow-base-gate --flow-base-cov diag", "--flow-base-gate"),
    ("--mcgdiff 2,1,0 --flow-base-cov maybe", "--flow-base-cov"),
    ("--mcgdiff 2,1,0 --flow-layers -1", "--flow-layers"),
    ("--mcgdiff 2,1,0 --flow-frame fixed", "--flow-frame"),
    ("--mcgdiff 1,1,0", "d >= 2"),
    ("--mcgdiff 2,3,0", "dy"),
    ("", "--problem"),
    ("--mcgdiff 2,1,0 --problem W/y.npz", "say what to train for"),
    # files
    ("--problem W/missing.npz", "not found"),
    ("--problem W/garbage.npz", "cannot read"),
    ("--problem W/garbage.safetensors", "cannot read"),
    ("--problem W/y.txt", "problem"),
    ("--problem W/problem_nan.npz", "NaN"),
    ("--problem W/problem_shape.npz", "operator"),
    ("--problem W/problem_neg.npz", "variances"),
    ("--problem W/problem_nosigma.npz", "missing sigma_y"),
    # the output folder
    ("--mcgdiff 2,1,0 --out W/mix", "holds a run already"),
    ("--mcgdiff 2,1,0 --out W/a_file", "is a file"),
    ("--resume --out T/none", "no run to resume"),
    ("--resume --out W/ck_foreign_format", "not an aps flow checkpoint"),
    ("--resume --out W/ck_config_binary", "not a text"),
    ("--resume --out W/ck_no_states", "no training state"),
    ("--resume --out W/ck_corrupt_state", "no readable training state"),
    ("--resume --out W/ck_no_problem", "not found"),
    ("--resume --out W/ck_corrupt_problem", "cannot read"),
    ("--mcgdiff 2,1,0 --init-from W/missing", "not found"),
    ("--mcgdiff 2,1,0 --init-from W/mix1", "another task"),
    ("--mcgdiff 2,1,0 --init-from W/ck_corrupt_weights", "cannot be read"),
    ("--mcgdiff 2,1,0 --init-from W/ck_foreign_weights", "belongs to another"),
    # images
    ("--prior W/missing --operator denoise", "prior"),
    ("--prior W/mix --operator denoise", "prior"),
    ("--prior checkpoints/mnist-cm --operator denoise", "consistency"),
    ("--prior W/prior", "--operator"),
    ("--prior W/prior --operator bogus", "bogus"),
    ("--prior W/prior --operator sr --op-arg factor=abc", "factor"),
    ("--prior W/prior --operator sr --op-arg factor=3", "factor"),
    ("--prior W/prior --operator sr --op-arg nokey", "key=value"),
    ("--prior W/prior --operator denoise --op-arg sigma_y=-1", "sigma_y"),
    ("--prior W/prior --operator denoise --data W/missing", "missing"),
    ("--prior W/prior --operator denoise --glow-levels 5", "divisible"),
    ("--prior W/prior --operator denoise --resume --out W/mix", "--prior"),
]

SAMPLE = [
    ("W/missing --y 1", "not found"),
    ("W/a_file --y 1", "not found"),
    ("W/ck_foreign_format --y 1", "not an aps flow checkpoint"),
    ("W/ck_corrupt_weights --y 1", "cannot be read"),
    ("W/ck_truncated --y 1", "cannot be read"),
    ("W/ck_bad_key --y 1", "cannot build the flow"),
    ("W/ck_bad_value --y 1", "cannot build the flow"),
    ("W/ck_config_text --y 1", "not valid JSON"),
    ("W/ck_config_binary --y 1", "not a text"),
    ("W/ck_no_weights --y 1", "missing"),
    ("W/ck_no_problem --y 1", "not found"),
    ("W/ck_corrupt_problem --y 1", "cannot read"),
    ("W/ck_foreign_weights --y 1", "another flow or task"),
    ("W/mix --y 1,2", "shape"),
    ("W/mix --y nan", "NaN"),
    ("W/mix --y inf", "NaN or inf"),
    ("W/mix --y abc", "comma-separated"),
    ("W/mix --y ,", "comma-separated"),
    ("W/mix --y 1 --n 0", "at least 1"),
    ("W/mix --y 1 --n -5", "at least 1"),
    ("W/mix --y 1 --n abc", "whole number"),
    ("W/mix --y 1 --n 1.5", "whole number"),
    ("W/mix --y 1 --chunk 0", "--chunk"),
    ("W/mix --y 1 --seed x", "--seed"),
    ("W/mix --y 1 --show -1", "--show"),
    ("W/mix --y 1 --n 1e15", "GB"),
    ("W/mix", "exactly one of"),
    ("W/mix --y 1 --from-prior 2", "exactly one of"),
    ("W/mix --y-file W/missing.npz", "not found"),
    ("W/mix --y-file W/garbage.npz", "cannot read"),
    ("W/mix --y-file W/garbage.safetensors", "cannot read"),
    ("W/mix --y-file W/y.txt", ".safetensors or .npz"),
    ("W/mix --y-file W/no_y.npz", "no array named 'y'"),
    ("W/mix --y-file W/y_nan.npz", "NaN"),
    ("W/mix --y-file W/y_inf.npz", "NaN or inf"),
    ("W/mix --y-file W/y_empty.npz", "B >= 1"),
    ("W/mix --y-file W/y_0d.npz", "batch"),
    ("W/mix --y-file W/y_wide.npz", "shape"),
    ("W/mix --from-prior 0", "positive"),
    ("W/mix --from-prior -2", "positive"),
    ("W/mix --heldout 0:2", "image checkpoint"),
    ("W/mix --png W/ok.png", "image checkpoint"),
    ("W/mix --y 1 --out T/x.txt", ".safetensors or .npz"),
    ("W/mix --y 1 --out W/y.npz", "exists"),
    ("W/mix --y 1 --out W/mix", ".safetensors or .npz"),
    ("W/mix --y 1 --out W/dir.npz", "folder"),
    ("W/mix --y 1 --device bogus", "--device"),
    ("W/mix --y 1 --device cuda:7", "--device"),
    ("W/mix --y 1 --prior W/prior", "mixture checkpoint"),
    ("W/mix --y 1 --operator bogus", "bogus"),
    ("W/img --heldout 0:2 --operator sr --op-arg factor=abc", "factor"),
    ("W/img --heldout 0:2 --operator sr --op-arg factor=2", "operator"),
    ("W/img --heldout 0:2 --prior checkpoints/mnist-cm", "consistency"),
    ("W/img --heldout 0:2 --prior W/missing", "prior"),
    ("W/img --heldout x", "START:STOP"),
    ("W/img --heldout 5:2", "held-out range"),
    ("W/img --heldout 0:100000", "held-out range"),
    ("W/img --y-file W/y_small_img.safetensors", "shape"),
    ("W/img --y-file W/y.npz", "shape"),
    ("W/img --png W/missing.png", "not found"),
    ("W/img --png W/corrupt.png", "cannot read"),
    ("W/img --png W/huge.png", "too large"),
    ("W/img --from-prior 2", "mixture checkpoint"),
]

CASES = [("train.py", *c) for c in TRAIN] + [("sample.py", *c) for c in SAMPLE]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


@pytest.mark.parametrize("script, args, needle", CASES, ids=[f"{s}:{a}" for s, a, _ in CASES])
def test_bad_input_gives_one_line(world, tmp_path, script, args, needle):
    argv = [a.replace("W/", f"{world}/").replace("T/", f"{tmp_path}/") for a in args.split()]
    if script == "sample.py" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "s.safetensors")]
    if script == "train.py" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    if script == "train.py":  # tiny defaults first: the case's own options come later and win
        argv = [*(MIX if "--prior" not in argv else IMG), *argv]
    before = hashes(world)
    proc = run_here(script, *argv)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error:") and needle in errors[0], proc.stderr[-2000:]
    assert hashes(world) == before, "an input file changed"
    assert not (tmp_path / "s.safetensors").exists() and not list(tmp_path.glob(".*partial*"))


def test_the_table_is_large():
    assert len(CASES) >= 100, len(CASES)


def test_png_grids_are_named_by_heldout_index_and_never_stale(world, tmp_path):
    out = tmp_path / "s.safetensors"
    assert run_here("sample.py", world / "img", "--heldout", "0:3", "--n", "5", "--out", out).returncode == 0
    grids = tmp_path / "s_png"
    assert sorted(p.name for p in grids.glob("*.png")) == [f"heldout0000{i}.png" for i in range(3)]
    again = run_here("sample.py", world / "img", "--heldout", "5:6", "--n", "5", "--out", tmp_path / "t.safetensors",
                     "--png-dir", grids)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    again = run_here("sample.py", world / "img", "--heldout", "5:6", "--n", "5", "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in grids.glob("*.png")) == ["heldout00005.png"]
