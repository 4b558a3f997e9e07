"""Reading and writing tensors as .safetensors or .npz (nothing is unpickled)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ApsError

SUFFIXES = (".safetensors", ".npz")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All arrays of a .safetensors or .npz file, as tensors."""
    path = Path(path)
    if not path.is_file():
        raise ApsError(f"file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: torch.from_numpy(np.array(f[k])) for k in f.files}
    except Exception as err:  # any reader error means "not a tensor file"
        raise ApsError(f"cannot read {path}: {err}") from None
    raise ApsError(f"{path}: tensor files are {' or '.join(SUFFIXES)}")


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors to .safetensors or .npz (by suffix); returns the path."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ApsError(f"output must end in {' or '.join(SUFFIXES)}, not {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(path))
    else:
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    return path
