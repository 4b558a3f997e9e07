"""sample.py on 2 CPU processes (accelerate's debug_launcher: gloo, what `accelerate launch --multi_gpu` gives on
GPUs) writes exactly what one process writes."""
import subprocess
import sys

import torch
from safetensors.torch import load_file

from cli_helpers import ENV, ROOT, run


def _sample_main(argv):
    sys.argv = ["sample.py", *argv]
    sys.path.insert(0, str(ROOT))
    import sample

    sample.main()


def test_two_processes_split_the_measurements_and_match_one_process(tmp_path):
    ck = tmp_path / "ck"
    proc = run("train.py", "--mcgdiff", "2,1,0", "--steps", "3", "--batch-size", "16", "--cpu", "--out", ck)
    assert proc.returncode == 0, proc.stderr
    common = [str(ck), "--from-prior", "5", "--n", "40", "--seed", "3", "--device", "cpu"]
    proc = run("sample.py", *common, "--out", tmp_path / "one.safetensors")
    assert proc.returncode == 0, proc.stderr
    # 5 measurements over 2 processes: shares of 3 and 2, gathered in order on the main process.
    argv = [*common, "--out", str(tmp_path / "two.safetensors")]
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from test_sample_multiprocess import _sample_main; "
            f"from accelerate import debug_launcher; debug_launcher(_sample_main, args=({argv!r},), num_processes=2)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stdout, proc.stdout
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert set(one) == set(two) and one["samples"].shape == (5, 40, 2)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)  # batch-size rounding only
    assert not torch.equal(one["samples"][0], one["samples"][1])  # measurements do get their own latents
