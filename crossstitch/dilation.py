"""Output stride by dilation: DeepLab's way to keep a backbone's last stages at a finer resolution.

Applied to a built classifier after its weights are loaded: only strides, dilations and paddings
change, never a weight, so pretrained weights stay valid.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import ResNet

from crossstitch.errors import CrossStitchError

DILATED_LAYERS = {8: ("layer3", "layer4"), 16: ("layer4",), 32: ()}
OUTPUT_STRIDES = tuple(DILATED_LAYERS)


def dilate_resnet(model: ResNet, output_stride: int) -> None:
    """Replace the stride of ``layer4`` (16) or ``layer3`` and ``layer4`` (8) by dilation.

    As torchvision's ``_make_layer(dilate=True)``: the first block of a replaced layer keeps the
    previous dilation, the following blocks double it. Every 3x3 conv of a block (both in a
    BasicBlock) gets the block's dilation as its padding too, so feature sizes stay the same.
    """
    dilation = 1
    for name in DILATED_LAYERS[output_stride]:
        for index, block in enumerate(getattr(model, name)):
            block_dilation = dilation if index == 0 else 2 * dilation
            for conv in block.modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation = (block_dilation, block_dilation)
                    conv.padding = (block_dilation, block_dilation)
            block.stride = 1
        dilation *= 2


DILATE: dict[str, Callable[[nn.Module, int], None]] = {"resnet": dilate_resnet}


def check_output_stride(arch: str, family: str, output_stride: int) -> None:
    """Refuse strides other than 8, 16 and 32, and 8 or 16 for families that cannot dilate."""
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise CrossStitchError(
            f"unknown output stride {output_stride!r}; use one of: "
            f"{', '.join(map(str, OUTPUT_STRIDES))}"
        )
    if output_stride != OUTPUT_STRIDES[-1] and family not in DILATE:
        raise CrossStitchError(
            f"output stride {output_stride} needs dilated convolutions, which only the "
            f"{', '.join(DILATE)} family supports (resnet*, resnext*, wide_resnet*); {arch} is "
            f"of the {family} family: use output stride 32"
        )


def apply_output_stride(model: nn.Module, family: str, output_stride: int) -> None:
    """Dilate ``model`` in place to ``output_stride`` (checked before); 32 leaves it as it is."""
    if output_stride != OUTPUT_STRIDES[-1]:
        DILATE[family](model, output_stride)


def dilated_reduction(reduction: int, output_stride: int) -> int:
    """A stage's total stride once dilation caps the network's at ``output_stride``."""
    return min(reduction, output_stride)
