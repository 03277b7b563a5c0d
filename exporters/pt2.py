"""pt2: a ``torch.export`` program with dynamic batch, height and width."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossstitch.archive import check_archive
from crossstitch.backbone import CrossStitchBackbone
from crossstitch.errors import CrossStitchError, first_line

from .common import (
    CONFIG_FILE,
    Artifact,
    ExportOptions,
    artifact_config,
    dynamic_shapes,
    quiet,
    torch_artifact,
)

NAME = "pt2"
SUFFIX = ".pt2"
ATOL, RTOL = 1e-5, 1e-5


def export(
    model: CrossStitchBackbone, path: Path, example: Tensor, options: ExportOptions
) -> dict[str, Any]:
    """``torch.export.export`` then ``torch.export.save`` with the config as an extra file.

    The archive is built in memory and written by Python, so a full disk raises ``OSError``
    instead of stopping the process inside torch's writer.
    """
    with quiet() as log:
        program = torch.export.export(
            model, (example,), dynamic_shapes=dynamic_shapes(model, options.dynamic)
        )
        buffer = io.BytesIO()
        config = artifact_config(model, example, options)
        torch.export.save(program, buffer, extra_files={CONFIG_FILE: config})
    path.write_bytes(buffer.getbuffer())
    ranges = {str(k): str(v) for k, v in program.range_constraints.items()}
    return {"dynamic": options.dynamic, "ranges": ranges, "log": log.getvalue()}


def load(path: Path) -> Artifact:
    """The exported program as a callable module, and the config saved in the archive.

    The archive's pickles are checked before ``torch.export.load`` sees it: it would unpickle
    some of them without restriction.
    """
    check_archive(path, "pt2 file")
    extra = {CONFIG_FILE: ""}
    try:
        with quiet():
            program = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise CrossStitchError(
            f"{path} is not a loadable torch.export (pt2) file ({first_line(exc, 200)})"
        ) from exc
    return torch_artifact(program.module(), extra[CONFIG_FILE], path, "pt2")
