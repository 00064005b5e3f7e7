"""Writing output files so that a failure never destroys what the user already has.

Every output goes to a temporary name in the target folder (same file system, so the final rename is atomic)
and replaces the target only once it is complete; a failure removes the temporary file and leaves the
target as it was. Output paths are checked (known extension, writable folder) before any work starts."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from lowformer.errors import LowformerError

__all__ = ["atomic_output", "check_output_path"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, suffixes: Iterable[str], flag: str) -> Path:
    """``path`` as a Path once it is known to be writable with one of ``suffixes``; LowformerError naming
    ``flag`` (e.g. ``--out``) and the fix otherwise. Missing parent folders are allowed (created on writing)
    when the nearest existing one is writable."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if path.suffix.lower() not in suffixes:
        raise LowformerError(f"{flag} {path}: unknown file type '{path.suffix or '(none)'}'; "
                             f"name the file with {' or '.join(suffixes)}")
    if path.is_dir():
        raise LowformerError(f"{flag} {path} is a directory; give a file name ending in {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise LowformerError(f"{flag} {path} exists and is not writable; choose another file or fix its permissions")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise LowformerError(f"{flag} {path}: cannot write in {folder}; choose a writable folder")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` (same extension); when the block ends without an exception
    it replaces ``path``, otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a published file gets the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
