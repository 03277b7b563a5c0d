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
    """A supported torchvision architecture: its family, stages and named pretrained weights.

    ``input_size`` is the one square size a fixed-size model takes (None: any size from
    ``min_size`` up works, as torchvision states for its weights). ``layout`` is how stage
    features are laid out: ``nchw``, ``nhwc`` (Swin) or ``tokens`` (ViT).
    """

    name: str
    family: str
    stages: tuple[StageInfo, ...]
    weights: tuple[str, ...]
    input_size: int | None
    min_size: int
    layout: str


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
            input_size=entry["input_size"],
            min_size=entry["min_size"],
            layout=entry["layout"],
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
    raise CrossStitchError(f"unknown architecture {name!r}; {hint}", param="arch")


def check_fixed_size(name: str, fixed: int | None, size: tuple[int, ...]) -> None:
    """Refuse an input ``size`` other than the one a fixed-size model (ViT, MaxViT) takes."""
    if fixed is not None and tuple(size) != (fixed, fixed):
        raise CrossStitchError(
            f"{name} takes {fixed}x{fixed} images only; {'x'.join(map(str, size))} cannot be "
            f"used (leave it out to get {fixed})",
            param="input_size",
        )


def check_head_layout(name: str, layout: str) -> None:
    """Dense heads take ``[N, C, H, W]`` maps; refuse them for channel-last and token features."""
    if layout != "nchw":
        kind = "channel-last maps [N, H, W, C]" if layout == "nhwc" else "tokens [N, 1 + HW, C]"
        raise CrossStitchError(
            f"dense heads need [N, C, H, W] feature maps, but {name} features are {kind}; "
            "attach your own head to the features it returns",
            param="heads",
        )
