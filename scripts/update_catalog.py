"""Regenerate crossstitch/catalog.json from the installed torchvision.

Every architecture whose model class has a stage adapter is listed with its stages (probed on
the meta device, so nothing is allocated), the names of its pretrained weights, its fixed input
size if it has one, and the smallest input torchvision states for it.
Run: python scripts/update_catalog.py
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import astuple
from pathlib import Path

import torch
import torchvision

from crossstitch.backbone import PROBE_SIZE, TaskBackbone, probe_shapes, stage_infos
from crossstitch.families import FAMILIES

CATALOG = Path(__file__).resolve().parents[1] / "crossstitch" / "catalog.json"


def describe(arch: str) -> dict | None:
    """The catalogue entry for ``arch``, or None when no family adapter covers it."""
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch)
    except NotImplementedError:  # builders that compute with tensors (RegNet) need real memory
        model = torchvision.models.get_model(arch)
    family = next((f for f in FAMILIES.values() if isinstance(model, f.model_type)), None)
    if family is None:
        return None
    fixed = family.fixed_size(model)
    size = fixed or PROBE_SIZE
    shapes = probe_shapes(TaskBackbone(family.split(model)), (size, size))
    weights = torchvision.models.get_model_weights(arch)
    return {
        "family": family.name,
        "stages": [list(astuple(stage)) for stage in stage_infos(shapes, size, family.layout)],
        "weights": list(weights.__members__),
        "input_size": fixed,
        "min_size": fixed or weights.DEFAULT.meta["min_size"][0],
        "layout": family.layout,
    }


def _natural(name: str) -> list:
    """Sort key that puts resnet18 before resnet101."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def build_catalog() -> dict:
    """The catalogue as written to disk."""
    entries = {}
    for arch in sorted(torchvision.models.list_models(module=torchvision.models), key=_natural):
        entry = describe(arch)
        if entry is not None:
            entries[arch] = entry
    return {"torchvision": torchvision.__version__.split("+")[0], "architectures": entries}


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    CATALOG.write_text(json.dumps(build_catalog(), indent=1) + "\n")
    print(f"wrote {CATALOG}")
