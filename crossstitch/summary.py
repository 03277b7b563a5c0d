"""Numbers that describe a built model: stages, feature sizes, parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from crossstitch.backbone import CrossStitchBackbone, probe_shapes
from crossstitch.errors import CrossStitchError
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
    """What the model returns for one task: its head, if any, and the shape of one output."""

    task: str
    head: str | None
    head_params: int
    shape: tuple[int, ...]


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
    head_params: int
    outputs: list[OutputRow]
    float32_mb: float
    alpha: float
    beta: float
    granularity: str


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _head_name(head: nn.Module) -> str:
    return "dense" if isinstance(head, DenseHead) else type(head).__name__


def _head_channels(head: nn.Module, features: torch.Size) -> int:
    """Output channels of a head, found by running it on the meta device (nothing allocated)."""
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*head.named_parameters(), *head.named_buffers()]
    }
    x = torch.empty(2, *features[1:], device="meta")
    return functional_call(head, meta, (x,)).shape[1]


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
    last = shapes[model.stages[-1].name]
    outputs = [
        OutputRow(
            task=task,
            head=_head_name(model.heads[task]),
            head_params=_count(model.heads[task]),
            shape=(_head_channels(model.heads[task], last), *input_size),
        )
        if task in model.heads
        else OutputRow(task=task, head=None, head_params=0, shape=tuple(last[1:]))
        for task in model.tasks
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
        head_params=_count(model.heads),
        outputs=outputs,
        float32_mb=total * 4 / 1e6,
        alpha=model.config["alpha"],
        beta=model.config["beta"],
        granularity=model.config["granularity"],
    )
