"""Write output files all at once or not at all: a temporary file in the same folder, renamed into
place only when complete (shared by every stage, so no command leaves a half-written file)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnserve.errors import UsageError


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Refuse an output path that is a directory, or whose folder cannot exist (before any work
    is done)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give a file path for the output")
    check_output_dir(path.parent)
    return path


def check_output_dir(folder: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that is a file or lies under one: creating it later would fail
    with an OSError traceback after all the work."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == folder:
            raise UsageError(f"{folder}: is a file, not a folder (the output goes in it)")
        raise UsageError(f"{folder}: cannot be created: {existing} is a file")
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds and
    deletes it otherwise. The file gets `mode`, else the permissions a plain open() gives."""
    path = check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # e.g. a read-only or permission-denied folder: a user's problem
        raise UsageError(f"{path}: cannot write the output ({e.strerror or e})") from e
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600; outputs are meant to be read by other users (a service
        # in a container), so give them the permissions a plain open() would have.
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
