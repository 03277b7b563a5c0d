"""Training helpers: parameter groups that train the units as the paper does, FSDP2 sharding.

Misra et al. train the units with a learning rate about 100 times that of the backbones: the
units are few, start near the identity, and would barely move at the backbones' rate.
"""

from __future__ import annotations

import math

from torch import nn

from crossstitch.backbone import CrossStitchBackbone
from crossstitch.errors import CrossStitchError
from crossstitch.units import CrossStitchUnit


def _check(name: str, value: float, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise CrossStitchError(f"{name} must be a finite number {bound}, got {value}")


def param_groups(
    model: nn.Module, lr: float, unit_lr_mult: float = 100.0, weight_decay: float = 0.0
) -> list[dict]:
    """Parameter groups for any ``torch.optim`` optimizer: units fast, everything else at ``lr``.

    The first group (``"name": "cross_stitch"``) holds the weights of every ``CrossStitchUnit``
    in ``model``, at ``lr * unit_lr_mult`` without weight decay; the second (``"backbone"``)
    every other parameter (backbones, heads, your own modules) at ``lr`` with ``weight_decay``.
    ``model`` may be a ``CrossStitchBackbone``, a module that contains one, or a DDP wrapper.
    Each parameter is in exactly one group, once, even where modules share it.
    """
    _check("lr", lr, positive=True)
    _check("unit_lr_mult", unit_lr_mult)
    _check("weight_decay", weight_decay)
    units = {
        id(p): p
        for module in model.modules()
        if isinstance(module, CrossStitchUnit)
        for p in module.parameters()
    }
    if not units:
        raise CrossStitchError(
            f"{type(model).__name__} holds no CrossStitchUnit; param_groups is for models "
            "that contain a CrossStitchBackbone"
        )
    others = [p for p in model.parameters() if id(p) not in units]
    return [
        {
            "name": "cross_stitch",
            "params": list(units.values()),
            "lr": lr * unit_lr_mult,
            "weight_decay": 0.0,
        },
        {"name": "backbone", "params": others, "lr": lr, "weight_decay": weight_decay},
    ]


def fsdp_modules(model: CrossStitchBackbone) -> list[nn.Module]:
    """The modules to give ``torch.distributed.fsdp.fully_shard`` one by one, before the model.

    Every task's stem and stages, then each head: FSDP2 gathers a module's parameters when that
    module is called, and the model calls these, never a task's ``TaskBackbone`` as a whole.
    """
    if not isinstance(model, CrossStitchBackbone):
        raise CrossStitchError(f"must be a CrossStitchBackbone, got {type(model).__name__}")
    modules = []
    for backbone in model.backbones.values():
        modules += [backbone.stem, *backbone.stages.values()]
    return modules + list(model.heads.values())
