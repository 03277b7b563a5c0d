"""Dense task heads: per-pixel outputs at the input resolution from a task's last-stage features.

A head maps the last stage's features ``[N, C, h, w]`` to ``[N, C', h, w]``; the model then
resizes that bilinearly to the input's height and width, so every task with a head predicts one
``C'``-channel map per pixel of the image (segmentation logits, depth, normals, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from crossstitch.errors import CrossStitchError


class DenseHead(nn.Module):
    """3x3 conv, batch norm, ReLU, then a 1x1 conv to ``out_channels``.

    The hidden width is a quarter of the input channels, as in torchvision's FCN head: light
    next to the backbone, and enough to turn shared features into one task's prediction.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = max(in_channels // 4, 1)
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(hidden, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.relu(self.bn(self.conv(x))))


def check_heads(
    heads: Mapping[str, int | nn.Module] | None, tasks: Sequence[str]
) -> dict[str, int | nn.Module]:
    """Refuse heads for unknown tasks, and channel counts that are not positive integers."""
    if heads is not None and not isinstance(heads, Mapping):
        raise CrossStitchError(f"must map task names to heads, got {heads!r}", param="heads")
    heads = dict(heads or {})
    unknown = [t for t in heads if t not in tasks]
    if unknown:
        raise CrossStitchError(
            f"given for unknown task {', '.join(map(repr, unknown))}; tasks are {', '.join(tasks)}",
            param="heads",
        )
    for task, head in heads.items():
        if isinstance(head, nn.Module):
            continue
        if not isinstance(head, int) or isinstance(head, bool) or head < 1:
            raise CrossStitchError(
                f"the head of task {task!r} must be a positive number of output channels "
                f"or an nn.Module, got {head!r}",
                param="heads",
            )
    return {task: heads[task] for task in tasks if task in heads}


def build_heads(heads: Mapping[str, int | nn.Module], in_channels: int) -> nn.ModuleDict:
    """A ``DenseHead`` for every channel count; modules are kept as given."""
    return nn.ModuleDict(
        {
            task: head if isinstance(head, nn.Module) else DenseHead(in_channels, head)
            for task, head in heads.items()
        }
    )


def head_output(head: nn.Module, features: Tensor, size: Sequence[int]) -> Tensor:
    """Apply ``head`` and resize its output bilinearly to ``size`` (the input's height, width)."""
    return F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)
