"""Atomic file writes: a temporary file in the destination folder, flushed, then renamed."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from crossstitch.errors import CrossStitchError


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Refuse an output path that is a folder or whose folder does not exist."""
    path = Path(path)
    if path.is_dir():
        raise CrossStitchError(f"output path {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise CrossStitchError(f"the folder of output path {path} does not exist; create it first")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception, KeyboardInterrupt included, the temporary file is removed and an existing
    file at ``path`` is left as it was.
    """
    path = check_output_path(path)
    tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
