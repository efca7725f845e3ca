"""Where results are written: output folders and files checked up front, files written atomically.

A run that can only fail at the end (an ``--out`` that is a file, a folder that is not writable,
a CSV path that is a folder) should fail before the work, with one line saying which path and
why. Every result file is written under a temporary name and renamed into place, so a crash,
a full disk or Ctrl-C never leaves half a file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .checkpoint import atomic_write
from .errors import GlasSegError


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and make sure files can be written into it.

    Parameters
    ----------
    path : path
    what : str
        How the user named it (``"--out"``), for the message.

    Raises
    ------
    GlasSegError
        ``path`` or one of its parents is a file, it cannot be created, or it is not writable
        (the test writes a file, so read-only mounts and immutable folders are caught even
        for root, whom permission bits do not stop).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GlasSegError(f"{what} {path} is a file; give a folder")
    blocker = _file_above(path)
    if blocker is not None:
        raise GlasSegError(f"{what} {path} is under {blocker}, which is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".glas-seg-write-test.", dir=path)
    except OSError as exc:
        raise GlasSegError(f"cannot write into {what} {path}: {_reason(exc)}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def output_file(path: str | Path, what: str = "output file") -> Path:
    """Check that ``path`` can be written as a file (its folder is created); nothing is written.

    Raises
    ------
    GlasSegError
        ``path`` is a folder, or its folder cannot be created or written into.
    """
    path = Path(path)
    if path.is_dir():
        raise GlasSegError(f"{what} {path} is a folder; give a file name")
    blocker = _file_above(path)
    if blocker is not None:
        raise GlasSegError(f"{what} {path} is under {blocker}, which is a file; give another path")
    output_folder(path.parent, f"the folder of {what}")
    return path


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is a file (no folder can be made there)."""
    for folder in path.parents:
        if folder.exists() or folder.is_symlink():
            return None if folder.is_dir() else folder
    return None


def write_file(path: str | Path, write: Callable[[str], None], what: str = "output file") -> Path:
    """Write a file atomically: ``write(temporary_path)``, then rename it over ``path``.

    Raises
    ------
    GlasSegError
        ``path`` is a folder, or the file cannot be written (the message gives the reason;
        no temporary file is left behind).
    """
    path = Path(path)
    if path.is_dir():
        raise GlasSegError(f"cannot write {what} {path}: a folder of that name is in the way")
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise GlasSegError(f"cannot write {what} {path}: {_reason(exc)}") from None
    return path


__all__ = ["output_folder", "output_file", "write_file"]
