"""APS against the iterative solvers on one checkpoint: the same held-out measurements, tuning on separate ones,
quality, calibration (expected coverage, TARP, SBC ranks) and cost, as a table, a JSON file and figures.

    from aps.benchmark import BenchmarkConfig, run_benchmark, table
    report = run_benchmark(BenchmarkConfig(checkpoint="runs/d2", solvers=["aps", "dps", "cm1", "cm2"]))
    print(table(report))

Modules: config (what a run is), scoring (mixture and image targets), tuning, runner, calibration (the
diagnostics, usable on any samples), report (the table), figures.
"""
from .config import BenchmarkConfig
from .report import footer, table
from .runner import run_benchmark

__all__ = ["BenchmarkConfig", "run_benchmark", "table", "footer"]
