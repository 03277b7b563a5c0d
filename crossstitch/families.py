"""Stage adapters: how each torchvision family splits into a stem and a sequence of stages.

A stage ends where the spatial resolution of the features drops. An adapter names the stages,
hands back the model's own modules (nothing is copied or re-initialised) and says which
top-level children form the classifier head that the backbone drops. Adding a family means
writing one ``split_*`` function and one ``Family`` entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision import models

from crossstitch.errors import CrossStitchError


@dataclass
class Split:
    """A network cut into stages: run ``stem``, then each stage in order."""

    stem: nn.Module
    stages: OrderedDict[str, nn.Module]


@dataclass(frozen=True)
class Family:
    """A torchvision model family and how to split it."""

    name: str
    model_type: type[nn.Module]
    split: Callable[[nn.Module], Split]
    head: tuple[str, ...]
    channel_dim: int = 1


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


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("resnet", models.ResNet, split_resnet, head=("avgpool", "fc")),
        Family("vgg", models.VGG, split_vgg, head=("avgpool", "classifier")),
    )
}


def family_of(model: nn.Module) -> Family:
    """The adapter for a model built by torchvision; anything else is refused by name."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_type):
            return family
    supported = ", ".join(f.model_type.__name__ for f in FAMILIES.values())
    raise CrossStitchError(
        f"no stage adapter for {type(model).__name__}; supported model classes: {supported}"
    )
