"""Training states of a run (what --resume continues from): safetensors and JSON only, written crash-safe.

    out/checkpoints/step_0001000/  model.safetensors, optimizer.safetensors, ema.safetensors (with an EMA),
                                   rng.safetensors, state.json (step, seconds, optimizer groups, RNG, scaler)

A state is written into a temporary folder (out/checkpoints/.tmp-*) and renamed into place with os.replace
once every file is on disk, so a folder named step_* is always complete and a kill at any point leaves the
previous states as they were; older states are deleted only after the new one is in place. Loading tries
the newest state first and falls back to the one before if it cannot be read. Nothing is unpickled: the
optimizer's tensors go to safetensors, the rest of its state to JSON, the RNG states likewise.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ApsError

STATES = "checkpoints"
PREFIX, TMP = "step_", ".tmp-"
STATE_FORMAT = "aps-train-state"


def state_dir(out: str | Path) -> Path:
    return Path(out) / STATES


def list_states(out: str | Path) -> list[Path]:
    """Complete training states of a run, oldest first (step_* folders; temporary ones are not states)."""
    root = state_dir(out)
    if not root.is_dir():
        return []
    states = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(states, key=lambda p: int(p.name[len(PREFIX):]))


def foreign_states(out: str | Path) -> list[Path]:
    """State folders that are not ours (accelerate's pickled checkpoint_N of older versions)."""
    root = state_dir(out)
    return sorted(p for p in root.glob("checkpoint_*") if p.is_dir()) if root.is_dir() else []


def remove_temporary(out: str | Path) -> None:
    """Delete what an interrupted save or prune left behind (.tmp-* folders)."""
    root = state_dir(out)
    if root.is_dir():
        for p in root.glob(TMP + "*"):
            shutil.rmtree(p, ignore_errors=True)


# -- RNG and optimizer state as tensors + JSON ------------------------------------------------------

def rng_state() -> tuple[dict, dict]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def split_state(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """A nested state dict -> (flat tensors {"a.b": t}, the JSON-able rest with tensors replaced by their key)."""
    tensors, rest = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous().clone()
            rest[str(k)] = {"tensor": key}
        elif isinstance(v, dict):
            t, r = split_state(v, key + ".")
            tensors.update(t)
            rest[str(k)] = {"dict": r, "int_keys": all(isinstance(i, int) for i in v)}
        else:
            rest[str(k)] = {"value": v}
    return tensors, rest


def join_state(tensors: dict, rest: dict) -> dict:
    out = {}
    for k, v in rest.items():
        if "tensor" in v:
            out[k] = tensors[v["tensor"]]
        elif "dict" in v:
            inner = join_state(tensors, v["dict"])
            out[k] = {int(i): x for i, x in inner.items()} if v["int_keys"] else inner
        else:
            out[k] = v["value"]
    return out


def optimizer_state(opt) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors, rest = split_state(state["state"], "state.")
    # a CUDA-graphed AdamW keeps its learning rate as a device tensor: saved as the number it holds
    groups = [{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"state": rest, "param_groups": groups}


def load_optimizer_state(opt, tensors: dict, meta: dict) -> None:
    groups = []
    for saved, current in zip(meta["param_groups"], opt.param_groups):
        # JSON has no tuples: give back the type the optimizer uses (AdamW's betas)
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    state = {int(k): v for k, v in join_state(tensors, meta["state"]).items()}  # parameter indices (JSON keys are text)
    opt.load_state_dict({"state": state, "param_groups": groups})


# -- one state folder ------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(out: str | Path, step: int, modules: dict, optimizer, rngs: list, extra: dict, keep: int) -> Path:
    """Write the training state of `step` as out/checkpoints/step_N (crash-safe), then keep the newest `keep`.

    modules: {"model": flow, "ema": ema or None}; rngs: one rng_state() per process; extra: JSON (seconds, ...).
    Call on one process.
    """
    root = state_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    remove_temporary(out)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{TMP}{final.name}-{os.getpid()}"
    tmp.mkdir()
    for name, module in modules.items():
        if module is not None:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()},
                      str(tmp / f"{name}.safetensors"))
    opt_tensors, opt_meta = optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = {}, []
    for rank, (t, m) in enumerate(rngs):
        rng_tensors.update({f"{rank}.{k}": v for k, v in t.items()})
        rng_meta.append(m)
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"format": STATE_FORMAT, "step": int(step), "optimizer": opt_meta, "rng": rng_meta,
            "modules": sorted(k for k, m in modules.items() if m is not None), **extra}
    (tmp / "state.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # a state of this step from an earlier invocation: replace it whole
        old = root / f"{TMP}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    for old in list_states(out)[:-keep]:  # renamed out of the way first: a half-deleted folder is never a state
        gone = root / f"{TMP}del-{old.name}-{os.getpid()}"
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return final


def read_state(folder: Path) -> tuple[dict, dict]:
    """(meta of state.json, {file stem: tensors}) of one state folder; ApsError if anything is unreadable."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise ValueError("not an aps training state")
        files = {name: load_file(str(folder / f"{name}.safetensors"))
                 for name in ["optimizer", "rng", *meta["modules"]]}
    except Exception as err:  # unreadable or incomplete: the caller falls back to an older state
        raise ApsError(f"{folder}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return meta, files


def newest_state(out: str | Path, warn=print) -> tuple[Path, dict, dict]:
    """The newest training state that reads back whole: (folder, meta, tensors); `warn` is told of skipped ones."""
    states = list_states(out)
    if not states:
        if foreign_states(out):
            raise ApsError(f"--resume: {state_dir(out)} holds training states of an older aps (pickled, "
                           f"checkpoint_N): they are not loaded; start a new run with --init-from {out}")
        raise ApsError(f"--resume: no training state under {state_dir(out)}")
    errors = []
    for folder in reversed(states):
        try:
            meta, files = read_state(folder)
        except ApsError as err:
            errors.append(str(err))
            warn(f"warning: skipping an unreadable training state: {err}")
            continue
        return folder, meta, files
    raise ApsError(f"--resume: no readable training state in {state_dir(out)} ({'; '.join(errors)})")
