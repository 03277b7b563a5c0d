"""What the cross-stitch units hold: per stage, the TxT mixing matrix and how much each task shares.

Everything here works from the stored config and the unit weight tensors alone, so a checkpoint
(or an exported file) is described without building its model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from crossstitch.backbone import check_granularity
from crossstitch.checkpoint import check_config, read
from crossstitch.dilation import dilated_reduction
from crossstitch.errors import CrossStitchError
from crossstitch.stages import arch_spec

UNIT_KEY = "cross_stitch.{stage}.weight"


@dataclass(frozen=True)
class StageEntry:
    """One stage of the architecture, and the shape of its unit where it is stitched."""

    name: str
    channels: int
    reduction: int
    stitched: bool
    unit_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class UnitMixing:
    """One unit as a TxT picture: ``[i][j]`` is how much task j's features flow into task i.

    ``matrix`` is the mean over channels, ``min`` and ``max`` the extremes over channels (all
    three equal for layer granularity). ``sharing[i]`` is the off-diagonal share of row i:
    ``sum_{j != i} sum_c |A[i, j, c]| / sum_j sum_c |A[i, j, c]|``; 0 means task i keeps only
    its own features, ``(T-1)/T`` an even mix; NaN where the row is all zeros.
    """

    channels: int | None
    matrix: list[list[float]]
    min: list[list[float]]
    max: list[list[float]]
    sharing: list[float]


@dataclass(frozen=True)
class Inspection:
    """A stored model described: its config, its stages and every unit's mixing matrix."""

    config: dict
    tasks: list[str]
    stage_table: list[StageEntry]
    stages: dict[str, UnitMixing]


def unit_mixing(weight: Tensor) -> UnitMixing:
    """Reduce a unit weight ``[T, T, C]`` or ``[T, T]`` to its matrices and sharing scores.

    Means and sharing are computed in float64; min and max are the stored values themselves.
    """
    values = weight.detach().to(torch.float64)
    per_channel = values if values.dim() == 3 else values.unsqueeze(-1)
    magnitude = per_channel.abs().sum(dim=-1)
    own = magnitude.diagonal()
    total = magnitude.sum(dim=1)
    return UnitMixing(
        channels=values.shape[2] if values.dim() == 3 else None,
        matrix=per_channel.mean(dim=-1).tolist(),
        min=per_channel.amin(dim=-1).tolist(),
        max=per_channel.amax(dim=-1).tolist(),
        sharing=((total - own) / total).tolist(),
    )


def describe(
    config: Mapping, weights: Mapping[str, Tensor], source: str | os.PathLike[str]
) -> Inspection:
    """Describe a stored model from its ``config`` and its unit weights by stage name.

    Each stitched stage must have a weight of the shape its config implies; ``source`` names
    the file in error messages.
    """
    check_config(source, config)
    check_granularity(config["granularity"])
    spec = arch_spec(config["arch"])
    tasks = list(config["tasks"])
    stitched = list(config["stages"])
    known = [s.name for s in spec.stages]
    unknown = [s for s in stitched if s not in known]
    if unknown:
        raise CrossStitchError(
            f"{source}: stitched stage {', '.join(unknown)} is not a stage of {spec.name} "
            f"({', '.join(known)})"
        )
    output_stride = config.get("output_stride", 32)
    table, units = [], {}
    for stage in spec.stages:
        reduction = dilated_reduction(stage.reduction, output_stride)
        if stage.name not in stitched:
            table.append(StageEntry(stage.name, stage.channels, reduction, False, None))
            continue
        if stage.name not in weights:
            raise CrossStitchError(
                f"{source} has no weight for the unit after {stage.name} "
                f"({UNIT_KEY.format(stage=stage.name)})"
            )
        weight = weights[stage.name]
        expected = (len(tasks),) * 2
        if config["granularity"] == "channel":
            expected += (stage.channels,)
        if tuple(weight.shape) != expected or not weight.is_floating_point():
            raise CrossStitchError(
                f"{source}: the unit after {stage.name} has shape {list(weight.shape)} "
                f"({weight.dtype}); its config implies floating point {list(expected)}"
            )
        table.append(StageEntry(stage.name, stage.channels, reduction, True, expected))
        units[stage.name] = unit_mixing(weight)
    return Inspection(config=dict(config), tasks=tasks, stage_table=table, stages=units)


def inspect_checkpoint(path: str | os.PathLike[str]) -> Inspection:
    """Describe a checkpoint file from its config and state_dict; no model is built."""
    payload = read(path)
    state = payload["state_dict"]
    weights = {
        stage: state[UNIT_KEY.format(stage=stage)]
        for stage in payload["config"]["stages"]
        if UNIT_KEY.format(stage=stage) in state
    }
    return describe(payload["config"], weights, Path(path))
