"""Running the entry scripts as a user would, shared by the CLI tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(script, *args):
    """Run ROOT/script with args in a fresh interpreter; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)


def assert_one_line_error(proc, script, needle):
    """Exit code 2, no traceback, and a last stderr line 'script: error: ...' that mentions needle."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and needle in last, proc.stderr


def run_here(script, *args):
    """Run ROOT/script's main() in this process (fast: no new interpreter, imports shared) as `run` would;
    returns a CompletedProcess with the exit code and the captured output. For scripts whose errors
    leave no state behind (each call builds its own objects)."""
    import contextlib
    import io
    import runpy
    import traceback

    argv, out, err, code = sys.argv, io.StringIO(), io.StringIO(), 0
    sys.argv = [str(ROOT / script), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # what a fresh interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())
