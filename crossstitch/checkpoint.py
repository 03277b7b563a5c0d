"""The checkpoint file: ``{"format", "version", "config", "state_dict"}`` in one ``torch.save``.

Loading goes through ``torch.load(weights_only=True)`` only, then checks the schema, so a file
can neither run code nor reach the model builder with values of unexpected types.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

from crossstitch.backbone import FEATURES, CrossStitchBackbone
from crossstitch.dilation import OUTPUT_STRIDES
from crossstitch.errors import CrossStitchError
from crossstitch.files import atomic_path

FORMAT = "crossstitch"
VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the saved model, recorded for the reader."""
    return {name: version(name) for name in ("crossstitch", "torch", "torchvision")}


def save(model: CrossStitchBackbone, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically; only models built with ``from_torchvision`` can be rebuilt.

    Saving through a file object keeps the archive's inner folder name fixed, so the same model
    always gives the same bytes.

    Heads given as channel counts are rebuilt from the config; a head given as a module is not.
    """
    if model.config.get("arch") is None:
        raise CrossStitchError(
            "this model was built from your own modules, so a checkpoint could not rebuild it; "
            "save model.state_dict() instead, or build it with CrossStitchBackbone.from_torchvision"
        )
    custom = [task for task in model.heads if task not in model.config.get("heads", {})]
    if custom:
        raise CrossStitchError(
            f"the head of task {', '.join(custom)} is your own module, so a checkpoint could not "
            "rebuild it; save model.state_dict() instead, or give the head as a number of "
            "output channels"
        )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": {**model.config, "versions": library_versions()},
        "state_dict": model.state_dict(),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def read(path: str | os.PathLike[str]) -> dict:
    """Read and validate a checkpoint file without building anything; returns the payload."""
    path = Path(path)
    if not path.is_file():
        raise CrossStitchError(
            f"checkpoint {path} does not exist; create one with `crossstitch build`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CrossStitchError(f"{path} is not a crossstitch checkpoint ({reason[:200]})") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        hint = " (it looks like a plain state_dict)" if _is_state_dict(payload) else ""
        raise CrossStitchError(f"{path} is not a crossstitch checkpoint{hint}")
    file_version = payload.get("version")
    if not isinstance(file_version, int) or isinstance(file_version, bool):
        raise CrossStitchError(f"{path} has no valid format version")
    if file_version > VERSION:
        raise CrossStitchError(
            f"{path} was written by a newer crossstitch (format version {file_version}, this one "
            f"reads up to {VERSION}); upgrade crossstitch"
        )
    check_config(path, payload.get("config"))
    if not _is_state_dict(payload.get("state_dict")):
        raise CrossStitchError(f"{path} has no valid state_dict")
    return dict(payload)


def load(path: str | os.PathLike[str]) -> CrossStitchBackbone:
    """Rebuild the model a checkpoint describes (offline) and load its weights."""
    payload = read(path)
    config = payload["config"]
    model = CrossStitchBackbone.from_torchvision(
        config["arch"],
        config["tasks"],
        weights=config.get("weights"),
        load_weights=False,
        alpha=config["alpha"],
        beta=config["beta"],
        granularity=config["granularity"],
        stages=config["stages"],
        heads=config.get("heads"),
        output_stride=config.get("output_stride", 32),
        features=config.get("features", "last"),
    )
    model.config.update({k: v for k, v in config.items() if k != "versions"})
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CrossStitchError(
            f"{path}: the weights do not fit its config ({first[-1].strip()[:200]})"
        ) from exc
    return model


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    )


_CONFIG_TYPES: dict[str, type | tuple[type, ...]] = {
    "arch": str,
    "tasks": list,
    "alpha": (int, float),
    "beta": (int, float),
    "granularity": str,
    "stages": list,
}


def check_config(path: str | os.PathLike[str], config: object) -> None:
    """Refuse a stored config whose fields are missing or not of the types the builder takes."""
    if not isinstance(config, Mapping):
        raise CrossStitchError(f"{path} has no config")
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CrossStitchError(f"{path}: config field '{key}' is missing or of the wrong type")
    for key in ("tasks", "stages"):
        if not all(isinstance(item, str) for item in config[key]):
            raise CrossStitchError(f"{path}: config field '{key}' must be a list of names")
    for key in ("alpha", "beta"):
        if not math.isfinite(config[key]):
            raise CrossStitchError(f"{path}: config field '{key}' is not a finite number")
    if not isinstance(config.get("weights"), str | None):
        raise CrossStitchError(f"{path}: config field 'weights' must be a weights name or null")
    heads = config.get("heads", {})
    if not isinstance(heads, Mapping) or not all(
        isinstance(task, str) and isinstance(c, int) and not isinstance(c, bool) and c > 0
        for task, c in heads.items()
    ):
        raise CrossStitchError(
            f"{path}: config field 'heads' must map task names to positive channel counts"
        )
    for key, allowed, default in (
        ("output_stride", OUTPUT_STRIDES, 32),
        ("features", FEATURES, "last"),
    ):
        value = config.get(key, default)
        if type(value) is not type(default) or value not in allowed:
            raise CrossStitchError(
                f"{path}: config field '{key}' must be one of {', '.join(map(str, allowed))}"
            )
