"""Reading and writing tensors as .safetensors or .npz (nothing is unpickled)."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
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


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float16: "F16", torch.bfloat16: "BF16"}


class TensorFileWriter:
    """A .safetensors or .npz file written piece by piece: memory stays that of one piece, whatever the file's size.

    The tensors' names, shapes and dtypes are declared first; `write(name, start, values)` puts values (any
    shape) at flat element offset `start` of tensor `name`, from any process once the main one has called
    `create`; `finish` (main process) moves the file into place. Until then it lives under a temporary name
    next to `path`, so an interrupted run leaves the previous file (if any) as it was.

    A .safetensors file is laid out once (header with every offset, then the data) and filled in place;
    an .npz is filled as one .npy per tensor in a temporary folder, zipped (stored) by `finish`.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple, torch.dtype]]):
        self.path = Path(path)
        if self.path.suffix not in SUFFIXES:
            raise ApsError(f"output must end in {' or '.join(SUFFIXES)}, not {self.path.name!r}")
        self.specs = {k: (tuple(int(d) for d in shape), dtype) for k, (shape, dtype) in specs.items()}
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.offsets, start = {}, 0
        for name, (shape, dtype) in self.specs.items():
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            self.offsets[name] = (start, start + size)
            start += size
        self.nbytes = start
        if self.path.suffix == ".safetensors":
            header = {k: {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": list(self.offsets[k])}
                      for k, (shape, dtype) in self.specs.items()}
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            self.header = len(text).to_bytes(8, "little") + text

    def create(self) -> "TensorFileWriter":
        """Make the (temporary) file at full size (main process, before any `write`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_tmp()
        if self.path.suffix == ".safetensors":
            with open(self.tmp, "wb") as f:
                f.write(self.header)
                f.truncate(len(self.header) + self.nbytes)
        else:
            self.tmp.mkdir()
            for name, (shape, dtype) in self.specs.items():
                np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=_np_dtype(dtype), shape=shape)
        return self

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        data = values.detach().to("cpu", dtype).contiguous().numpy().reshape(-1)
        if self.path.suffix == ".safetensors":
            with open(self.tmp, "r+b") as f:
                f.seek(len(self.header) + self.offsets[name][0] + start * data.itemsize)
                f.write(data.tobytes())
        else:
            out = np.load(self.tmp / f"{name}.npy", mmap_mode="r+")
            out.reshape(-1)[start:start + data.size] = data
            out.flush()
            del out

    def finish(self) -> Path:
        """Move the complete file into place (replacing any file at `path`); returns the path."""
        if self.path.suffix == ".safetensors":
            os.replace(self.tmp, self.path)
            return self.path
        part = self.path.with_name(f".{self.path.name}.zip-partial")
        with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in self.specs:
                zf.write(self.tmp / f"{name}.npy", arcname=f"{name}.npy")
        os.replace(part, self.path)
        self._remove_tmp()
        return self.path

    def abort(self) -> None:
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp)
        else:
            self.tmp.unlink(missing_ok=True)
        self.path.with_name(f".{self.path.name}.zip-partial").unlink(missing_ok=True)


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype
