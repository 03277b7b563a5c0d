"""Output stride by dilation: DeepLab's way to keep a backbone's last stages at a finer resolution.

Applied to a built classifier after its weights are loaded: only strides, dilations and paddings
change, never a weight, so pretrained weights stay valid (docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import ResNet

from crossstitch.config import OUTPUT_STRIDES
from crossstitch.errors import CrossStitchError

# Per output stride, the layers whose stride-2 convolutions become stride 1, with the factor by
# which the grid each of them sees is finer than before: 2 for the first such layer, 4 after it.
DILATED_LAYERS = {8: (("layer3", 2), ("layer4", 4)), 16: (("layer4", 2),), 32: ()}


def dilate_resnet(model: ResNet, output_stride: int) -> None:
    """Replace the stride of ``layer4`` (16) or ``layer3`` and ``layer4`` (8) by dilation.

    In a layer whose grid becomes ``f`` times finer, the convolution that used to stride sees a
    grid ``f/2`` times finer than before and is dilated by ``f/2``; every convolution after it
    is dilated by ``f``. Each 3x3 conv's padding equals its dilation, so feature sizes stay as
    they were. The rule holds for Bottleneck blocks (where it is torchvision's
    ``replace_stride_with_dilation``) and BasicBlocks alike.
    """
    for name, factor in DILATED_LAYERS[output_stride]:
        for conv in getattr(model, name).modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            strided = conv.stride == (2, 2)
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                dilation = factor // 2 if strided else factor
                conv.dilation = conv.padding = (dilation, dilation)
        for block in getattr(model, name):
            block.stride = 1


DILATE: dict[str, Callable[[nn.Module, int], None]] = {"resnet": dilate_resnet}


def check_output_stride(arch: str, family: str, output_stride: object) -> None:
    """Refuse strides other than 8, 16 and 32, and 8 or 16 for families that cannot dilate."""
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise CrossStitchError(
            f"must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}",
            param="output_stride",
        )
    if output_stride != OUTPUT_STRIDES[-1] and family not in DILATE:
        raise CrossStitchError(
            f"{output_stride} needs dilated convolutions, which only the "
            f"{', '.join(DILATE)} family supports (resnet*, resnext*, wide_resnet*); {arch} is "
            f"of the {family} family: use 32",
            param="output_stride",
        )


def apply_output_stride(model: nn.Module, family: str, output_stride: int) -> None:
    """Dilate ``model`` in place to ``output_stride`` (checked before); 32 leaves it as it is."""
    if output_stride != OUTPUT_STRIDES[-1]:
        DILATE[family](model, output_stride)


def dilated_reduction(reduction: int, output_stride: int) -> int:
    """A stage's total stride once dilation caps the network's at ``output_stride``."""
    return min(reduction, output_stride)
