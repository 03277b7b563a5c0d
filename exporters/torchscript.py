"""TorchScript: scripted where torch.jit can compile the model, traced otherwise.

torch.jit is deprecated in current PyTorch; pt2 (torch.export) is the forward-looking format.
The artifact needs only torch to load, not crossstitch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossstitch.archive import check_archive
from crossstitch.backbone import CrossStitchBackbone
from crossstitch.errors import CrossStitchError, first_line

from .common import CONFIG_FILE, Artifact, ExportOptions, artifact_config, quiet, torch_artifact

NAME = "torchscript"
SUFFIX = ".torchscript.pt"
ATOL, RTOL = 1e-5, 1e-5


def export(
    model: CrossStitchBackbone, path: Path, example: Tensor, options: ExportOptions
) -> dict[str, Any]:
    """Script the model, or trace it on ``example`` when scripting fails; say which.

    The archive is built in memory and written by Python, so a full disk raises ``OSError``
    instead of stopping the process inside torch's writer.
    """
    with quiet() as log:
        try:
            module = torch.jit.script(model)
            method, why = "scripted", None
        except Exception as exc:
            module = torch.jit.trace(model, (example,), strict=False, check_trace=False)
            method, why = "traced", f"not scriptable: {first_line(exc)}"
        buffer = io.BytesIO()
        config = artifact_config(model, example, options)
        torch.jit.save(module, buffer, _extra_files={CONFIG_FILE: config})
    path.write_bytes(buffer.getbuffer())
    return {"method": method, "why": why, "dynamic": options.dynamic, "log": log.getvalue()}


def load(path: Path) -> Artifact:
    """The TorchScript module in eval mode, and the config saved beside its code.

    The archive's pickles are checked first (docs/design.md §6); torch's TorchScript reader
    then builds the module without running Python code from the file.
    """
    check_archive(path, "TorchScript file")
    extra = {CONFIG_FILE: ""}
    try:
        with quiet():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise CrossStitchError(
            f"{path} is not a loadable TorchScript file ({first_line(exc, 200)})"
        ) from exc
    return torch_artifact(module.eval(), extra[CONFIG_FILE], path, "TorchScript")
