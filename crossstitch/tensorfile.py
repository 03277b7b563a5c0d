"""safetensors files: recognised by their contents, the header checked before any tensor is read,
and written the same way each time.

A safetensors file is an 8-byte little-endian header length, a JSON header (text metadata and,
per tensor, its dtype, shape and byte range) and the raw tensor bytes. The length is capped here
before anything is read; the ``safetensors`` library then refuses headers that are not JSON, byte
ranges that overlap, leave gaps or pass the end of the file, and shapes that do not match their
byte counts (docs/design.md §6).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import safetensors
from torch import Tensor

from crossstitch.errors import CrossStitchError, first_line
from crossstitch.memory import check_fits

#: The largest header read; the ``safetensors`` library refuses larger ones too.
MAX_HEADER_BYTES = 100 * 10**6
SUFFIX = ".safetensors"
_LENGTH = struct.Struct("<Q")


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a safetensors file: a header length, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(_LENGTH.size + 1)
    except OSError:
        return False
    return len(head) == _LENGTH.size + 1 and head[-1:] == b"{" and _LENGTH.unpack(head[:-1])[0] > 1


class TensorFile:
    """An open safetensors file whose header passed the checks; tensors are read on request."""

    def __init__(self, path: Path, what: str, handle: Any, data_bytes: int) -> None:
        self.path = path
        self.what = what
        self.metadata: dict[str, str] = dict(handle.metadata() or {})
        self.keys: list[str] = list(handle.keys())
        #: Bytes of all the tensors together, known from the header before any is read.
        self.data_bytes = data_bytes
        self._handle = handle

    def read(self, keys: Iterable[str] | None = None) -> dict[str, Tensor]:
        """The named tensors (all by default), each read from the file on its own."""
        wanted = self.keys if keys is None else list(keys)
        missing = [k for k in wanted if k not in self.keys]
        if missing:
            raise CrossStitchError(f"{self.what} {self.path} has no tensor {missing[0]!r}")
        try:
            return {key: self._handle.get_tensor(key) for key in wanted}
        except safetensors.SafetensorError as exc:
            raise CrossStitchError(
                f"{self.what} {self.path} is not readable ({first_line(exc, 200)})"
            ) from exc


@contextlib.contextmanager
def open_checked(path: str | os.PathLike[str], what: str) -> Iterator[TensorFile]:
    """Open a safetensors file after checking its header; ``what`` names the file in messages.

    Refused with ``CrossStitchError``: a file too short for a header, a header length over
    ``MAX_HEADER_BYTES`` or past the end of the file (both before the header is read), and any
    header the ``safetensors`` library rejects.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise CrossStitchError(f"{what} {path} is truncated: {size} bytes, too short for a header")
    (length,) = _LENGTH.unpack(head)
    if length > MAX_HEADER_BYTES:
        raise CrossStitchError(
            f"{what} {path} declares a header of {length:,} bytes, more than the "
            f"{MAX_HEADER_BYTES:,} accepted; it was refused without reading it"
        )
    if _LENGTH.size + length > size:
        raise CrossStitchError(
            f"{what} {path} is truncated: its header needs {_LENGTH.size + length:,} bytes, "
            f"the file has {size:,}"
        )
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            yield TensorFile(path, what, handle, size - _LENGTH.size - length)
    except safetensors.SafetensorError as exc:
        reason = first_line(exc, 240).removeprefix("Error while deserializing header: ")
        raise CrossStitchError(f"{what} {path} is not a valid safetensors file ({reason})") from exc


def sorted_metadata(data: bytes) -> bytes:
    """The safetensors file ``data`` with its metadata keys in sorted order.

    The ``safetensors`` writer orders them as a hash map does, which changes from one process to
    the next; sorted, the same tensors and metadata always give the same bytes. The header is
    written compact, as that writer writes it, and padded with spaces to 8 bytes like it.
    """
    (length,) = _LENGTH.unpack(data[: _LENGTH.size])
    header = json.loads(data[_LENGTH.size : _LENGTH.size + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return _LENGTH.pack(len(raw)) + raw + data[_LENGTH.size + length :]


def read_state_dict(path: str | os.PathLike[str], what: str) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, by name, after the header checks; refused before
    reading when the tensors would not fit in memory."""
    with open_checked(path, what) as tensors:
        check_fits(tensors.data_bytes, f"reading {path}")
        return tensors.read()
