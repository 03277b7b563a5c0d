"""Memory estimates made before anything is allocated, and the memory the machine has free.

A request that cannot fit is refused up front with its estimate, instead of the process being
killed halfway through (and possibly halfway through writing a file).
"""

from __future__ import annotations

import torch
import torchvision

from crossstitch.errors import CrossStitchError

MEMINFO = "/proc/meminfo"


def available_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping; None where it cannot say."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def classifier_bytes(arch: str) -> int | None:
    """Bytes of one float32 copy of the torchvision classifier, counted on the meta device.

    None for builders that cannot run on the meta device (they compute with real tensors).
    """
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch)
    except NotImplementedError:
        return None
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def build_bytes(arch: str, num_tasks: int) -> int | None:
    """What building ``num_tasks`` copies of ``arch`` holds at its peak: one classifier each."""
    one = classifier_bytes(arch)
    return None if one is None else one * num_tasks


def check_fits(needed: int | None, what: str) -> None:
    """Refuse ``what`` when its estimate exceeds the memory available now."""
    available = available_bytes()
    if needed is None or available is None or needed <= available:
        return
    raise CrossStitchError(
        f"{what} needs about {needed / 1e9:.1f} GB of memory, but {available / 1e9:.1f} GB is "
        "available; use fewer tasks, a smaller batch or input size, or a smaller architecture"
    )
