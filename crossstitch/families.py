"""Stage adapters: how each torchvision family splits into a stem and a sequence of stages.

A stage ends where the spatial resolution of the features drops (docs/design.md §3). An adapter
names the stages, hands back the model's own modules (nothing is copied or re-initialised) and
says which top-level children form the classifier head that the backbone drops. Most families
only list their layers in order and let ``by_resolution`` cut them where the resolution drops;
adding a family means one such listing and one ``Family`` entry.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision import models

from crossstitch.errors import CrossStitchError
from crossstitch.shapes import meta_forward, meta_images

SPLIT_SIZE = 224
VIT_STAGES = 4
MAXVIT_INPUT = 224  # torchvision builds MaxViT-T for 224x224 images only


@dataclass
class Split:
    """A network cut into stages: run ``stem``, then each stage in order."""

    stem: nn.Module
    stages: OrderedDict[str, nn.Module]


@dataclass(frozen=True)
class Family:
    """A torchvision model family and how to split it.

    ``layout`` is how its stage features are laid out: ``nchw`` maps, ``nhwc`` maps (Swin) or
    ``tokens``, ``[N, 1 + patches, C]`` with the class token first (ViT). ``fixed_size`` gives
    the one square input size a model accepts, or None when any size large enough works.
    """

    name: str
    model_type: type[nn.Module]
    split: Callable[[nn.Module], Split]
    head: tuple[str, ...]
    layout: str = "nchw"
    fixed_size: Callable[[nn.Module], int | None] = lambda model: None

    @property
    def channel_dim(self) -> int:
        """Where the channels lie in the stage features."""
        return channel_dim(self.layout)


def channel_dim(layout: str) -> int:
    """Where the channels lie in features of ``layout``: 1 for NCHW, last otherwise."""
    return 1 if layout == "nchw" else -1


def resolution(shape: torch.Size, layout: str) -> int:
    """The height of a feature map, or for tokens the side of the square grid of patches."""
    if layout == "nchw":
        return shape[2]
    if layout == "nhwc":
        return shape[1]
    return math.isqrt(shape[1] - 1)


def feature_size(shape: torch.Size, layout: str) -> tuple[int, int]:
    """Height and width of a feature map; for tokens, the grid of patches they come from."""
    if layout == "nchw":
        return tuple(shape[2:4])
    if layout == "nhwc":
        return tuple(shape[1:3])
    side = math.isqrt(shape[1] - 1)
    return side, side


def nominal_reduction(size: int, features: int, layout: str) -> int:
    """The total stride from an input of ``size`` pixels to features ``features`` high.

    Convolutions without padding make the ratio inexact (224 px to 13 is 17.2), so maps report
    the nearest power of two; ViT tokens report the patch size exactly.
    """
    if layout == "tokens":
        return size // features
    return 2 ** round(math.log2(size / features))


def _has_weights(layers: list[tuple[str, nn.Module]]) -> bool:
    return any(True for _, layer in layers for _ in layer.parameters())


def by_resolution(layers: Iterable[tuple[str, nn.Module]], layout: str = "nchw") -> Split:
    """Cut an ordered list of layers into stages ``stage1, stage2, ...`` where resolution drops.

    A layer that raises the total stride starts a new stage (an unpadded convolution that only
    trims the border does not). A stage of weightless layers only (a
    lone max-pool) is merged into the stage after it, or the one before it at the end.
    """
    x = meta_images((SPLIT_SIZE, SPLIT_SIZE))
    current = 1
    groups: list[list[tuple[str, nn.Module]]] = []
    for name, layer in layers:
        x = meta_forward(layer, x)
        reduction = nominal_reduction(SPLIT_SIZE, resolution(x.shape, layout), layout)
        if not groups or reduction > current:
            groups.append([])
        groups[-1].append((name.replace(".", "_"), layer))
        current = reduction
    merged: list[list[tuple[str, nn.Module]]] = []
    pending: list[tuple[str, nn.Module]] = []
    for group in groups:
        pending += group
        if _has_weights(pending):
            merged.append(pending)
            pending = []
    if pending:
        merged[-1] += pending
    return Split(
        stem=nn.Identity(),
        stages=OrderedDict(
            (f"stage{i}", nn.Sequential(OrderedDict(group))) for i, group in enumerate(merged, 1)
        ),
    )


def split_resnet(model: models.ResNet) -> Split:
    """ResNet, ResNeXt, Wide-ResNet: stem up to the max-pool, then ``layer1`` to ``layer4``."""
    stem = nn.Sequential(
        OrderedDict((name, getattr(model, name)) for name in ("conv1", "bn1", "relu", "maxpool"))
    )
    stages = OrderedDict((f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5))
    return Split(stem=stem, stages=stages)


def split_vgg(model: models.VGG) -> Split:
    """VGG with or without BN: ``block1`` to ``block5``, each ending with its max-pool."""
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    start = 0
    layers = list(model.features)
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.MaxPool2d):
            stages[f"block{len(stages) + 1}"] = model.features[start : index + 1]
            start = index + 1
    return Split(stem=nn.Identity(), stages=stages)


def _children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{name}", child) for name, child in module.named_children()]


def split_features(model: nn.Module) -> Split:
    """Models whose ``features`` sequence is the whole backbone (AlexNet, ConvNeXt, EfficientNet,
    MobileNet, SqueezeNet)."""
    return by_resolution(_children(model.features, "features"))


def split_densenet(model: models.DenseNet) -> Split:
    """DenseNet: its ``features``, then the ReLU that its forward applies after them."""
    return by_resolution([*_children(model.features, "features"), ("relu", nn.ReLU())])


def split_mnasnet(model: models.MNASNet) -> Split:
    """MNASNet: its ``layers`` sequence."""
    return by_resolution(_children(model.layers, "layers"))


def split_regnet(model: models.RegNet) -> Split:
    """RegNet: the stem, then the four blocks of its trunk."""
    return by_resolution([("stem", model.stem), *_children(model.trunk_output, "trunk_output")])


def split_shufflenet(model: models.ShuffleNetV2) -> Split:
    """ShuffleNet v2: ``conv1``, the max-pool, ``stage2`` to ``stage4`` and ``conv5``."""
    names = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
    return by_resolution([(name, getattr(model, name)) for name in names])


def split_maxvit(model: models.MaxVit) -> Split:
    """MaxViT: the convolutional stem, then its four blocks."""
    return by_resolution([("stem", model.stem), *_children(model.blocks, "blocks")])


def split_swin(model: models.SwinTransformer) -> Split:
    """Swin v1 and v2: patch embedding, stages and patch merging, then the final norm.

    Features are channel-last, ``[N, H, W, C]``, as Swin computes them.
    """
    return by_resolution([*_children(model.features, "features"), ("norm", model.norm)], "nhwc")


class InputTransform(nn.Module):
    """The input rescaling that GoogLeNet and Inception v3 apply with pretrained weights
    (``transform_input=True``): ImageNet normalisation turned into the (x - 0.5) / 0.5 they were
    trained with. The arithmetic is torchvision's, term for term.
    """

    def forward(self, x: Tensor) -> Tensor:
        x0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x0, x1, x2), 1)


def _inception_split(model: nn.Module, head: tuple[str, ...]) -> Split:
    split = by_resolution((n, m) for n, m in model.named_children() if n not in head)
    if model.transform_input:
        split.stem = InputTransform()
    return split


def split_googlenet(model: models.GoogLeNet) -> Split:
    """GoogLeNet: its layers in order, without the auxiliary classifiers."""
    return _inception_split(model, GOOGLENET_HEAD)


def split_inception(model: models.Inception3) -> Split:
    """Inception v3: its layers in order, without the auxiliary classifier."""
    return _inception_split(model, INCEPTION_HEAD)


class VitStem(nn.Module):
    """ViT patch embedding: patches to tokens, the class token in front, position embedding.

    The input must be the model's ``image_size`` square, as the position embedding is learned for
    that many patches.
    """

    def __init__(self, model: models.VisionTransformer) -> None:
        super().__init__()
        self.image_size = model.image_size
        self.patch_size = model.patch_size
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.pos_embedding = model.encoder.pos_embedding
        self.dropout = model.encoder.dropout

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"this ViT takes {self.image_size}x{self.image_size} images")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


def split_vit(model: models.VisionTransformer) -> Split:
    """ViT: the patch embedding as the stem, then four equal groups of encoder blocks; the last
    ends with the encoder's final norm. Features are tokens ``[N, 1 + patches, C]``."""
    blocks = list(model.encoder.layers.named_children())
    size = len(blocks) // VIT_STAGES
    stages = OrderedDict()
    for i in range(VIT_STAGES):
        group = OrderedDict(blocks[i * size : (i + 1) * size])
        if i == VIT_STAGES - 1:
            group["ln"] = model.encoder.ln
        stages[f"stage{i + 1}"] = nn.Sequential(group)
    return Split(stem=VitStem(model), stages=stages)


