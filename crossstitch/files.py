"""Safe writes: outputs checked before any work, then written beside the destination and renamed.

A write that fails (a full disk, Ctrl-C, SIGTERM) leaves the previous file as it was and no
temporary file behind (docs/design.md §7).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from crossstitch.errors import CrossStitchError

# Room left over on top of an estimate: archive headers, metadata, the file system's own.
SPACE_MARGIN = 16 * 2**20


def check_output_path(
    path: str | os.PathLike[str], *, reads: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Refuse an output that is a folder, in a missing or unwritable folder, or a file that the
    same command reads (it would be destroyed before it is read).
    """
    path = Path(path)
    if path.is_dir():
        raise CrossStitchError(f"output path {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise CrossStitchError(f"the folder of output path {path} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CrossStitchError(f"the folder of output path {path} is not writable")
    for source in reads:
        if _same_file(path, Path(source)):
            raise CrossStitchError(
                f"output path {path} is {source}, which this command reads; write elsewhere"
            )
    return path


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that is a file, or that is missing and cannot be created in its
    parent (missing or unwritable); the folder itself is created only when written to.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CrossStitchError(f"output folder {path} is a file; give a folder")
    where = path if path.is_dir() else path.parent
    if not where.is_dir():
        raise CrossStitchError(f"the folder that would hold {path} does not exist; create it first")
    if not os.access(where, os.W_OK | os.X_OK):
        raise CrossStitchError(f"{where} is not writable")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse to write ``what`` (about ``needed`` bytes) where the disk has less room."""
    free = shutil.disk_usage(path.parent).free
    if needed + SPACE_MARGIN > free:
        raise CrossStitchError(
            f"writing {what} needs about {(needed + SPACE_MARGIN) / 1e6:,.0f} MB, but "
            f"{path.parent} has {free / 1e6:,.0f} MB free; nothing was written"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception, KeyboardInterrupt and a full disk included, the temporary file is removed
    and an existing file at ``path`` is left as it was.
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
