"""Numbers that describe a built model: stages, feature sizes, parameters, memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from crossstitch.backbone import CrossStitchBackbone, probe_shapes
from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError, first_line
from crossstitch.families import feature_size
from crossstitch.heads import DenseHead
from crossstitch.shapes import PROBE_BATCH, meta_forward
from crossstitch.stages import StageInfo


@dataclass(frozen=True)
class OutputRow:
    """One output of the model: its name, its task, its head if any, and one image's shape."""

    name: str
    task: str
    head: str | None
    head_params: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Summary:
    """A model's stages and totals at one input size.

    Per stage (by name): ``feature_sizes`` the features' height and width, ``stage_params``
    the parameters of one task's stage, ``unit_params`` those of the unit after it (stitched
    stages only).
    """

    config: CrossStitchConfig
    input_size: tuple[int, int]
    stages: list[StageInfo]
    feature_sizes: dict[str, tuple[int, int]]
    stage_params: dict[str, int]
    unit_params: dict[str, int]
    stem_params_per_task: int
    params_per_task: int
    total_params: int
    stitch_params: int
    head_params: int
    outputs: list[OutputRow]
    float32_mb: float
    training_mb_per_image: float


def activation_bytes(
    model: CrossStitchBackbone, batch: int, input_size: tuple[int, int], training: bool
) -> int:
    """Estimated activation memory of one forward (inference) or training step, all tasks.

    Counts the output of every layer of each task's network (backbone, then head and its
    upsampled output) on the meta device. A training step keeps them all for backward and about
    as much again for gradients; inference holds a few of the largest at a time.
    """
    per_task = []
    for task in model.tasks:
        with _recording(model.backbones[task]) as outputs:
            shapes = probe_shapes(model.backbones[task], input_size)
        if task in model.heads:
            features = shapes[model.stages[-1].name]
            with _recording(model.heads[task]) as head_outputs:
                channels = _head_output(model.heads[task], features).shape[1]
            outputs += [*head_outputs, PROBE_BATCH * channels * input_size[0] * input_size[1] * 4]
        per_task.append(2 * sum(outputs) if training else 3 * max(outputs, default=0))
    return int(sum(per_task) / PROBE_BATCH * batch)


@contextlib.contextmanager
def _recording(module: nn.Module) -> Iterator[list[int]]:
    """Collect the output bytes of every leaf layer of ``module`` while the block runs."""
    outputs: list[int] = []

    def record(layer: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel() * output.element_size())

    handles = [m.register_forward_hook(record) for m in module.modules() if not list(m.children())]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _head_output(head: nn.Module, features: torch.Size) -> torch.Tensor:
    """A head's output for a meta batch of features of this shape; nothing is allocated."""
    return meta_forward(head, torch.empty(PROBE_BATCH, *features[1:], device="meta"))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _output_row(
    model: CrossStitchBackbone,
    name: str,
    shapes: dict[str, torch.Size],
    input_size: tuple[int, int],
) -> OutputRow:
    """Describe the output ``name``: a stitched stage's features, a head's, or the last stage's."""
    task, _, stage = name.partition(".")
    if stage:
        return OutputRow(name, task, None, 0, tuple(shapes[stage][1:]))
    last = shapes[model.stages[-1].name]
    if task in model.heads:
        head = model.heads[task]
        kind = "dense" if isinstance(head, DenseHead) else type(head).__name__
        shape = (_head_output(head, last).shape[1], *input_size)
        return OutputRow(name, task, kind, _count(head), shape)
    return OutputRow(name, task, None, 0, tuple(last[1:]))


def probe_or_refuse(model: CrossStitchBackbone, input_size: tuple[int, int]) -> dict:
    """The stage shapes at ``input_size``, or a refusal saying the size is too small."""
    try:
        return probe_shapes(model.backbones[model.tasks[0]], input_size)
    except RuntimeError as exc:
        height, width = input_size
        name = model.config.arch or "this model"
        raise CrossStitchError(
            f"{height}x{width} is too small for {name} ({first_line(exc)})", param="input_size"
        ) from exc


def summarize(model: CrossStitchBackbone, input_size: tuple[int, int]) -> Summary:
    """Describe ``model`` for one image of ``input_size`` (height, width)."""
    backbone = model.backbones[model.tasks[0]]
    shapes = probe_or_refuse(model, input_size)
    total = _count(model)
    return Summary(
        config=model.config,
        input_size=tuple(input_size),
        stages=list(model.stages),
        feature_sizes={s.name: feature_size(shapes[s.name], model.layout) for s in model.stages},
        stage_params={s.name: _count(backbone.stages[s.name]) for s in model.stages},
        unit_params={name: _count(unit) for name, unit in model.cross_stitch.items()},
        stem_params_per_task=_count(backbone.stem),
        params_per_task=_count(backbone),
        total_params=total,
        stitch_params=_count(model.cross_stitch),
        head_params=_count(model.heads),
        outputs=[_output_row(model, name, shapes, input_size) for name in model.output_names],
        float32_mb=total * 4 / 1e6,
        training_mb_per_image=activation_bytes(model, 1, input_size, training=True) / 1e6,
    )
