"""The run directory: its file names, atomic writes, the per-epoch commit, the lock and resume repair.

Layout (names kept from the original and relied on by users)::

    RUN/config.yaml  model_arch.txt  metrics.csv  summary.json  train.lock  events.out.tfevents.*
    RUN/checkpoint/checkpoint.pt      full TrainState of the last finished epoch
                   model_best.pt      full TrainState of the best epoch
                   evalmodel.pt       the task's published weights of the best epoch
                   evalmodel_final.pt the same at the end of the run
                   latest.txt         the pointer: "checkpoint.pt" and the committed epoch

Commit protocol of an epoch: ``checkpoint.pt`` first (it holds everything the rest is derived from:
metrics history, best epoch, EMA), then ``model_best.pt``/``evalmodel.pt`` when the epoch is the best,
``evalmodel_final.pt`` at the end, ``metrics.csv`` and ``summary.json``; ``latest.txt`` is flipped last.
Every file goes to ``NAME.tmp`` in the same folder, is flushed to disk and renamed over ``NAME``, so each
file is either its old or its new version. A crash between the first write and the pointer leaves a
``checkpoint.pt`` one epoch past the pointer: :meth:`RunDir.pending_epoch` finds it and the trainer
re-derives the epoch's other files from it before flipping the pointer (roll forward), so a run always
resumes to the state an uninterrupted run has. Stale ``.tmp`` files are removed when a trainer takes the
directory. A failed write (a full disk, permissions) raises :class:`RunDirError` with one line naming
the folder and the space needed, after removing its ``.tmp``.

Tests stop a trainer at a chosen write with :func:`set_write_hook`, or from outside with the
environment switch ``LOWFORMER_FAULT_WRITE=N`` (the N-th file write of the process is cut in half and
the process killed with SIGKILL).
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import IO, Any, Callable

import torch

from lowformer.errors import LowformerError

__all__ = ["RunDir", "RunDirError", "RunDirLocked", "set_write_hook", "FAULT_ENV"]

FAULT_ENV = "LOWFORMER_FAULT_WRITE"
WriteHook = Callable[[Path, IO[bytes], bytes], None]
_write_hook: WriteHook | None = None
_writes = 0


class RunDirError(LowformerError, OSError):
    """A run-directory file that could not be written; nothing half-written is left behind."""


class RunDirLocked(LowformerError, RuntimeError):
    """Another trainer holds the run directory."""


def set_write_hook(hook: WriteHook | None) -> None:
    """Call ``hook(target, tmp_file, data)`` before each file write (fault-injection tests)."""
    global _write_hook
    _write_hook = hook


def _env_fault(target: Path, f: IO[bytes], data: bytes) -> None:
    if _writes == int(os.environ[FAULT_ENV]):
        f.write(data[:len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MB"


class RunDir:
    CONFIG, ARCH, METRICS, SUMMARY, LOCK = "config.yaml", "model_arch.txt", "metrics.csv", "summary.json", "train.lock"
    CHECKPOINT, BEST, EVALMODEL, FINAL, POINTER = (
        "checkpoint.pt", "model_best.pt", "evalmodel.pt", "evalmodel_final.pt", "latest.txt")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoint"
        self._lock_file: IO[str] | None = None

    def __getattr__(self, name: str) -> Path:
        # rd.checkpoint, rd.best, ... -> the file's path
        upper = name.upper()
        if upper in ("CHECKPOINT", "BEST", "EVALMODEL", "FINAL", "POINTER"):
            return self.ckpt_dir / getattr(type(self), upper)
        if upper in ("CONFIG", "ARCH", "METRICS", "SUMMARY", "LOCK"):
            return self.path / getattr(type(self), upper)
        raise AttributeError(name)

    # --- writing -------------------------------------------------------------------------------------------
    def write_bytes(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically (temporary name in the same folder, fsync, rename)."""
        global _writes
        _writes += 1
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                if _write_hook is not None:
                    _write_hook(path, f, data)
                elif FAULT_ENV in os.environ:
                    _env_fault(path, f, data)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._write_error(path, len(data), e) from None

    def _write_error(self, path: Path, size: int, e: OSError) -> RunDirError:
        folder = path.parent
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(folder).free if folder.exists() else 0
            return RunDirError(f"cannot write '{path.name}': no space left in '{folder}' ({_mb(size)} needed, "
                               f"{_mb(free)} free); free at least {_mb(max(size - free, size))} there and rerun "
                               "with --resume (the last committed epoch is intact)")
        return RunDirError(f"cannot write '{path.name}' in '{folder}': {e.strerror or e}; fix the folder and "
                           "rerun with --resume (the last committed epoch is intact)")

    def save(self, obj: Any, path: Path) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(path, buf.getvalue())

    def write_text(self, path: Path, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    # --- the pointer -----------------------------------------------------------------------------------
    def committed_epoch(self) -> int | None:
        """The epoch (0-based) that ``latest.txt`` points at; None before the first commit."""
        if not self.pointer.is_file():
            return None
        lines = self.pointer.read_text().split()
        if len(lines) >= 3 and lines[1] == "epoch":
            return int(lines[2])
        return -2  # a pointer of the previous format: trust checkpoint.pt

    def flip_pointer(self, epoch: int) -> None:
        self.write_text(self.pointer, f"{self.CHECKPOINT}\nepoch {epoch}\n")

    def has_run(self) -> bool:
        return self.pointer.is_file() or self.checkpoint.is_file()

    def remove_stale_tmp(self) -> list[Path]:
        stale = [p for folder in (self.path, self.ckpt_dir) if folder.is_dir() for p in folder.glob("*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # --- the lock --------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the directory for this process; a lock left by a dead process is taken over."""
        import fcntl
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path(), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirLocked(f"run directory '{self.path}' is in use by {holder}; wait for that training to end "
                               "or choose another --path") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def lock_path(self) -> Path:
        return self.path / self.LOCK

    def unlock(self) -> None:
        if self._lock_file is not None:
            self.lock_path().unlink(missing_ok=True)  # while still held, so no other holder's file is removed
            self._lock_file.close()
            self._lock_file = None
