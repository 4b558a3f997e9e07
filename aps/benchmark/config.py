"""What a benchmark run is: the checkpoint, the methods, the measurements, each solver's options and grid, I/O.

Defaults sit here once, one line of help each; benchmark.py turns them into command-line options.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class BenchmarkConfig:
    # main
    checkpoint: str = ""                     # an APS flow folder (train.py's): its prior and operator are the benchmark's
    solvers: list = field(default_factory=lambda: ["aps", "dps", "cm1", "cm2"])  # methods, by registry name
    n_measurements: int | None = None        # held-out measurements scored (default: 32 mixture, 16 image)
    n_samples: int | None = None             # posterior samples per measurement (default: 256 mixture, 32 image)
    n_tune: int = 8                          # separate measurements each iterative solver is tuned on
    tune_samples: int = 0                    # samples per tuning measurement (0: n_samples, at most 64)
    tune_first: int = 400                    # images: first held-out digit of the tuning set (scored digits are 0..)
    # solver options (a list is the tuning grid; one value: no tuning)
    aps_temperature: list = field(default_factory=lambda: [1.0])  # the flow's latent temperature (a grid: chosen by calibration)
    dps_zeta: list = field(default_factory=lambda: [0.3, 1.0, 3.0])   # DPS step on grad ||y - A(x0_hat)||
    dps_steps: int | None = None             # DPS steps (None: every timestep of the prior, 1000)
    cm1_zeta: list = field(default_factory=lambda: [0.3, 1.0, 3.0])   # CM I step: zeta sigma_i grad L
    cm1_steps: int = 1000                    # CM I Karras steps (1000 in the paper)
    cm2_lr1: list = field(default_factory=lambda: [0.1, 0.3, 1.0])    # CM II stage-1 Adam lr
    cm2_k: int = 50                          # CM II Adam steps per stage
    ddrm_eta: list = field(default_factory=lambda: [0.85])            # DDRM eta (when DDRM is installed)
    ddrm_steps: int = 20                     # DDRM steps
    cm: str = "checkpoints/mnist-cm"         # images: the distilled consistency model of the prior (CM I, CM II)
    cm_ode_steps: int = 24                   # mixtures: RK4 steps of the exact ODE consistency function
    budget_s: float | None = None            # wall-clock seconds per method's scored run (and per tuning candidate)
    # performance
    device: str = "cpu"
    threads: int = 1                         # torch CPU threads
    batch_size: int = 4096                   # rows (measurements x samples) per solver call (memory)
    throughput_batch: int = 1000             # APS: samples/s of one flow pass of this many samples
    seed: int = 0                            # measurement noise (images) and the solvers' noise
    heldout_data: str | None = None          # images: held-out images of this data set (flows trained on --data prior)
    # I/O
    out: str = "results/benchmark"           # folder: benchmark.json (written after each method) and figures/*.png
    judge: str = "checkpoints/mnist-classifier-heldout"  # classifier operators: a second classifier scoring samples
    figures: bool = True
    progress: bool = True                    # tqdm bars
    command: str = ""                        # recorded in the JSON

    def solver_options(self, name: str) -> tuple[dict, list]:
        """(fixed options, grid of the tuned option) of solver `name` (constructor arguments)."""
        return {
            "prior": ({}, []),
            "dps": ({"steps": self.dps_steps}, list(self.dps_zeta)),
            "cm1": ({"steps": self.cm1_steps}, list(self.cm1_zeta)),
            "cm2": ({"k1": self.cm2_k, "k2": self.cm2_k}, list(self.cm2_lr1)),
            "ddrm": ({"steps": self.ddrm_steps}, list(self.ddrm_eta)),
        }[name]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
