"""Every command of README.md runs as written, in README order, in one scratch folder, with tiny settings: the
counts that only make a run long (steps, samples, held-out digits, solver steps) are set small, `--device cuda`
becomes cpu and `accelerate launch`'s own options are dropped (one CPU process). pip and pytest lines are
skipped (CI runs them); the Python blocks run as they are."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from cli_helpers import ENV, ROOT

README = (ROOT / "README.md").read_text()

# option -> small value, replaced where a command gives the option
SMALLER = {"--n": "8", "--heldout": "0:2", "--max-seconds": "60", "--n-heldout": "2", "--n-samples": "4",
           "--device": "cpu", "--steps": "2", "--prior-bank": "8", "--prior-steps": "4", "--budget-s": "20",
           "--throughput-batch": "100"}
# what is appended to every run of a script (argparse keeps the last value)
TINY = {
    "train.py": ["--batch-size", "8", "--n-z", "1", "--n-elbo", "1", "--steps", "2", "--log-every", "1",
                 "--sample-every", "2", "--cpu"],
    "benchmark.py": ["--n-samples", "20", "--n-measurements", "2", "--dps-steps", "4", "--cm1-steps", "4",
                     "--cm-ode-steps", "2", "--cm2-k", "2", "--throughput-batch", "16"],
}


def readme_commands() -> list[list[str]]:
    """The commands of README's bash blocks, continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def runnable(argv: list[str]) -> list[str] | None:
    """The command as run here, or None for pip / pytest lines."""
    if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
        return None
    if argv[:2] == ["accelerate", "launch"]:  # its options run up to the script
        argv = ["python", *argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]]
    assert argv[0] == "python" and argv[1].endswith(".py"), argv
    script, args = argv[1], argv[2:]
    resume = "--resume" in args
    args = [SMALLER.get(args[i - 1], a) if i and args[i - 1] in SMALLER and not resume else a
            for i, a in enumerate(args)]
    name = os.path.basename(script)
    if name == "train.py" and ("--help" in args or "--dry-run" in args):
        extra = []
    elif name == "train.py" and resume:
        extra = ["--steps", "3", "--cpu"]  # the run trained 2: one more
    else:
        extra = TINY.get(name, [])
    return [sys.executable, str(ROOT / script), *args, *extra]


COMMANDS = [c for c in map(runnable, readme_commands()) if c is not None]
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch folder with the repository's checkpoints and the input files README's commands name."""
    import numpy as np
    import torch

    from safetensors.torch import save_file

    from aps.image_grid import save_png
    from aps.problems import mcgdiff_problem

    ws = tmp_path_factory.mktemp("readme")
    (ws / "checkpoints").symlink_to(ROOT / "checkpoints")
    (ws / "scripts").symlink_to(ROOT / "scripts")
    mcgdiff_problem(2, 1, seed=0).save(ws / "my_problem.npz")
    np.savez(ws / "measurements.npz", y=np.random.default_rng(0).normal(size=(2, 2)).astype(np.float32))
    save_png((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), ws / "my_lowres.png")
    save_file({"y": torch.randn(2, 1, 32, 32)}, str(ws / "my_y.safetensors"))  # measurements without ground truth
    (ws / "my_100_digits").mkdir()  # a folder of a few paired images
    for i in range(3):
        save_png((torch.rand(32, 32) * 255).to(torch.uint8).numpy(), ws / "my_100_digits" / f"{i}.png")
    return ws


def test_readme_has_the_commands_it_should():
    scripts = [os.path.basename(c[1]) for c in COMMANDS]
    assert {"train.py", "sample.py", "benchmark.py"} <= set(scripts) and len(COMMANDS) >= 15
    assert any("--recipe" in c for c in COMMANDS) and PYTHON_BLOCKS


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}-{os.path.basename(c[1])}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs(workspace, command):
    proc = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=600,
                          env={**ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{shlex.join(command)}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"python-{i}" for i in range(len(PYTHON_BLOCKS))])
def test_readme_python_runs(workspace, block):
    proc = subprocess.run([sys.executable, "-c", block], cwd=workspace, capture_output=True, text=True,
                          timeout=600, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
