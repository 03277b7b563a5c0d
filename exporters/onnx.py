"""ONNX: torch.onnx's dynamo exporter, checked with onnx.checker, run with onnxruntime (CPU)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from onnxscript import ir
from onnxscript.version_converter import convert_version
from torch import Tensor

from crossstitch.backbone import CrossStitchBackbone
from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError, first_line
from crossstitch.memory import weights_bytes

from .common import (
    INPUT_NAME,
    Artifact,
    ExportInput,
    ExportOptions,
    artifact_config,
    dynamic_shapes,
    output_axes,
    quiet,
    read_artifact_config,
    spatial_free,
)
from .onnx_info import IMAGE_METADATA, describe_ir, describe_proto, preprocess_metadata

NAME = "onnx"
SUFFIX = ".onnx"
ATOL, RTOL = 1e-4, 1e-3
MIN_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
CONFIG_KEY = "crossstitch.config"
UNIT_WEIGHT = re.compile(r"cross_stitch\.(?P<stage>[^.]+)\.weight")


@cache
def newest_opset() -> int:
    """The newest opset the installed onnxruntime loads, probed with a one-node model."""
    for opset in range(onnx.defs.onnx_opset_version(), MIN_OPSET - 1, -1):
        probe = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])],
                "probe",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
            ),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        try:
            onnxruntime.InferenceSession(
                probe.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Exception:
            continue
        return opset
    return MIN_OPSET


def metadata(
    model: CrossStitchBackbone, example: Tensor, options: ExportOptions, opset: int
) -> dict[str, str]:
    """The config as ``metadata_props``: the whole config as JSON, its main fields, the input
    transform one field per key, and ONNX's image keys that apply (``onnx_info``).
    """
    config = model.config
    return {
        CONFIG_KEY: artifact_config(model, example, options),
        "crossstitch.arch": str(config.arch),
        "crossstitch.tasks": ",".join(config.tasks),
        "crossstitch.stages": ",".join(config.stages),
        "crossstitch.alpha": repr(config.alpha),
        "crossstitch.beta": repr(config.beta),
        "crossstitch.granularity": config.granularity,
        "crossstitch.heads": ",".join(f"{t}={c}" for t, c in config.heads),
        "crossstitch.outputs": ",".join(model.output_names),
        "crossstitch.output_stride": str(config.output_stride),
        "crossstitch.opset": str(opset),
        **preprocess_metadata(config.preprocess),
        **IMAGE_METADATA,
    }


def fixed_size(
    model: CrossStitchBackbone, example: Tensor, options: ExportOptions
) -> tuple[int, int] | None:
    """The height and width the file keeps: the export's, unless both stay free."""
    if options.dynamic and spatial_free(model):
        return None
    return (example.shape[-2], example.shape[-1])


def optimize_keeping_units(program: torch.onnx.ONNXProgram) -> None:
    """Optimise the graph as ``torch.onnx.export`` does, but keep the unit weights whole.

    Constant folding would replace each ``cross_stitch.<stage>.weight`` initializer by T² unnamed
    per-pair slices, and drop the product of a pair whose weight is exactly 1, so the file would
    no longer say what the units hold. The optimiser never folds a graph input, so the unit
    weights are graph inputs while it runs and initializers again afterwards; onnxruntime folds
    the slices when it loads the model, so inference runs the same graph either way.
    """
    graph = program.model.graph
    units = [value for name, value in graph.initializers.items() if UNIT_WEIGHT.fullmatch(name)]
    graph.inputs.extend(units)
    try:
        program.optimize()
    finally:
        for value in units:
            program.model.graph.inputs.remove(value)


def _dynamic_axes(model: CrossStitchBackbone) -> dict[str, dict[int, str]]:
    """Free axes for the TorchScript-based exporter, input and outputs by name."""
    image = {0: "batch", 2: "height", 3: "width"} if spatial_free(model) else {0: "batch"}
    return {INPUT_NAME: image, **{name: output_axes(model, name) for name in model.output_names}}


class OpsetUnreachable(Exception):
    """The exporter cannot convert this model to the opset that was asked for."""


def reach_opset(model: ir.Model, wanted: int, may_lower: bool) -> int:
    """The opset the exported ``model`` is at, converted down from ``wanted`` where needed.

    torch's exporter builds at its own opset and then converts; where a conversion is missing
    (GELU beyond opset 25, for one) it leaves the model at the lower opset with newer operators,
    which no runtime loads. With ``may_lower`` (no ``--opset`` given) the model is converted to
    the newest opset below ``wanted`` that the converter reaches; otherwise that is an error.
    """
    reached = model.opset_imports.get("", wanted)
    if reached == wanted:
        return wanted
    if may_lower:
        for target in range(wanted - 1, reached, -1):
            try:
                convert_version(model, target)
                return target
            except Exception:
                continue
    raise OpsetUnreachable(
        f"the ONNX exporter cannot convert this model to opset {wanted}"
        + ("" if may_lower else "; choose a lower --opset")
    )


