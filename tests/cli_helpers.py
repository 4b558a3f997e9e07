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
