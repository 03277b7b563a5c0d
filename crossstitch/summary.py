"""Numbers that describe a built model: stages, feature sizes, parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

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
    alpha: float
    beta: float
    granularity: str


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
        alpha=model.config["alpha"],
        beta=model.config["beta"],
        granularity=model.config["granularity"],
    )
