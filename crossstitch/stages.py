"""Stage descriptions and the catalogue of supported architectures, as plain data.

This module imports no torch: the CLI answers ``crossstitch list`` and rejects a misspelt
architecture from the catalogue alone. ``catalog.json`` is generated from torchvision by
``scripts/update_catalog.py`` and checked against real models by the test suite.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from crossstitch.errors import CrossStitchError


@dataclass(frozen=True)
class StageInfo:
    """One stage of a backbone: its name, output channels and total stride at its output."""

    name: str
    channels: int
    reduction: int


@dataclass(frozen=True)
class ArchSpec:
    """A supported torchvision architecture: its family, stages and named pretrained weights."""

    name: str
    family: str
    stages: tuple[StageInfo, ...]
    weights: tuple[str, ...]


@cache
def architectures() -> dict[str, ArchSpec]:
    """All supported architectures by name, in catalogue order."""
    raw = json.loads(resources.files("crossstitch").joinpath("catalog.json").read_text())
    return {
        name: ArchSpec(
            name=name,
            family=entry["family"],
            stages=tuple(StageInfo(*stage) for stage in entry["stages"]),
            weights=tuple(entry["weights"]),
        )
        for name, entry in raw["architectures"].items()
    }


def arch_spec(name: str) -> ArchSpec:
    """The catalogue entry for ``name``; an unknown name is refused with the closest matches."""
    archs = architectures()
    if name in archs:
        return archs[name]
    close = difflib.get_close_matches(name.lower(), archs, n=3, cutoff=0.5)
    hint = (
        f"did you mean {', '.join(close)}?" if close else "run `crossstitch list` to see them all"
    )
    raise CrossStitchError(f"unknown architecture '{name}'; {hint}")
