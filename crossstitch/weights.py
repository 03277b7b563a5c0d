"""Initial weights for the task backbones: torchvision's named weights or state_dict files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias
from urllib.error import URLError

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from crossstitch.archive import load_tensors
from crossstitch.config import Preprocess
from crossstitch.errors import CrossStitchError
from crossstitch.stages import arch_spec
from crossstitch.tensorfile import is_safetensors, read_state_dict

NO_WEIGHTS = ("none", "")
WEIGHTS_FILE_SOURCE = "ImageNet defaults (weights file: its transform is not recorded)"
MODULES_SOURCE = "ImageNet defaults (your own modules: their transform is not recorded)"
# What ``weights`` accepts: a torchvision weights name or enum, a state_dict file, or None.
Weights: TypeAlias = str | WeightsEnum | os.PathLike | None


def resolve_weights(arch: str, weights: Weights) -> tuple[str | None, str | None]:
    """``(weights name, state_dict file)`` for a ``weights`` argument; at most one is set.

    Strings name torchvision weights (``None`` and ``"none"`` mean random init); an enum member
    must belong to ``arch``; a ``pathlib.Path`` (any ``os.PathLike``) is a state_dict file.
    """
    if weights is None:
        return None, None
    if isinstance(weights, os.PathLike):
        return None, os.fspath(weights)
    available = arch_spec(arch).weights
    if isinstance(weights, WeightsEnum):
        enum = torchvision.models.get_model_weights(arch)
        if not isinstance(weights, enum):
            raise CrossStitchError(
                f"{weights} are not weights of {arch}; use {enum.__name__}", param="weights"
            )
        return weights.name, None
    if not isinstance(weights, str):
        raise CrossStitchError(
            f"must be a weights name, a torchvision weights enum or a pathlib.Path, got "
            f"{weights!r}",
            param="weights",
        )
    if weights.lower() in NO_WEIGHTS:
        return None, None
    if weights not in available:
        raise CrossStitchError(
            f"unknown weights {weights!r} for {arch}; available: {', '.join(available)} or none "
            "(a state_dict file is given as a pathlib.Path)",
            param="weights",
        )
    if weights == "DEFAULT":
        return torchvision.models.get_model_weights(arch).DEFAULT.name, None
    return weights, None


def _one_size(value: object) -> int | None:
    """A preset's size, given as ``[n]`` or ``n``; None for anything else (e.g. height, width)."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def weights_preprocess(arch: str, weights: str) -> Preprocess:
    """The transform torchvision's named ``weights`` of ``arch`` were evaluated with.

    Read from the weights' own preset (``weights.transforms()``), which torchvision defines in
    code: nothing is downloaded. A preset that is not one shorter-side resize, one square crop
    and a supported interpolation is refused rather than guessed.
    """
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise CrossStitchError(f"{arch} has no torchvision weights", param="weights") from exc
    if weights not in enum.__members__:
        raise CrossStitchError(
            f"unknown weights {weights!r} for {arch}; torchvision has: "
            f"{', '.join(enum.__members__)}",
            param="weights",
        )
    entry = enum[weights]
    preset = entry.transforms()
    resize = _one_size(getattr(preset, "resize_size", None))
    crop = _one_size(getattr(preset, "crop_size", None))
    mode = getattr(preset, "interpolation", None)
    interpolation = mode.value if isinstance(mode, InterpolationMode) else None
    mean, std = getattr(preset, "mean", None), getattr(preset, "std", None)
    if None in (resize, crop, interpolation, mean, std):
        raise CrossStitchError(
            f"the transform of {arch} weights {weights} ({type(preset).__name__}) is not a "
            "resize, a square center crop and a normalisation",
            param="weights",
        )
    return Preprocess(
        resize=resize,
        crop=crop,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        source=f"torchvision {type(entry).__name__}.{entry.name}",
    )


def default_preprocess(input_size: int | None, source: str | None = None) -> Preprocess:
    """ImageNet mean, std and bilinear resize for weights of unknown transform.

    Any-size models get resize 256, crop 224; a fixed-size model (ViT, MaxViT) a crop of the one
    size it takes, resized by the same 224/256 ratio. ``source`` defaults to the random-init text.
    """
    source = source or Preprocess().source
    if input_size is None:
        return Preprocess(source=source)
    return Preprocess.from_crop(input_size, source=source)


def preprocess_for(
    arch: str, weights: str | None, weights_file: str | None, input_size: int | None
) -> Preprocess:
    """The transform a build records for its initial weights: the named weights' own, else
    the ImageNet defaults, with a source that says which.
    """
    if weights is not None:
        return weights_preprocess(arch, weights)
    return default_preprocess(input_size, WEIGHTS_FILE_SOURCE if weights_file else None)


def cached_weights_path(arch: str, weights: str) -> Path:
    """Where torchvision looks for the file of named weights before downloading it."""
    url = torchvision.models.get_model_weights(arch)[weights].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def network_kwargs(arch: str, weights: str | None) -> dict:
    """Builder arguments that torchvision derives from named weights and that change what the
    network computes: the input rescaling of GoogLeNet and Inception v3, the input size of ViT.
    """
    if weights is None:
        return {}
    meta = torchvision.models.get_model_weights(arch)[weights].meta
    family = arch_spec(arch).family
    if family in ("googlenet", "inception"):
        return {"transform_input": True}
    if family == "vit":
        return {"image_size": meta["min_size"][0]}
    return {}


def build_classifier(arch: str, weights: str | None, load: bool = True) -> nn.Module:
    """The torchvision classifier ``arch``, randomly initialised or with named weights.

    Named weights come from torchvision's cache, or are downloaded into it; offline and not
    cached, the error names the file torchvision expects and the ``--weights-file`` way round.
    With ``load=False`` the network is the one those weights imply, left randomly initialised.
    """
    if weights is None or not load:
        return torchvision.models.get_model(arch, **network_kwargs(arch, weights))
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (URLError, OSError, RuntimeError) as exc:
        path = cached_weights_path(arch, weights)
        reason = getattr(exc, "reason", None) or exc
        raise CrossStitchError(
            f"weights {weights} for {arch} are not available ({reason}); torchvision expects "
            f"the file at {path} ($TORCH_HOME/hub/checkpoints), or pass --weights-file PATH"
        ) from exc


def load_state_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state_dict file as data only: a safetensors file (as Hugging Face and timm save
    them), or a ``torch.save`` file (as torchvision saves them) with ``weights_only=True``.

    A dict with a ``"model"`` or ``"state_dict"`` entry (training checkpoints) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CrossStitchError(f"weights file {path} does not exist or is not a file")
    if is_safetensors(path):
        return read_state_dict(path, "state_dict file")
    state = load_tensors(path, "state_dict file")
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CrossStitchError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(state)


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_state(
    model: nn.Module, state: Mapping[str, Tensor], head: tuple[str, ...], source: str
) -> None:
    """Load a classifier's state_dict into ``model``, ignoring the head the backbone drops.

    Any other missing, unexpected or misshapen key is an error that names the keys.
    """
    expected = model.state_dict()

    def in_head(key: str) -> bool:
        return key.split(".", 1)[0] in head

    missing = [k for k in expected if k not in state and not in_head(k)]
    unexpected = [k for k in state if k not in expected and not in_head(k)]
    misshapen = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in state
        if k in expected and not in_head(k) and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", misshapen),
        )
        if keys
    ]
    if problems:
        raise CrossStitchError(f"{source} does not fit this architecture; {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items() if not in_head(k)}, strict=False)
