"""The model card train.py writes into a run folder: README.md with the hub's YAML metadata, then what the
flow is for (task, prior fingerprint, data), how it was trained (recipe, command, steps, time, the options
that differ from the recipe's defaults), the last logged loss terms and the sample grid."""
from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
from pathlib import Path

from .checkpoint import read_config
from .config import TrainConfig

CARD = "README.md"


def command_line() -> str:
    """How this process was started, as a command a user can paste (train.py's own arguments)."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return shlex.join(["train.py", *sys.argv[1:]]) if script == "train.py" else ""


def _task_lines(task: dict) -> list[str]:
    if task.get("kind") == "image":
        prior = task["prior"]
        return [f"| prior | `{prior.get('path')}` (weights fingerprint `{prior.get('fingerprint')}`); loading the flow "
                f"with another prior is an error |",
                f"| operator | `{json.dumps(task['operator'])}` |",
                f"| data | `{task.get('data')}` (training split; y made on the fly as operator.measure(x)) |"]
    return [f"| problem | `{task.get('problem')}` in this folder: an exact Gaussian-mixture prior and a linear "
            f"operator (means, weights, variances, A, sigma_y) |"]


def write_card(out, metrics: dict | None = None, command: str | None = None) -> Path:
    """README.md in run folder `out` from its config.json; `metrics`: the last logged loss terms, if any.
    For image tasks the newest preview grid (samples/step_N.png) is copied to samples.png and shown."""
    from huggingface_hub import ModelCard, ModelCardData

    out = Path(out)
    meta = read_config(out)
    cfg = TrainConfig.from_dict(meta["train"])
    task = meta.get("task", {})
    command = command_line() if command is None else command
    tags = ["aps", "normalizing-flow", "posterior-sampling", "inverse-problems"]
    if task.get("kind") == "image":
        tags.append(task["operator"]["name"])
    data = ModelCardData(library_name="aps", license="mit", tags=tags)
    grids = sorted((out / "samples").glob("step_*.png"))
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
    what = (f"the {task['operator']['name']} operator on the prior `{task['prior'].get('path')}`"
            if task.get("kind") == "image" else "a Gaussian-mixture problem")
    recipe = cfg.recipe or "none (the options below)"
    default = TrainConfig()
    changed = {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k) and k not in ("resume", "dry_run")}
    seconds = meta.get("train_seconds")
    lines = [
        f"# {out.name}: an amortized posterior sampler (aps)",
        "",
        f"A conditional normalizing flow q(x | y) (`{meta['flow'].get('type')}`) trained for {what}: one flow "
        f"pass per posterior sample.",
        "",
        "```python",
        "import aps",
        f'sampler = aps.load("{out.name}")   # this folder, or its hub id',
        "x, log_q = sampler.sample(y, 1000)",
        "```",
        "",
        "## Task",
        "",
        "| | |",
        "|---|---|",
        *_task_lines(task),
        "",
        "## Training",
        "",
        f"Recipe: `{recipe}`. {meta.get('step')} steps"
        + (f" in {seconds:.0f} s of training" if seconds is not None else "")
        + f" (torch {_version('torch')}, aps {_version('aps')}, Python {platform.python_version()}, "
          f"{platform.machine()}).",
        "",
    ]
    if command:
        lines += ["    " + command, ""]
    lines += ["Options that differ from the defaults (config.json has them all, grouped by section):", "",
              "| option | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in changed.items()]
    if metrics:
        lines += ["", "## Last logged training terms", "", "| term | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    if (out / "samples.png").is_file():
        lines += ["", "## Samples", "", "![posterior samples of fixed training measurements](samples.png)"]
    lines += ["", "Scores against the truth are not part of training: `benchmark.py RUN` (images and mixtures) or "
              "`scripts/mixture_benchmark.py` (mixtures) measure them."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(out / CARD)
    return out / CARD


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
