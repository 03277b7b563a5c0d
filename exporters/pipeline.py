"""Export then verify, and verify alone: the steps behind `crossstitch export` and `verify`.

An artifact is written into a temporary folder beside its destination, verified there, and only
then renamed into place, so a failed or interrupted export never leaves a partial file and never
replaces the previous good one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossstitch.backbone import CrossStitchBackbone
from crossstitch.errors import CrossStitchError, first_line
from crossstitch.files import check_free_space, check_output_path
from crossstitch.memory import check_fits, weights_bytes
from crossstitch.summary import activation_bytes, probe_or_refuse

from .common import FIXED_SPATIAL, Artifact, ExportInput, ExportOptions
from .compare import Comparison, compare_outputs
from .errors import ExportFailed
from .formats import FORMATS

EXPORT_BATCH = 2


@dataclass(frozen=True)
class Inputs:
    """The random image batch a verification used, and how to draw it again."""

    batch: int
    height: int
    width: int
    seed: int

    def tensor(self) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.batch, 3, self.height, self.width, generator=generator)


@dataclass
class ExportResult:
    """One format exported: where, how, how long, and its verification."""

    format: str
    path: Path
    written: bool
    seconds: float
    size_bytes: int
    details: dict[str, Any] = field(default_factory=dict)
    inputs: Inputs | None = None
    comparison: Comparison | None = None

    @property
    def passed(self) -> bool:
        return self.comparison is None or self.comparison.passed


def verification_inputs(export: ExportInput, seed: int) -> Inputs:
    """Inputs for checking an artifact: another batch and size than the export's where free."""
    batch, _, height, width = export.shape
    if not export.dynamic:
        return Inputs(batch, height, width, seed)
    if not export.spatial_free:
        return Inputs(batch + 1, height, width, seed)
    return Inputs(batch + 1, height + 32, width + 64, seed)


def check_artifact_size(artifact: Artifact, path: Path, size: tuple[int, int]) -> None:
    """Refuse to run an artifact at a height and width it was not exported to take."""
    _, _, height, width = artifact.export.shape
    if tuple(size) == (height, width) or artifact.export.spatial_free:
        return
    if not artifact.export.dynamic:
        why = "it was exported with --static"
    else:
        config = artifact.config
        why = artifact.export.fixed_because or FIXED_SPATIAL.get(
            config.family, f"{config.arch} takes one input size"
        )
    raise CrossStitchError(
        f"{path} takes {height}x{width} inputs only ({why}); {size[0]}x{size[1]} cannot be used",
        param="input_size",
    )


def check_compatible(artifact: Artifact, model: CrossStitchBackbone, path: Path) -> None:
    """An artifact and the checkpoint it is compared with must describe the same network."""
    theirs, ours = artifact.config.to_dict(), model.config.to_dict()
    for key in ("arch", "tasks", "stages", "granularity", "heads", "output_stride", "features"):
        there, here = theirs[key], ours[key]
        if there != here:
            raise CrossStitchError(
                f"{path} does not come from this checkpoint: {key} is {there} there, "
                f"{here} in the checkpoint"
            )


@torch.no_grad()
def compare_artifact(
    artifact: Artifact,
    path: Path,
    model: CrossStitchBackbone,
    inputs: Inputs,
    atol: float,
    rtol: float,
) -> Comparison:
    """Run the artifact with its runtime and the eager model on the same inputs; compare."""
    check_compatible(artifact, model, path)
    probe_or_refuse(model, (inputs.height, inputs.width))
    check_fits(
        2 * activation_bytes(model, inputs.batch, (inputs.height, inputs.width), training=False),
        f"verifying on a {inputs.batch}x3x{inputs.height}x{inputs.width} input",
    )
    x = inputs.tensor()
    want = model.eval()(x)
    try:
        got = artifact.run(x)
    except Exception as exc:
        raise CrossStitchError(
            f"{path} does not run on a {inputs.batch}x3x{inputs.height}x{inputs.width} input: "
            f"{first_line(exc)}"
        ) from exc
    return compare_outputs(got, want, atol, rtol)


def _companions(path: Path) -> list[Path]:
    """Files that travel with an artifact: ONNX external data."""
    return [path.with_name(path.name + ".data")]


def _place(staged: Path, destination: Path) -> None:
    for companion, target in zip(_companions(staged), _companions(destination), strict=True):
        if companion.exists():
            os.replace(companion, target)
        else:
            target.unlink(missing_ok=True)
    os.replace(staged, destination)


def export_verified(
    model: CrossStitchBackbone,
    fmt: str,
    destination: Path,
    example_size: tuple[int, int],
    options: ExportOptions,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    keep_failed: bool = False,
) -> ExportResult:
    """Export ``model`` to ``destination`` in ``fmt``, verified before it is put in place."""
    module = FORMATS[fmt]
    destination = check_output_path(destination)
    check_free_space(destination, weights_bytes(model), f"the {fmt} file")
    model.check_input_size(example_size)
    model.eval()
    example = Inputs(EXPORT_BATCH, *example_size, seed=seed + 1).tensor()
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        staged = staging / destination.name
        start = time.perf_counter()
        try:
            details = module.export(model, staged, example, options)
        except OSError:
            raise
        except Exception as exc:
            raise ExportFailed(f"{fmt} export failed: {first_line(exc)}") from exc
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in [staged, *_companions(staged)] if p.exists())
        result = ExportResult(fmt, destination, False, seconds, size, details)
        if verify:
            artifact = module.load(staged)
            result.inputs = verification_inputs(artifact.export, seed)
            result.comparison = compare_artifact(
                artifact,
                staged,
                model,
                result.inputs,
                module.ATOL if atol is None else atol,
                module.RTOL if rtol is None else rtol,
            )
        if result.passed or keep_failed:
            _place(staged, destination)
            result.written = True
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
