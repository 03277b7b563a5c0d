"""The checkpoint file: ``{"format", "version", "config", "state_dict"}`` in one ``torch.save``.

Reading checks the archive before anything in it is unpickled, unpickles with
``torch.load(weights_only=True)`` only, then reads the config through
``CrossStitchConfig.from_dict``, so a file can neither run code nor reach the model builder with
values of unexpected types (docs/design.md §5).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

from crossstitch.archive import load_tensors
from crossstitch.backbone import CrossStitchBackbone, build
from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError
from crossstitch.files import atomic_path, check_free_space, check_output_path
from crossstitch.memory import check_build, weights_bytes

FORMAT = "crossstitch"
VERSION = 1


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

    The archive is built in memory, which keeps its inner folder name fixed (the same model
    always gives the same bytes), and written by Python, so a full disk raises ``OSError``
    instead of stopping the process inside torch's writer. Heads given as channel counts are
    rebuilt from the config; a head given as a module is not.
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
    check_free_space(check_output_path(path), weights_bytes(model), "the checkpoint")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": {**model.config.to_dict(), "versions": library_versions()},
        "state_dict": model.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint file without building anything."""
    path = Path(path)
    if not path.is_file():
        raise CrossStitchError(
            f"checkpoint {path} does not exist; create one with `crossstitch build`"
        )
    if not zipfile.is_zipfile(path):
        raise CrossStitchError(f"{path} is not a crossstitch checkpoint (not a zip archive)")
    payload = load_tensors(path, "checkpoint")
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        hint = " (it looks like a plain state_dict)" if is_state_dict(payload) else ""
        raise CrossStitchError(f"{path} is not a crossstitch checkpoint{hint}")
    file_version = payload.get("version")
    if not isinstance(file_version, int) or isinstance(file_version, bool):
        raise CrossStitchError(f"{path} has no valid format version")
    if file_version > VERSION:
        raise CrossStitchError(
            f"{path} was written by a newer crossstitch (format version {file_version}, this one "
            f"reads up to {VERSION}); upgrade crossstitch"
        )
    config = CrossStitchConfig.from_dict(payload.get("config"), str(path))
    state = payload.get("state_dict")
    if not is_state_dict(state):
        raise CrossStitchError(f"{path} has no valid state_dict")
    return Checkpoint(config, dict(state))


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