def export(
    model: CrossStitchBackbone, path: Path, example: Tensor, options: ExportOptions
) -> dict[str, Any]:
    """Export with the dynamo exporter; the TorchScript-based exporter only if that fails.

    The dynamo export keeps each unit's weight as the initializer ``cross_stitch.<stage>.weight``
    (see ``optimize_keeping_units``), which ``read_unit_weights`` reads back.
    """
    opset = options.opset or newest_opset()
    external = weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    names = {"input_names": [INPUT_NAME], "output_names": model.output_names}
    details: dict[str, Any] = {"opset": opset, "external_data": external}
    with quiet() as log:
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                verbose=False,
                optimize=False,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes(model, options.dynamic),
                **names,
            )
            opset = details["opset"] = reach_opset(program.model, opset, options.opset is None)
            optimize_keeping_units(program)
            program.model.metadata_props.update(metadata(model, example, options, opset))
            describe_ir(program.model, model, fixed_size(model, example, options))
            program.save(path, external_data=external)
            details["exporter"] = "dynamo"
        except OpsetUnreachable:
            raise
        except Exception as exc:
            details["exporter"] = f"torchscript-based (dynamo exporter failed: {first_line(exc)})"
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=min(opset, 20),
                dynamic_axes=_dynamic_axes(model) if options.dynamic else None,
                **names,
            )
            proto = onnx.load(str(path))
            onnx.helper.set_model_props(proto, metadata(model, example, options, min(opset, 20)))
            describe_proto(proto, model, fixed_size(model, example, options))
            onnx.save_model(proto, str(path), save_as_external_data=external)
    details["log"] = log.getvalue()
    onnx.checker.check_model(str(path), full_check=True)
    return details


def looks_like_onnx(path: Path) -> bool:
    """Whether the file parses as an ONNX model with a graph (weights are not read)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return len(proto.graph.node) > 0


def _read(path: Path) -> tuple[onnx.ModelProto, CrossStitchConfig, ExportInput]:
    """The model without its external data, and its crossstitch config; foreign files refused.

    External data must lie beside the file: a location that leaves its folder is refused.
    """
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CrossStitchError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_KEY not in props or [i.name for i in proto.graph.input] != [INPUT_NAME]:
        raise CrossStitchError(f"{path} is an ONNX model, but not one exported by crossstitch")
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and Path(entry.value).name != entry.value:
                raise CrossStitchError(
                    f"{path} points to external data outside its folder ({entry.value!r}); refused"
                )
    return (proto, *read_artifact_config(props[CONFIG_KEY], path))


def read_unit_weights(path: Path) -> tuple[CrossStitchConfig, dict[str, Tensor]]:
    """The config and the weight of every initializer named ``cross_stitch.<stage>.weight``.

    Only those tensors are read, from the file or from its external data; keys are stage names.
    """
    proto, config, _ = _read(path)
    weights = {}
    for tensor in proto.graph.initializer:
        match = UNIT_WEIGHT.fullmatch(tensor.name)
        if not match:
            continue
        try:
            values = onnx.numpy_helper.to_array(tensor, base_dir=str(path.parent))
        except Exception as exc:
            raise CrossStitchError(
                f"cannot read {tensor.name} from {path} ({first_line(exc)})"
            ) from exc
        weights[match["stage"]] = torch.from_numpy(values.copy())
    if config.stages and not weights:
        raise CrossStitchError(
            f"{path} does not hold its unit weights as initializers named "
            "cross_stitch.<stage>.weight (the TorchScript-based exporter folds them into the "
            "graph); inspect the checkpoint it was exported from"
        )
    return config, weights


def load(path: Path, threads: int | None = None) -> Artifact:
    """An onnxruntime session on the CPU provider, wrapped to take and give tensors.

    All graph optimisations are on; ``threads`` sets the intra-op pool (default: onnxruntime's,
    one per physical core). Idle pool threads do not spin, so they take no CPU from torch code
    that runs between sessions (verification, benchmarks).
    """
    _, config, export = _read(path)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise CrossStitchError(f"onnxruntime cannot load {path} ({first_line(exc)})") from exc
    names = [o.name for o in session.get_outputs()]

    def run(x: Tensor) -> dict[str, Tensor]:
        outputs = session.run(names, {INPUT_NAME: x.numpy()})
        return {name: torch.from_numpy(out) for name, out in zip(names, outputs, strict=True)}

    return Artifact(config, export, run)