class Staged(nn.Module):
    """A network already cut into named stages, run in order, with the ``Family`` that describes
    it: how a timm model cut at its feature points reaches ``CrossStitchBackbone``.
    """

    def __init__(self, stages: OrderedDict[str, nn.Module], family: Family) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.family = family

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x


def split_staged(model: Staged) -> Split:
    """A ``Staged`` network: its own stages, no stem."""
    return Split(stem=nn.Identity(), stages=OrderedDict(model.stages.items()))


GOOGLENET_HEAD = ("aux1", "aux2", "avgpool", "dropout", "fc")
INCEPTION_HEAD = ("AuxLogits", "avgpool", "dropout", "fc")

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("alexnet", models.AlexNet, split_features, head=("avgpool", "classifier")),
        Family("convnext", models.ConvNeXt, split_features, head=("avgpool", "classifier")),
        Family("densenet", models.DenseNet, split_densenet, head=("classifier",)),
        Family("efficientnet", models.EfficientNet, split_features, ("avgpool", "classifier")),
        Family("googlenet", models.GoogLeNet, split_googlenet, head=GOOGLENET_HEAD),
        Family("inception", models.Inception3, split_inception, head=INCEPTION_HEAD),
        Family(
            "maxvit",
            models.MaxVit,
            split_maxvit,
            head=("classifier",),
            fixed_size=lambda model: MAXVIT_INPUT,
        ),
        Family("mnasnet", models.MNASNet, split_mnasnet, head=("classifier",)),
        Family("mobilenet_v2", models.MobileNetV2, split_features, head=("classifier",)),
        Family("mobilenet_v3", models.MobileNetV3, split_features, ("avgpool", "classifier")),
        Family("regnet", models.RegNet, split_regnet, head=("avgpool", "fc")),
        Family("resnet", models.ResNet, split_resnet, head=("avgpool", "fc")),
        Family("shufflenet", models.ShuffleNetV2, split_shufflenet, head=("fc",)),
        Family("squeezenet", models.SqueezeNet, split_features, head=("classifier",)),
        Family(
            "swin",
            models.SwinTransformer,
            split_swin,
            head=("permute", "avgpool", "flatten", "head"),
            layout="nhwc",
        ),
        Family("vgg", models.VGG, split_vgg, head=("avgpool", "classifier")),
        Family(
            "vit",
            models.VisionTransformer,
            split_vit,
            head=("heads",),
            layout="tokens",
            fixed_size=lambda model: model.image_size,
        ),
    )
}


def family_of(model: nn.Module) -> Family:
    """The adapter for a model built by torchvision, or the family a ``Staged`` network carries;
    anything else is refused by name."""
    if isinstance(model, Staged):
        return model.family
    for family in FAMILIES.values():
        if isinstance(model, family.model_type):
            return family
    supported = ", ".join(f.model_type.__name__ for f in FAMILIES.values())
    raise CrossStitchError(
        f"no stage adapter for {type(model).__name__}; supported model classes: {supported}",
        param="models",
    )
