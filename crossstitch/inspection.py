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

from crossstitch.checkpoint import read
from crossstitch.config import CrossStitchConfig
from crossstitch.dilation import dilated_reduction
from crossstitch.errors import CrossStitchError
from crossstitch.stages import StageInfo, arch_spec

UNIT_PREFIX = "cross_stitch."
UNIT_KEY = UNIT_PREFIX + "{stage}.weight"


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
    """A stored model described: its config, its stages and every stitched stage's unit.

    ``stage_table`` lists every stage of the architecture (reductions as dilation leaves them);
    ``stages`` holds the units by stage name, stitched stages only.
    """

    config: CrossStitchConfig
    tasks: list[str]
    stage_table: list[StageInfo]
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
    config: CrossStitchConfig, weights: Mapping[str, Tensor], source: str | os.PathLike[str]
) -> Inspection:
    """Describe a stored model from its ``config`` and its unit weights by stage name.

    Each stitched stage must have a weight of the shape its config implies; ``source`` names
    the file in error messages.
    """
    if config.source == "timm":
        from crossstitch.timm_backbones import PREFIX, plan

        name, all_stages = PREFIX + config.arch, plan(config.arch).stages
    else:
        spec = arch_spec(config.arch)
        name, all_stages = spec.name, spec.stages
    known = [s.name for s in all_stages]
    unknown = [s for s in config.stages if s not in known]
    if unknown:
        raise CrossStitchError(
            f"{source}: stitched stage {', '.join(unknown)} is not a stage of {name} "
            f"({', '.join(known)})"
        )
    table, units = [], {}
    for stage in all_stages:
        reduction = dilated_reduction(stage.reduction, config.output_stride)
        table.append(StageInfo(stage.name, stage.channels, reduction))
        if stage.name not in config.stages:
            continue
        if stage.name not in weights:
            raise CrossStitchError(
                f"{source} has no weight for the unit after {stage.name} "
                f"({UNIT_KEY.format(stage=stage.name)})"
            )
        weight = weights[stage.name]
        expected = (len(config.tasks),) * 2
        if config.granularity == "channel":
            expected += (stage.channels,)
        if tuple(weight.shape) != expected or not weight.is_floating_point():
            raise CrossStitchError(
                f"{source}: the unit after {stage.name} has shape {list(weight.shape)} "
                f"({weight.dtype}); its config implies floating point {list(expected)}"
            )
        units[stage.name] = unit_mixing(weight)
    return Inspection(config=config, tasks=list(config.tasks), stage_table=table, stages=units)


def inspect_checkpoint(path: str | os.PathLike[str]) -> Inspection:
    """Describe a checkpoint file from its config and unit weights; no model is built.

    From a safetensors checkpoint only the unit tensors are read, not the whole file.
    """
    checkpoint = read(path, keys=lambda key: key.startswith(UNIT_PREFIX))
    state = checkpoint.state_dict
    weights = {
        stage: state[UNIT_KEY.format(stage=stage)]
        for stage in checkpoint.config.stages
        if UNIT_KEY.format(stage=stage) in state
    }
    return describe(checkpoint.config, weights, Path(path))
