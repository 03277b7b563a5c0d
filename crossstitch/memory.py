"""Memory estimates made before anything is allocated, and the memory the machine has free.

A request that cannot fit is refused up front with its estimate, instead of the process being
killed halfway through (and possibly halfway through writing a file). The CLI and
``crossstitch.load`` call these checks explicitly before they build; library callers can too.
"""

from __future__ import annotations

import psutil
import torch
import torchvision
from torch import nn

from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError
from crossstitch.stages import arch_spec

FLOAT32_BYTES = 4


def available_bytes() -> int:
    """Memory that can be allocated now without swapping, as the operating system reports it."""
    return psutil.virtual_memory().available


def weights_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers: its weights in memory, about what a file of it
    stores."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def classifier_bytes(arch: str) -> int | None:
    """Bytes of one float32 copy of the torchvision classifier, counted on the meta device.

    None for builders that cannot run on the meta device (they compute with real tensors).
    """
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch)
    except NotImplementedError:
        return None
    return weights_bytes(model)


def dense_head_bytes(in_channels: int, out_channels: int) -> int:
    """Bytes of a ``DenseHead``'s weights and buffers, from its layer sizes."""
    hidden = max(in_channels // 4, 1)
    values = in_channels * hidden * 9 + 4 * hidden + 1 + hidden * out_channels + out_channels
    return values * FLOAT32_BYTES


def build_bytes(config: CrossStitchConfig) -> int | None:
    """What building ``config`` holds at its peak: one classifier per task, and the heads."""
    if config.source == "timm" and config.arch:
        from crossstitch.timm_backbones import plan

        found = plan(config.arch)
        one, last = found.weights_bytes, found.stages[-1].channels
    else:
        one = classifier_bytes(config.arch) if config.arch else None
        if one is None:
            return None
        last = arch_spec(config.arch).stages[-1].channels
    heads = sum(dense_head_bytes(last, channels) for _, channels in config.heads)
    return one * len(config.tasks) + heads


def check_fits(needed: int | None, what: str) -> None:
    """Refuse ``what`` when its estimate exceeds the memory available now."""
    available = available_bytes()
    if needed is None or needed <= available:
        return
    raise CrossStitchError(
        f"{what} needs about {needed / 1e9:.1f} GB of memory, but {available / 1e9:.1f} GB is "
        "available; use fewer tasks or smaller heads, a smaller batch or input size, or a "
        "smaller architecture"
    )


def check_build(config: CrossStitchConfig) -> None:
    """Refuse to build ``config`` when its weights alone would not fit in memory."""
    check_fits(build_bytes(config), f"building {config.arch} with {len(config.tasks)} tasks")
