"""Numbers that describe a built model: stages, feature sizes, parameters, memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crossstitch.backbone import CrossStitchBackbone, probe_shapes
from crossstitch.errors import CrossStitchError


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
class Summary:
    """A model's stage table and totals at one input size."""

    arch: str | None
    tasks: list[str]
    input_size: tuple[int, int]
    stem_params_per_task: int
    stages: list[StageRow]
    params_per_task: int
    total_params: int
    stitch_params: int
    float32_mb: float
    training_mb_per_image: float
    alpha: float
    beta: float
    granularity: str


def activation_bytes(
    model: CrossStitchBackbone, batch: int, input_size: tuple[int, int], training: bool
) -> int:
    """Estimated activation memory of one forward (inference) or training step, all tasks.

    Counts the output of every layer of one task backbone on the meta device. A training step
    keeps them all for backward and about as much again for gradients; inference holds a few of
    the largest at a time.
    """
    outputs: list[int] = []

    def record(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel() * output.element_size())

    backbone = model.backbones[model.tasks[0]]
    leaves = [m for m in backbone.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        probe_shapes(backbone, input_size)
    finally:
        for handle in handles:
            handle.remove()
    probe_batch = 2
    per_image = (2 * sum(outputs) if training else 3 * max(outputs, default=0)) / probe_batch
    return int(per_image * batch * len(model.tasks))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    spatial = slice(2, 4) if model.channel_dim == 1 else slice(1, 3)
    rows = [
        StageRow(
            name=info.name,
            channels=info.channels,
            reduction=info.reduction,
            feature_size=tuple(shapes[info.name][spatial]),
            params_per_task=_count(backbone.stages[info.name]),
            stitch_params=_count(model.cross_stitch[info.name])
            if info.name in model.cross_stitch
            else 0,
        )
        for info in model.stages
    ]
    total = _count(model)
    return Summary(
        arch=model.config.get("arch"),
        tasks=list(model.tasks),
        input_size=tuple(input_size),
        stem_params_per_task=_count(backbone.stem),
        stages=rows,
        params_per_task=_count(backbone),
        total_params=total,
        stitch_params=_count(model.cross_stitch),
        float32_mb=total * 4 / 1e6,
        training_mb_per_image=activation_bytes(model, 1, input_size, training=True) / 1e6,
        alpha=model.config["alpha"],
        beta=model.config["beta"],
        granularity=model.config["granularity"],
    )
