"""Flow checkpoints: a folder with flow.safetensors + config.json (+ the problem it was trained for).

One load function serves resume, sample.py and benchmark.py. Nothing is unpickled.

    config.json  {"format": "aps-flow", "format_version": 1, "step": N,
                  "flow": {...constructor arguments...}, "task": {...what prior and operator...},
                  "train": {...the TrainConfig...}}
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .errors import ApsError

FORMAT, FORMAT_VERSION = "aps-flow", 1
WEIGHTS, CONFIG = "flow.safetensors", "config.json"


def build_flow(cfg: dict):
    """A flow from its `config()` dict (weights not loaded)."""
    from .flows.vector import ConditionalVectorFlow

    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "vector":
        return ConditionalVectorFlow(**cfg)
    if kind == "glow":
        from .flows.image import ConditionalGlow
        return ConditionalGlow(**cfg)
    raise ApsError(f"unknown flow type {kind!r} in checkpoint")


def save_checkpoint(folder: str | Path, flow, task: dict, train: dict, step: int, seconds: float | None = None) -> None:
    """Write flow weights and config.json into folder (from the unwrapped module; call on one process).

    seconds: training time so far (all sessions of a resumed run), recorded as "train_seconds".
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in flow.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "flow": flow.config(), "task": task, "train": train}
    if seconds is not None:
        meta["train_seconds"] = round(float(seconds), 1)
    (folder / CONFIG).write_text(json.dumps(meta, indent=1))


def read_config(folder: str | Path) -> dict:
    """config.json of a checkpoint folder, checked to be ours and of a version we read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ApsError(f"checkpoint folder not found: {folder}")
    path = folder / CONFIG
    if not path.is_file():
        raise ApsError(f"{folder} is not an aps checkpoint: no {CONFIG}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ApsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ApsError(f"{folder} is not an aps flow checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ApsError(f"{folder}: checkpoint format version {meta.get('format_version')} is not supported "
                       f"(this aps reads {FORMAT_VERSION})")
    return meta


def load_flow(folder: str | Path, map_location: str = "cpu"):
    """(flow with weights loaded, in eval mode, meta dict) from a checkpoint folder."""
    folder = Path(folder)
    meta = read_config(folder)
    flow = build_flow(meta["flow"])
    if not (folder / WEIGHTS).is_file():
        raise ApsError(f"{folder}: {WEIGHTS} is missing")
    try:
        state = load_file(str(folder / WEIGHTS), device=map_location)
    except Exception as err:  # safetensors' SafetensorError (a truncated or foreign file), OSError
        raise ApsError(f"{folder}: {WEIGHTS} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    try:
        flow.load_state_dict(state)
    except RuntimeError as err:
        raise ApsError(f"{folder}: weights do not match the flow in {CONFIG}: {str(err).splitlines()[0]}") from None
    return flow.eval(), meta
