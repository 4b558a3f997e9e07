"""A run folder belongs to one run: who may write into it, and a lock against a second process.

A new run refuses a folder that already holds a run (its config.json, weights, problem or training
states) unless asked to overwrite it; --resume needs one. While a run trains, out/.lock is held with
fcntl.flock and names the process: a second `train.py` into the same folder stops with one line. The
kernel drops the lock when the process dies, however it dies, so a stale lock file is simply taken over.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from .errors import ApsError

LOCK = ".lock"
RUN_FILES = ("config.json", "flow.safetensors", "problem.safetensors")
RUN_FOLDERS = ("checkpoints", "logs", "samples")


def holds_run(out: str | Path) -> bool:
    """Whether `out` holds (part of) an aps run."""
    out = Path(out)
    return any((out / f).exists() for f in RUN_FILES) or (out / "checkpoints").is_dir()


def check_new_run(out: str | Path, overwrite: bool) -> None:
    """ApsError unless a new run may start in `out` (reads only)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ApsError(f"--out {out} is a file, not a folder")
    if holds_run(out) and not overwrite:
        raise ApsError(f"{out} holds a run already: continue it with --resume, or start over with --overwrite "
                       f"(which deletes it)")


def clear_run(out: str | Path) -> None:
    """Delete the files of the run in `out` (for --overwrite; other files in the folder are left alone)."""
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


class RunLock:
    """An exclusive lock on a run folder (out/.lock, fcntl.flock), released on exit or by the process's death."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK
        self.fd = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ApsError(f"{self.path.parent} is in use by a run of {holder}: one process trains "
                               f"into a folder at a time") from None
            # the file may have been unlinked by the previous holder between our open and flock: retry
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it (see acquire)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
