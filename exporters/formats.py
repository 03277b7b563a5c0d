"""The export formats by name, their default file names, and recognising a file's kind."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import ModuleType

from crossstitch.archive import member_names
from crossstitch.errors import CrossStitchError

from . import onnx, pt2, torchscript

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (onnx, torchscript, pt2)}
CHECKPOINT = "checkpoint"


def default_path(model_path: Path, fmt: str) -> Path:
    """Beside the model, named after it: ``crossstitch.pt`` -> ``crossstitch.onnx`` etc."""
    return model_path.with_name(model_path.name.removesuffix(".pt") + FORMATS[fmt].SUFFIX)


def detect(path: Path) -> str:
    """``"checkpoint"`` or a format name, judged from the file's contents, not its name."""
    if not path.is_file():
        raise CrossStitchError(f"{path} does not exist or is not a file")
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
