"""The export formats by name, their default file names, and recognising a file's kind."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import ModuleType

from crossstitch.archive import member_names
from crossstitch.errors import CrossStitchError
from crossstitch.tensorfile import is_safetensors

from . import onnx, pt2, torchscript

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (onnx, torchscript, pt2)}
CHECKPOINT = "checkpoint"
#: Checkpoint suffixes that artifact names leave out.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


def default_path(model_path: Path, fmt: str) -> Path:
    """Beside the model, named after it: ``crossstitch.safetensors`` -> ``crossstitch.onnx``."""
    stem = model_path.stem if model_path.suffix in CHECKPOINT_SUFFIXES else model_path.name
    return model_path.with_name(stem + FORMATS[fmt].SUFFIX)


def detect(path: Path) -> str:
    """``"checkpoint"`` or a format name, judged from the file's contents, not its name."""
    if not path.is_file():
        raise CrossStitchError(f"{path} does not exist or is not a file")
    if is_safetensors(path):
        return CHECKPOINT
    if zipfile.is_zipfile(path):
        names = member_names(path, "file")
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return torchscript.NAME
        if any(n.endswith("/archive_format") for n in names):
            return pt2.NAME
        if any(n.endswith("/data.pkl") for n in names):
            return CHECKPOINT
    elif onnx.looks_like_onnx(path):
        return onnx.NAME
    raise CrossStitchError(
        f"{path} is neither a crossstitch checkpoint nor an ONNX, TorchScript or pt2 artifact"
    )
