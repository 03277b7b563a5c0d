"""What an ONNX file says about itself: producer, version, doc strings and the input as an image.

Consumers that never heard of crossstitch (Netron, model registries, Windows ML style tools) read
these standard fields; crossstitch itself reads only ``metadata_props["crossstitch.config"]``.
"""

from __future__ import annotations

import re

import onnx
from onnxscript import ir

import crossstitch
from crossstitch.backbone import CrossStitchBackbone
from crossstitch.config import Preprocess

PRODUCER = "crossstitch"
# ONNX's image metadata (docs/MetadataProps.md in the onnx repository), for the source image.
# No ``Image.NominalPixelRange``: the input is normalised by mean and std, which none of its
# values (0-255, 0-1, -1-1, 16-235) describes; the input's doc_string gives the range instead.
IMAGE_METADATA = {"Image.BitmapPixelFormat": "Rgb8", "Image.ColorSpaceGamma": "SRGB"}
# ONNX dimension denotations of the NCHW input.
INPUT_DENOTATIONS = ("DATA_BATCH", "DATA_CHANNEL", "DATA_FEATURE", "DATA_FEATURE")
VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def model_version(version: str) -> int:
    """``major * 1_000_000 + minor * 1_000 + patch`` of a ``X.Y[.Z]`` version (0.1.0 -> 1000);
    pre-release and local suffixes are dropped, parts above 999 are clamped to 999.
    """
    match = VERSION.match(version)
    if match is None:
        return 0
    major, minor, patch = (min(int(part or 0), 999) for part in match.groups())
    return major * 1_000_000 + minor * 1_000 + patch


def preprocess_metadata(preprocess: Preprocess) -> dict[str, str]:
    """The input transform as readable ``metadata_props`` keys, one per field."""
    return {
        "crossstitch.preprocess.resize": str(preprocess.resize),
        "crossstitch.preprocess.crop": str(preprocess.crop),
        "crossstitch.preprocess.mean": ",".join(map(repr, preprocess.mean)),
        "crossstitch.preprocess.std": ",".join(map(repr, preprocess.std)),
        "crossstitch.preprocess.interpolation": preprocess.interpolation,
        "crossstitch.preprocess.source": preprocess.source,
    }


def value_range(preprocess: Preprocess) -> tuple[float, float]:
    """The lowest and highest input value an image in [0, 1] gives after normalisation."""
    pairs = list(zip(preprocess.mean, preprocess.std, strict=True))
    return min(-m / s for m, s in pairs), max((1 - m) / s for m, s in pairs)


def input_doc(model: CrossStitchBackbone, fixed: tuple[int, int] | None) -> str:
    """The input's doc_string: layout, colour order, size, value range and the normalisation.

    ``fixed`` is the height and width the file keeps (None: any).
    """
    p = model.config.preprocess
    low, high = value_range(p)
    size = f"height x width {fixed[0]}x{fixed[1]} only" if fixed else "any height and width"
    return (
        f"float32 images [batch, 3, height, width] (NCHW), channels R, G, B; {size}. "
        f"8-bit sRGB pixels divided by 255, the shorter side resized to {p.resize} "
        f"({p.interpolation}), center-cropped to {p.crop}x{p.crop}, then per channel "
        f"(x - mean) / std with mean {list(p.mean)} and std {list(p.std)}, so values lie in "
        f"[{low:.3f}, {high:.3f}]. Transform from: {p.source}."
    )


def output_doc(model: CrossStitchBackbone, name: str) -> str:
    """One output's doc_string: which task, head or features, and its layout."""
    if name in model.heads:
        channels = model.config.head_channels.get(name)
        what = f"{channels} channels" if channels else "its head's channels"
        return f"task {name}: dense head output, [batch, {what}, height, width] of the input"
    task, _, stage = name.partition(".")
    where = f"after stage {stage}" if stage else "of the last stage"
    layout = "NHWC" if model.layout == "nhwc" else "NCHW"
    return f"task {task}: backbone features {where} ({layout})"


def model_doc(model: CrossStitchBackbone) -> str:
    """The model's doc_string: what it is, its tasks, stages and outputs."""
    config = model.config
    return (
        f"Cross-stitch multi-task network (Misra et al. 2016) exported by crossstitch "
        f"{crossstitch.__version__}: one {config.arch or config.family} backbone per task for "
        f"tasks {', '.join(config.tasks)}, cross-stitch units ({config.granularity} "
        f"granularity) after {', '.join(config.stages) or 'no stage'}. Input 'image': see its "
        f"doc_string and the crossstitch.preprocess.* metadata. Outputs: "
        f"{', '.join(model.output_names)}. The full config is the JSON in metadata "
        f"crossstitch.config."
    )


def producer_fields() -> dict[str, str | int]:
    """``producer_name``, ``producer_version`` and ``model_version`` of every file."""
    return {
        "producer_name": PRODUCER,
        "producer_version": crossstitch.__version__,
        "model_version": model_version(crossstitch.__version__),
    }


def describe_ir(
    program_model: ir.Model, model: CrossStitchBackbone, fixed: tuple[int, int] | None
) -> None:
    """Set the fields on a model from torch's dynamo exporter, before it is saved."""
    for key, value in producer_fields().items():
        setattr(program_model, key, value)
    program_model.doc_string = model_doc(model)
    (image,) = program_model.graph.inputs
    image.doc_string = input_doc(model, fixed)
    if image.shape is not None:
        for axis, denotation in enumerate(INPUT_DENOTATIONS):
            image.shape.set_denotation(axis, denotation)
    for output in program_model.graph.outputs:
        output.doc_string = output_doc(model, output.name)


def describe_proto(
    proto: onnx.ModelProto, model: CrossStitchBackbone, fixed: tuple[int, int] | None
) -> None:
    """Set the same fields on a ``ModelProto`` (the TorchScript-based exporter's output)."""
    for key, value in producer_fields().items():
        setattr(proto, key, value)
    proto.doc_string = model_doc(model)
    (image,) = proto.graph.input
    image.doc_string = input_doc(model, fixed)
    for dim, denotation in zip(image.type.tensor_type.shape.dim, INPUT_DENOTATIONS, strict=False):
        dim.denotation = denotation
    for output in proto.graph.output:
        output.doc_string = output_doc(model, output.name)
