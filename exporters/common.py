"""What every format module shares: export options, dynamic shapes, quiet library calls."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.export import Dim

import crossstitch
from crossstitch.backbone import CrossStitchBackbone
from crossstitch.config import MAX_INPUT_SIZE, RESERVED_TASKS, CrossStitchConfig
from crossstitch.errors import CrossStitchError

# The input of every exported graph; no task may take this name (crossstitch.config).
(INPUT_NAME,) = RESERVED_TASKS
CONFIG_FILE = "crossstitch.json"
QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")


@dataclass(frozen=True)
class ExportInput:
    """The example input an artifact was exported with, and which of its dimensions stay free."""

    shape: tuple[int, int, int, int]
    dynamic: bool
    spatial_free: bool
    fixed_because: str | None = None


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: the model config and export input stored in it, and its runtime."""

    config: CrossStitchConfig
    export: ExportInput
    run: Callable[[Tensor], dict[str, Tensor]]


def read_artifact_config(text: str, source: Path) -> tuple[CrossStitchConfig, ExportInput]:
    """The config JSON stored in an artifact, checked field by field like a checkpoint's."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise CrossStitchError(f"{source} has a damaged crossstitch config ({exc})") from exc
    config = CrossStitchConfig.from_dict(raw, str(source))
    shape, dynamic = raw.get("export_input"), raw.get("dynamic")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        and all(1 <= n <= MAX_INPUT_SIZE for n in shape)
    ):
        raise CrossStitchError(f"{source}: config field 'export_input' is missing or damaged")
    spatial_free = raw.get("spatial_free", dynamic)
    if not isinstance(dynamic, bool) or not isinstance(spatial_free, bool):
        raise CrossStitchError(f"{source}: config field 'dynamic' is missing or damaged")
    because = raw.get("fixed_because")
    if not (because is None or isinstance(because, str)):
        raise CrossStitchError(f"{source}: config field 'fixed_because' is damaged")
    return config, ExportInput(tuple(shape), dynamic, spatial_free, because)


@dataclass(frozen=True)
class ExportOptions:
    """Choices that shape an artifact: free or fixed input shape, and the ONNX opset."""

    dynamic: bool = True
    opset: int | None = None


def torch_artifact(module: Callable, config: str, path: Path, kind: str) -> Artifact:
    """A loaded TorchScript or pt2 module as an Artifact; without crossstitch's config, refused."""
    if not config:
        raise CrossStitchError(f"{path} is a {kind} file, but not one exported by crossstitch")

    def run(x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return dict(module(x))

    return Artifact(*read_artifact_config(config, path), run)


# Families whose artifacts keep the export's height and width, and why.
FIXED_SPATIAL = {
    "swin": "torch.export specialises Swin's window padding to the export size: a swin_t program "
    "exported with free height and width took minutes and then refused a 256x288 input",
    "timm_mobilevit": "timm's MobileViT computes its patch grid with math.ceil of the input "
    "size: an ONNX graph exported with free height and width failed on a 96x128 input, and "
    "the pt2 program could not be serialized",
}


SAME_PADDING = (
    "timm's TensorFlow-style 'same' padding computes each pad with math.ceil of the input size: "
    "the pt2 program of tf_efficientnetv2_b0 exported with free height and width could not be "
    "serialized, and its ONNX export took 392 s"
)


def fixed_because(model: CrossStitchBackbone) -> str | None:
    """Why artifacts of ``model`` keep the export's height and width; None if they take any."""
    if model.input_size is not None:
        return f"{model.config.arch} takes one input size"
    if model.config.family in FIXED_SPATIAL:
        return FIXED_SPATIAL[model.config.family]
    if model.config.source == "timm":
        from crossstitch.timm_backbones import pads_from_input_size

        if pads_from_input_size(model):
            return SAME_PADDING
    return None


def spatial_free(model: CrossStitchBackbone) -> bool:
    """Whether artifacts of ``model`` take any height and width (else only the export's)."""
    return fixed_because(model) is None


def dynamic_shapes(model: CrossStitchBackbone, dynamic: bool) -> dict | None:
    """torch.export dynamic shapes for the image input: batch, height and width free.

    Height and width use ``Dim.AUTO``: torch.export derives the smallest size at which every
    stage still has features larger than 1x1, which is architecture-specific. Fixed-size models
    (ViT, MaxViT), the families in ``FIXED_SPATIAL`` and timm models with TensorFlow-style
    padding keep the export's height and width (``fixed_because``).
    """
    if not dynamic:
        return None
    axes = {0: Dim("batch", min=1)}
    if spatial_free(model):
        axes.update({2: Dim.AUTO, 3: Dim.AUTO})
    return {"x": axes}


def output_axes(model: CrossStitchBackbone, output: str) -> dict[int, str]:
    """The free axes of one output: batch, and the map's height and width where they vary.

    Head outputs are ``[N, C, H, W]``; features keep their family's layout.
    """
    if not spatial_free(model):
        return {0: "batch"}
    if model.layout == "nhwc" and output not in model.heads:
        return {0: "batch", 1: "height", 2: "width"}
    return {0: "batch", 2: "height", 3: "width"}


def input_config(model: CrossStitchBackbone, example: Tensor, options: ExportOptions) -> dict:
    """The export's input shape and which of its dimensions the artifact leaves free."""
    return {
        "export_input": list(example.shape),
        "dynamic": options.dynamic,
        "spatial_free": options.dynamic and spatial_free(model),
        "fixed_because": fixed_because(model),
    }


def artifact_config(model: CrossStitchBackbone, example: Tensor, options: ExportOptions) -> str:
    """The model's config as JSON, with the export's input shape, stored inside every artifact."""
    return json.dumps(
        {
            **model.config.to_dict(),
            "crossstitch": crossstitch.__version__,
            **input_config(model, example, options),
        },
        sort_keys=True,
    )


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Keep exporter chatter (prints, warnings, log records) off the screen; yields the text."""
    captured = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with (
        contextlib.redirect_stdout(captured),
        contextlib.redirect_stderr(captured),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield captured
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
