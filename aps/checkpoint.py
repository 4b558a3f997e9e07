"""Flow checkpoints: a folder with flow.safetensors + config.json (+ the problem it was trained for).

One load function serves resume, sample.py and benchmark.py. Nothing is unpickled.

    config.json  {"format": "aps-flow", "format_version": 1, "step": N,
                  "flow": {...constructor arguments...}, "task": {...what prior and operator...},
                  "train": {...the TrainConfig...}}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
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


def fingerprint(flow_config: dict, task: dict, folder: str | Path) -> str:
    """sha256 (16 hex digits) of a flow's architecture and task (with the bytes of the task's files, a mixture
    problem): stored with the weights, checked on load, so that weights never load under the config of
    another flow, operator or problem."""
    h = hashlib.sha256(json.dumps({"flow": flow_config, "task": task}, sort_keys=True).encode())
    if isinstance(task.get("problem"), str) and (Path(folder) / task["problem"]).is_file():
        h.update((Path(folder) / task["problem"]).read_bytes())
    return h.hexdigest()[:16]


def _replace_atomically(path: Path, write) -> None:
    """write(tmp) then rename tmp onto path: a reader (or a kill) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(folder: str | Path, flow, task: dict, train: dict, step: int, seconds: float | None = None) -> None:
    """Write flow weights and config.json into folder (from the unwrapped module; call on one process).

    Each file is written to a temporary name and renamed into place. The weights carry the fingerprint
    of the flow's config and task in their safetensors metadata. seconds: training time so far (all
    invocations of a resumed run), recorded as "train_seconds".
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in flow.state_dict().items()}
    tag = {"format": FORMAT, "fingerprint": fingerprint(flow.config(), task, folder), "step": str(step)}
    _replace_atomically(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=tag))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "flow": flow.config(), "task": task, "train": train}
    if seconds is not None:
        meta["train_seconds"] = round(float(seconds), 1)
    _replace_atomically(folder / CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


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
    except UnicodeDecodeError:
        raise ApsError(f"{path} is not a text (JSON) file") from None
    except json.JSONDecodeError as err:
        raise ApsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ApsError(f"{folder} is not an aps flow checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ApsError(f"{folder}: checkpoint format version {meta.get('format_version')} is not supported "
                       f"(this aps reads {FORMAT_VERSION})")
    return meta


def load_flow(folder: str | Path, map_location: str = "cpu"):
    """(flow with weights loaded, in eval mode, meta dict) from a checkpoint folder.

    The weights must carry the fingerprint of config.json's flow and task (weights written before
    fingerprints existed carry none and are taken as they are).
    """
    folder = Path(folder)
    meta = read_config(folder)
    if not isinstance(meta.get("flow"), dict) or not isinstance(meta.get("task"), dict):
        raise ApsError(f"{folder}/{CONFIG} has no 'flow' or 'task' section")
    try:
        flow = build_flow(meta["flow"])
    except (TypeError, ValueError, KeyError, RuntimeError) as err:  # a key or value the flow does not take
        raise ApsError(f"{folder}/{CONFIG}: cannot build the flow it describes: {str(err).splitlines()[0]}") from None
    path = folder / WEIGHTS
    if not path.is_file():
        raise ApsError(f"{folder}: {WEIGHTS} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            tag = f.metadata() or {}
        state = load_file(str(path), device=map_location)
    except Exception as err:  # any reader error: the file is not (whole) safetensors
        raise ApsError(f"{path} cannot be read (corrupt or not safetensors): {str(err).splitlines()[0]}") from None
    if isinstance(meta["task"].get("problem"), str):  # a mixture: its problem file must read before it is compared
        from .problems import load_problem

        load_problem(folder / meta["task"]["problem"])
    want, have = tag.get("fingerprint"), fingerprint(meta["flow"], meta["task"], folder)
    if want is not None and want != have:
        raise ApsError(f"{path} belongs to another flow or task than {folder} describes "
                       f"(weights' fingerprint {want}, the folder's {have})")
    try:
        flow.load_state_dict(state)
    except RuntimeError as err:
        raise ApsError(f"{folder}: weights do not match the flow in {CONFIG}: {str(err).splitlines()[0]}") from None
    return flow.eval(), meta
