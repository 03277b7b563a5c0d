"""Shapes without computing: modules run on the meta device, on meta copies of their weights.

Nothing is allocated and no weight is touched, so this is cheap for any model size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

# Two images, so that batch norm in training mode accepts 1x1 features.
PROBE_BATCH = 2


def meta_images(size: tuple[int, int], channels: int = 3) -> Tensor:
    """A meta batch of ``PROBE_BATCH`` images of ``size`` (height, width)."""
    return torch.empty(PROBE_BATCH, channels, *size, device="meta")


def meta_forward(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` on the meta device: only the output's shape is real."""
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    }
    return functional_call(module, state, (x,))
