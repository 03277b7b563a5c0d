"""Running a checkpoint or an exported artifact on real images: the steps behind `predict`.

The runtime follows from the file's contents (``formats.detect``): a checkpoint runs in eager
PyTorch, an artifact with its own runtime through the loaders ``verify`` uses.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import Tensor

from crossstitch.backbone import CrossStitchBackbone
from crossstitch.checkpoint import load as load_checkpoint
from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError, first_line
from crossstitch.families import FAMILIES
from crossstitch.files import atomic_path
from crossstitch.images import Loaded
from crossstitch.memory import check_fits
from crossstitch.stages import arch_spec
from crossstitch.summary import activation_bytes, probe_or_refuse
from crossstitch.visualize import output_picture, value_range, write_png

from .common import Artifact
from .compare import Comparison, compare_outputs
from .formats import CHECKPOINT, FORMATS, detect
from .pipeline import check_artifact_size, check_compatible

EAGER = "eager"
RUNTIMES = (EAGER, *FORMATS)


@dataclass(frozen=True)
class Runner:
    """A model ready to run: its file, runtime and config, and the batch size it takes.

    ``batch`` is None where any batch size runs; a ``--static`` artifact takes only its own.
    """

    path: Path
    runtime: str
    config: CrossStitchConfig
    run: Callable[[Tensor], dict[str, Tensor]]
    batch: int | None = None
    model: CrossStitchBackbone | None = None
    artifact: Artifact | None = None

    @property
    def layout(self) -> str:
        """How its feature outputs are laid out: ``nchw``, ``nhwc`` or ``tokens``."""
        if self.model is not None:
            return self.model.layout
        family = FAMILIES.get(self.config.family)
        return family.layout if family is not None else arch_spec(self.config.arch).layout


@dataclass(frozen=True)
class Prediction:
    """One output of one image: its shape and finite value range, and the files written."""

    image: str
    output: str
    shape: tuple[int, ...]
    min: float
    max: float
    npy: str
    png: str
    notes: list[str]


def eager_runner(model: CrossStitchBackbone, path: Path) -> Runner:
    """A loaded model run in eager PyTorch without gradients."""
    model.eval()

    def run(x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return model(x)

    return Runner(path, EAGER, model.config, run, model=model)


def open_runner(path: Path, runtime: str | None = None) -> Runner:
    """Load ``path`` with the runtime its contents call for; a different ``runtime`` is refused."""
    kind = detect(path)
    actual = EAGER if kind == CHECKPOINT else kind
    if runtime is not None and runtime != actual:
        what = "a checkpoint" if kind == CHECKPOINT else f"an artifact in {kind} format"
        raise CrossStitchError(
            f"{path} is {what}: it runs with --runtime {actual}, not --runtime {runtime}"
        )
    if kind == CHECKPOINT:
        return eager_runner(load_checkpoint(path), path)
    artifact = FORMATS[kind].load(path)
    batch = None if artifact.export.dynamic else artifact.export.shape[0]
    return Runner(path, kind, artifact.config, artifact.run, batch=batch, artifact=artifact)


def check_size(runner: Runner, size: int, batch: int) -> None:
    """Refuse before any image is read when the model cannot take ``size`` x ``size`` inputs."""
    if runner.model is not None:
        runner.model.check_input_size((size, size))
        probe_or_refuse(runner.model, (size, size))
        check_fits(
            2 * activation_bytes(runner.model, batch, (size, size), training=False),
            f"predicting a batch of {batch} images of {size}x{size}",
        )
    else:
        check_artifact_size(runner.artifact, runner.path, (size, size))


def run_batch(runner: Runner, x: Tensor) -> dict[str, Tensor]:
    """The outputs for the images in ``x``; a fixed-batch artifact gets its batch filled up with
    copies of the last image, whose outputs are dropped."""
    count = x.shape[0]
    outputs: dict[str, list[Tensor]] = {}
    step = runner.batch or count
    for start in range(0, count, step):
        chunk = x[start : start + step]
        if chunk.shape[0] < step:
            chunk = torch.cat([chunk, chunk[-1:].expand(step - chunk.shape[0], -1, -1, -1)])
        try:
            result = runner.run(chunk.contiguous())
        except Exception as exc:
            raise CrossStitchError(
                f"{runner.path} does not run on a {_shape(chunk)} input: {first_line(exc)}"
            ) from exc
        for name, value in result.items():
            outputs.setdefault(name, []).append(value[: count - start])
    return {name: torch.cat(values) for name, values in outputs.items()}


def _shape(x: Tensor) -> str:
    return "x".join(map(str, x.shape))


def reference_runner(runner: Runner, checkpoint: Path) -> Runner:
    """The checkpoint an artifact is compared with, in eager PyTorch, checked to describe the
    same network."""
    if runner.artifact is None:
        raise CrossStitchError(
            f"{runner.path} is a checkpoint; --compare checks an exported artifact against the "
            "checkpoint it came from: give the artifact as --model"
        )
    if detect(checkpoint) != CHECKPOINT:
        raise CrossStitchError(f"{checkpoint} is not a checkpoint; give one with --against")
    model = load_checkpoint(checkpoint)
    check_compatible(runner.artifact, model, runner.path)
    return eager_runner(model, checkpoint)


def compare(
    runner: Runner,
    got: dict[str, Tensor],
    want: dict[str, Tensor],
    atol: float | None,
    rtol: float | None,
) -> Comparison:
    """Per output, the artifact's results against the checkpoint's, by ``verify``'s rule and
    the format's default tolerances unless given."""
    module = FORMATS[runner.runtime]
    return compare_outputs(
        got, want, module.ATOL if atol is None else atol, module.RTOL if rtol is None else rtol
    )


