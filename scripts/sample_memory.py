"""Peak memory of sample.py against the number of samples: it should follow --chunk, not --n.

    python scripts/sample_memory.py --chunk 8192 --factors 1 10 100 --json benchmarks/sample-memory-DATE.json

Trains a tiny d = 2 mixture flow (a few steps: memory, not quality), then runs sample.py once per n in a
fresh interpreter and reads that process's peak resident set (resource.getrusage maxrss), with the
samples written to a file and with --no-samples (mean and std alone).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, {root!r})\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def peak_mb(args: list, env: dict) -> float:
    proc = subprocess.run([sys.executable, "-c", PEAK.format(root=str(ROOT)), str(ROOT / "sample.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    kb = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")][-1].split()[1]
    return int(kb) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 10, 100], help="n = factor * chunk")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "flow"
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--mcgdiff", "2,1,0", "--steps", "3", "--batch-size",
                        "16", "--cpu", "--out", str(ck)], check=True, capture_output=True, env=env, cwd=ROOT)
        for factor in args.factors:
            n = factor * args.chunk
            common = [ck, "--y", "0.5", "--n", n, "--chunk", args.chunk, "--device", "cpu", "--overwrite"]
            with_samples = peak_mb([*common, "--out", Path(tmp) / "s.safetensors"], env)
            stats_only = peak_mb([*common, "--no-samples", "--out", Path(tmp) / "m.safetensors"], env)
            rows.append({"n": n, "chunk": args.chunk, "peak_mb_samples_to_file": round(with_samples, 1),
                         "peak_mb_no_samples": round(stats_only, 1), "file_mb": round(n * 3 * 4 / 2**20, 1)})
            print(rows[-1], flush=True)
    result = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "flow": "mcgdiff 2,1,0 vector flow (d = 2), 1 measurement", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
