"""Numbers that describe a built model: stages, feature sizes, parameters, memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from crossstitch.backbone import CrossStitchBackbone, probe_shapes
from crossstitch.errors import CrossStitchError
from crossstitch.families import feature_size
from crossstitch.heads import DenseHead


@dataclass(frozen=True)
class StageRow:
    """One stage as the summary table shows it."""

    name: str
    channels: int
    reduction: int
    feature_size: tuple[int, int]
    params_per_task: int
    stitch_params: int


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
    """A model's stage table and totals at one input size."""

    arch: str | None
    fixed_input: bool
    tasks: list[str]
    input_size: tuple[int, int]
    stem_params_per_task: int
    stages: list[StageRow]
    params_per_task: int
    total_params: int
    stitch_params: int
    head_params: int
    outputs: list[OutputRow]
    float32_mb: float
    training_mb_per_image: float
    alpha: float
    beta: float
    granularity: str
    output_stride: int
    features: str


def activation_bytes(
    model: CrossStitchBackbone, batch: int, input_size: tuple[int, int], training: bool
) -> int:
    """Estimated activation memory of one forward (inference) or training step, all tasks.

    Counts the output of every layer of each task's network (backbone, then head and its
    upsampled output) on the meta device. A training step keeps them all for backward and about
    as much again for gradients; inference holds a few of the largest at a time.
    """
    probe_batch = 2
    per_task = []
    for task in model.tasks:
        with _recording(model.backbones[task]) as outputs:
            shapes = probe_shapes(model.backbones[task], input_size)
        if task in model.heads:
            features = shapes[model.stages[-1].name]
            with _recording(model.heads[task]) as head_outputs:
                channels = _meta_call(model.heads[task], features).shape[1]
            outputs += [*head_outputs, probe_batch * channels * input_size[0] * input_size[1] * 4]
        per_task.append(2 * sum(outputs) if training else 3 * max(outputs, default=0))
    return int(sum(per_task) / probe_batch * batch)


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


def _meta_call(module: nn.Module, features: torch.Size) -> torch.Tensor:
    """Run ``module`` on a meta batch of two with features of this shape; nothing is allocated."""
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    }
    return functional_call(module, meta, (torch.empty(2, *features[1:], device="meta"),))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _head_name(head: nn.Module) -> str:
    return "dense" if isinstance(head, DenseHead) else type(head).__name__


def _head_channels(head: nn.Module, features: torch.Size) -> int:
    """Output channels of a head, found by running it on the meta device (nothing allocated)."""
    return _meta_call(head, features).shape[1]


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
        shape = (_head_channels(head, last), *input_size)
        return OutputRow(name, task, _head_name(head), _count(head), shape)
    return OutputRow(name, task, None, 0, tuple(last[1:]))


def summarize(model: CrossStitchBackbone, input_size: tuple[int, int]) -> Summary:
    """Describe ``model`` for one image of ``input_size`` (height, width)."""
    backbone = model.backbones[model.tasks[0]]
    try:
        shapes = probe_shapes(backbone, input_size)
    except RuntimeError as exc:
        height, width = input_size
        name = model.config.get("arch") or "this model"
        raise CrossStitchError(
            f"input size {height}x{width} is too small for {name} ({str(exc).splitlines()[0]})"
        ) from exc
    rows = [
        StageRow(
            name=info.name,
            channels=info.channels,
            reduction=info.reduction,
            feature_size=feature_size(shapes[info.name], model.layout),
            params_per_task=_count(backbone.stages[info.name]),
            stitch_params=_count(model.cross_stitch[info.name])
            if info.name in model.cross_stitch
            else 0,
        )
        for info in model.stages
    ]
    outputs = [_output_row(model, name, shapes, input_size) for name in model.output_names]
    total = _count(model)
    return Summary(
        arch=model.config.get("arch"),
        fixed_input=model.input_size is not None,
        tasks=list(model.tasks),
        input_size=tuple(input_size),
        stem_params_per_task=_count(backbone.stem),
        stages=rows,
        params_per_task=_count(backbone),
        total_params=total,
        stitch_params=_count(model.cross_stitch),
        head_params=_count(model.heads),
        outputs=outputs,
        float32_mb=total * 4 / 1e6,
        training_mb_per_image=activation_bytes(model, 1, input_size, training=True) / 1e6,
        alpha=model.config["alpha"],
        beta=model.config["beta"],
        granularity=model.config["granularity"],
        output_stride=model.stages[-1].reduction,
        features=model.features,
    )