def merge(parts: list[Comparison]) -> Comparison:
    """The comparisons of successive batches as one over all their images, by the same rule:
    errors and scales are maxima (means weighted by size), so only one batch is held at a time.
    """
    first = parts[0]
    rows = []
    for index, row in enumerate(first.outputs):
        same = [part.outputs[index] for part in parts]
        broken = next((r for r in same if r.problem), None)
        if broken is not None:
            rows.append(broken)
            continue
        sizes = [math.prod(r.shape) for r in same]
        scale = max(r.max_abs_expected for r in same)
        tolerance = first.atol + first.rtol * scale
        worst = max(r.max_abs_error for r in same)
        rows.append(
            dataclasses.replace(
                row,
                shape=(sum(r.shape[0] for r in same), *row.shape[1:]),
                expected_shape=(sum(r.shape[0] for r in same), *row.shape[1:]),
                max_abs_error=worst,
                mean_abs_error=sum(r.mean_abs_error * n for r, n in zip(same, sizes, strict=True))
                / max(sum(sizes), 1),
                max_rel_error=max(r.max_rel_error for r in same),
                max_abs_expected=scale,
                tolerance=tolerance,
                passed=worst <= tolerance,
            )
        )
    return Comparison(outputs=rows, atol=first.atol, rtol=first.rtol)


def write_outputs(
    runner: Runner,
    images: list[Loaded],
    outputs: dict[str, Tensor],
    folder: Path,
    stems: dict[Path, str],
) -> list[Prediction]:
    """Per image and output, the raw tensor as ``STEM.OUTPUT.npy`` and its picture as
    ``STEM.OUTPUT.png`` in ``folder`` (created if missing), each written atomically."""
    folder.mkdir(exist_ok=True)
    size = (runner.config.preprocess.crop,) * 2
    heads = runner.config.head_channels
    rows = []
    for index, image in enumerate(images):
        for name, values in outputs.items():
            value = values[index]
            base = folder / f"{stems[image.path]}.{name}"
            npy, png = base.with_name(base.name + ".npy"), base.with_name(base.name + ".png")
            write_npy(value, npy)
            write_png(output_picture(value, heads.get(name), runner.layout, size), png)
            low, high = value_range(value)
            row = Prediction(
                str(image.path),
                name,
                tuple(value.shape),
                low,
                high,
                str(npy),
                str(png),
                image.notes,
            )
            rows.append(row)
    return rows


def write_npy(value: Tensor, path: str | os.PathLike[str]) -> None:
    """One output as a NumPy ``.npy`` file, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        numpy.save(f, value.detach().cpu().numpy(), allow_pickle=False)
