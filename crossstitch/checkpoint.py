"""The checkpoint file: a safetensors file (the default) or, for ``.pt`` names, one ``torch.save``.

safetensors: the state_dict's tensors, and header metadata ``format``, ``version`` and ``config``
(JSON). ``.pt``: ``{"format", "version", "config", "state_dict"}``. Reading recognises the kind by
content and checks the header or archive, then the format name, version and config (through
``CrossStitchConfig.from_dict``) before any tensor is read, so a file can neither run code nor
reach the model builder with values of unexpected types (docs/design.md §5, §6).
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from crossstitch.archive import load_tensors
from crossstitch.backbone import CrossStitchBackbone, build
from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError
from crossstitch.files import atomic_path, check_free_space, check_output_path
from crossstitch.memory import check_build, check_fits, weights_bytes
from crossstitch.tensorfile import SUFFIX, is_safetensors, open_checked, sorted_metadata

FORMAT = "crossstitch"
VERSION = 1
#: Names that ``save`` writes with ``torch.save``, the format of crossstitch before safetensors.
TORCH_SUFFIXES = (".pt", ".pth")
_VERSION_TEXT = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents, checked: the config and the state_dict."""

    config: CrossStitchConfig
    state_dict: dict[str, Tensor]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the saved model, recorded for the reader."""
    return {name: version(name) for name in ("crossstitch", "torch", "torchvision")}


def save(model: CrossStitchBackbone, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically; only models built with ``from_torchvision`` can be rebuilt.

    The suffix picks the format: ``.safetensors``, or ``.pt``/``.pth`` for ``torch.save``. The
    file is built in memory, with torch's archive folder name fixed and safetensors' metadata
    sorted (the same model always gives the same bytes), and written by Python, so a full disk
    raises ``OSError`` instead of stopping the process inside a library's writer. Heads given as
    channel counts are rebuilt from the config; a head given as a module is not.
    """
    if model.config.arch is None:
        raise CrossStitchError(
            "this model was built from your own modules, so a checkpoint could not rebuild it; "
            "save model.state_dict() instead, or build it with CrossStitchBackbone.from_torchvision"
        )
    custom = [task for task in model.heads if task not in model.config.head_channels]
    if custom:
        raise CrossStitchError(
            f"the head of task {', '.join(custom)} is your own module, so a checkpoint could not "
            "rebuild it; save model.state_dict() instead, or give the head as a number of "
            "output channels"
        )
    torch_format = uses_torch_save(path)
    check_free_space(check_output_path(path), weights_bytes(model), "the checkpoint")
    config = {**model.config.to_dict(), "versions": library_versions()}
    if torch_format:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "config": config,
            "state_dict": model.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data: bytes | memoryview = buffer.getbuffer()
    else:
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "config": json.dumps(config, sort_keys=True),
        }
        data = sorted_metadata(
            safetensors.torch.save(unshared(model.state_dict()), metadata=metadata)
        )
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def uses_torch_save(path: str | os.PathLike[str]) -> bool:
    """Whether ``save`` writes ``path`` with ``torch.save`` (``.pt``, ``.pth``) rather than as
    safetensors (``.safetensors``); any other name is refused, so a name never misleads.
    """
    suffix = Path(path).suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return True
    if suffix == SUFFIX:
        return False
    raise CrossStitchError(
        f"checkpoint {path}: name it *{SUFFIX} (safetensors, the default) or *.pt (torch.save), "
        f"got {suffix or 'no suffix'!r}"
    )


def unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state_dict with a contiguous copy of each tensor that is not contiguous or shares
    memory with an earlier one (tied weights): safetensors stores every tensor on its own.
    """
    seen: set[int] = set()
    result = {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(storage)
        result[key] = tensor
    return result


def read(path: str | os.PathLike[str], keys: Callable[[str], bool] | None = None) -> Checkpoint:
    """Read and check a checkpoint file without building anything.

    ``keys`` picks the tensors to return (all by default); a safetensors file reads only those.
    """
    path = Path(path)
    if not path.is_file():
        raise CrossStitchError(
            f"checkpoint {path} does not exist; create one with `crossstitch build`"
        )
    if is_safetensors(path):
        return _read_safetensors(path, keys)
    if not zipfile.is_zipfile(path):
        raise CrossStitchError(
            f"{path} is not a crossstitch checkpoint (neither a safetensors file nor a zip archive)"
        )
    payload = load_tensors(path, "checkpoint")
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        hint = " (it looks like a plain state_dict)" if is_state_dict(payload) else ""
        raise CrossStitchError(f"{path} is not a crossstitch checkpoint{hint}")
    _check_version(path, payload.get("version"))
    config = CrossStitchConfig.from_dict(payload.get("config"), str(path))
    state = payload.get("state_dict")
    if not is_state_dict(state):
        raise CrossStitchError(f"{path} has no valid state_dict")
    return Checkpoint(config, {k: v for k, v in state.items() if keys is None or keys(k)})


def _read_safetensors(path: Path, keys: Callable[[str], bool] | None) -> Checkpoint:
    """The header and its metadata checked, then only the tensors ``keys`` picks read."""
    with open_checked(path, "checkpoint") as tensors:
        metadata = tensors.metadata
        if metadata.get("format") != FORMAT:
            hint = (
                " (it looks like a plain state_dict)"
                if "config" not in metadata
                else f" (its metadata names the format {metadata.get('format', '')[:40]!r})"
            )
            raise CrossStitchError(f"{path} is not a crossstitch checkpoint{hint}")
        text = metadata.get("version", "")
        _check_version(path, int(text) if _VERSION_TEXT.fullmatch(text) else None)
        try:
            raw = json.loads(metadata.get("config", ""))
        except (ValueError, RecursionError) as exc:
            raise CrossStitchError(f"{path} has a damaged config (not JSON)") from exc
        config = CrossStitchConfig.from_dict(raw, str(path))
        wanted = [k for k in tensors.keys if keys is None or keys(k)]
        if keys is None:
            check_fits(tensors.data_bytes, f"reading {path}")
        return Checkpoint(config, tensors.read(wanted))


def _check_version(path: Path, file_version: object) -> None:
    """Refuse a missing or damaged format version, and one newer than this crossstitch reads."""
    if not isinstance(file_version, int) or isinstance(file_version, bool):
        raise CrossStitchError(f"{path} has no valid format version")
    if file_version > VERSION:
        raise CrossStitchError(
            f"{path} was written by a newer crossstitch (format version {file_version}, this one "
            f"reads up to {VERSION}); upgrade crossstitch"
        )


def load(path: str | os.PathLike[str]) -> CrossStitchBackbone:
    """Rebuild the model a checkpoint describes (offline) and load its weights.

    Refused before anything is built when the model would not fit in memory.
    """
    checkpoint = read(path)
    check_build(checkpoint.config)
    model = build(checkpoint.config, load_weights=False)
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CrossStitchError(
            f"{path}: the weights do not fit its config ({lines[-1][:200]})"
        ) from exc
    return model


def is_state_dict(value: object) -> bool:
    """A mapping of names to tensors."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    )
