"""The ``crossstitch`` commands. Each one parses its options, calls the library, renders.

torch is imported inside the commands that need it, so ``--help``, ``list`` and usage errors
answer quickly.
"""

from __future__ import annotations

import errno
import inspect
import math
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

import crossstitch
from crossstitch.config import MAX_CHANNELS, MAX_INPUT_SIZE, MAX_SEED
from crossstitch.errors import CrossStitchError, first_line
from crossstitch.exporters.errors import ExportFailed
from crossstitch.stages import arch_spec, architectures, check_fixed_size
from crossstitch.timm_backbones import timm_name

from . import render
from .argv import expand_multi_values, split_commas
from .typer_adapter import usage_error

# The command-line option behind each library parameter, for error messages.
OPTIONS = {
    "arch": "ARCH",
    "tasks": "--tasks",
    "alpha": "--alpha",
    "beta": "--beta",
    "granularity": "--granularity",
    "stages": "--stages",
    "heads": "--head",
    "output_stride": "--output-stride",
    "features": "--features",
    "weights": "--weights",
    "weights_file": "--weights-file",
    "task_weights": "--task-weights",
    "input_size": "--input-size",
    "seed": "--seed",
    "pattern": "PATTERN",
}
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
# The exit code Typer returns for Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


class CrossStitchGroup(TyperGroup):
    """Typer's group with this tool's conventions for arguments, errors and exit codes.

    Bad usage and bad input exit 2 with one ``Error:`` line; any other failure exits 1;
    ``--debug`` shows tracebacks and library warnings, which are hidden otherwise.
    """

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            code = _run(super().main, expand_multi_values(args), prog_name, debug, **extra)
        sys.exit(code)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run(main: Any, args: list[str], prog_name: str | None, debug: bool, **extra: Any) -> int:
    try:
        result = main(args, prog_name or "crossstitch", standalone_mode=False, **extra)
    except CrossStitchError as exc:
        if debug:
            traceback.print_exc()
        render.error(library_message(exc))
        return 2
    except ExportFailed as exc:
        if debug:
            traceback.print_exc()
        render.error(str(exc), "Rerun with --debug for the exporter's log and traceback.")
        return 1
    except OSError as exc:
        if debug:
            traceback.print_exc()
        if exc.errno in WRITE_FAILURES:
            render.error(
                f"writing failed: {exc.strerror or exc}; every file written before is untouched "
                "and no partial file was left"
            )
            return 1
        render.error(f"{exc.strerror or first_line(exc)}: {exc.filename or ''}".rstrip(": "))
        return 2
    except Exception as exc:
        problem = usage_error(exc)
        if problem is not None:
            greedy = greedy_tasks(args) if "'ARCH'" in problem.message else None
            render.error(greedy or problem.message, problem.hint)
            return problem.exit_code
        if debug:
            traceback.print_exc()
        render.error(
            f"{type(exc).__name__}: {first_line(exc)}",
            "This is a failure inside crossstitch or a library; rerun with --debug for details.",
        )
        return 1
    if result == INTERRUPTED:
        render.error("interrupted; files written before are untouched, nothing partial was left")
    return result if isinstance(result, int) else 0


def greedy_tasks(args: list[str]) -> str | None:
    """The message for ``build --tasks a b resnet18``: ``--tasks`` took the architecture."""
    named = any(a.split("=", 1)[0] in ("--tasks", "-t") for a in args)
    if len(args) < 2 or args[0] not in ("build", "bench") or not named:
        return None
    archs = [a for a in args[1:] if a in architectures() or a.startswith("timm/")]
    if not archs or args[1] == archs[0]:
        return None
    tasks = [a for a in dict.fromkeys(args[1:]) if not a.startswith("-") and a not in archs]
    return (
        f"--tasks took {archs[0]!r} as a task name, so ARCH is missing; put the architecture "
        f"first: crossstitch {args[0]} {archs[0]} --tasks {' '.join(tasks)}"
    )


def library_message(exc: CrossStitchError) -> str:
    """The library's message with its parameter replaced by the option that sets it."""
    param = (exc.param or "").split("[", 1)[0]
    option = OPTIONS.get(param)
    if option is None:
        return str(exc)
    return f"{option}{exc.param[len(param) :]}: {exc.detail}"


app = typer.Typer(
    cls=CrossStitchGroup,
    name="crossstitch",
    help="Build, inspect, verify and export cross-stitch multi-task networks.",
    invoke_without_command=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command whose help is its docstring, paragraphs rewrapped to the terminal.

    Typer keeps the single line breaks of every paragraph after the first, which cuts lines
    mid-sentence in narrow terminals; joining them lets Rich wrap the text.
    """

    def register(function: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(function.__doc__ or "").split("\n\n")
        text = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        return app.command(name, help=text)(function)

    return register


class Format(str, Enum):
    """The export formats, and all of them."""

    onnx = "onnx"
    torchscript = "torchscript"
    pt2 = "pt2"
    all = "all"


class Granularity(str, Enum):
    """One unit weight per channel, or one per task pair."""

    channel = "channel"
    layer = "layer"


class Features(str, Enum):
    """Each task's last output, or every stitched stage's features too."""

    last = "last"
    all = "all"


class OutputStride(str, Enum):
    """The total stride of the last stage."""

    s32 = "32"
    s16 = "16"
    s8 = "8"


class Runtime(str, Enum):
    """What runs a model: eager PyTorch for a checkpoint, an artifact's own runtime otherwise."""

    eager = "eager"
    onnx = "onnx"
    pt2 = "pt2"
    torchscript = "torchscript"


FLAG = ""  # the metavar of a flag: it takes no value
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", metavar=FLAG, help="Print a machine-readable result on stdout, nothing else."
    ),
]
AtolOption = Annotated[
    float | None,
    typer.Option(min=0.0, show_default="per format", help="Absolute tolerance."),
]
RtolOption = Annotated[
    float | None,
    typer.Option(min=0.0, show_default="per format", help="Relative tolerance."),
]
DebugOption = Annotated[
    bool,
    typer.Option("--debug", metavar=FLAG, help="Show tracebacks and library warnings on failure."),
]


def size_option(what: str, default: str) -> Any:
    """The ``--input-size`` option of a command: one or two sizes in range, ``what`` they size."""
    return typer.Option(
        metavar="SIZE|H W",
        min=1,
        max=MAX_INPUT_SIZE,
        show_default=default,
        help=f"{what}: SIZE, or HEIGHT WIDTH, from 1 to {MAX_INPUT_SIZE}.",
    )


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"crossstitch {crossstitch.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Build, inspect, verify and export cross-stitch multi-task networks."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _input_size(values: list[int]) -> tuple[int, int]:
    """``(height, width)`` from one or two sizes; their range is the option's (``size_option``)."""
    if len(values) not in (1, 2):
        given = " ".join(map(str, values))
        raise CrossStitchError(
            f"--input-size takes one or two sizes (SIZE or HEIGHT WIDTH), got {given}"
        )
    return (values[0], values[-1])


DEFAULT_SIZE = 224
# ``list --timm`` describes each model by building it on the meta device: about 0.1 s each.
TIMM_LIST_LIMIT = 30
BENCH_SIZE = 128


def _task_pairs(option: str, metavar: str, values: list[str]) -> dict[str, str]:
    """``TASK=VALUE`` items of a repeatable option, each task at most once."""
    pairs: dict[str, str] = {}
    for item in values:
        task, sep, value = item.partition("=")
        if not sep or not task or not value:
            raise CrossStitchError(f"{option} takes TASK={metavar}, got '{item}'")
        if task in pairs:
            raise CrossStitchError(f"{option} gives task '{task}' twice")
        pairs[task] = value
    return pairs


def _heads(values: list[str]) -> dict[str, int]:
    heads = _task_pairs("--head", "CHANNELS", values)
    for task, channels in heads.items():
        if not channels.isdigit() or not 1 <= int(channels) <= MAX_CHANNELS:
            raise CrossStitchError(
                f"--head {task}={channels}: CHANNELS must be an integer from 1 to {MAX_CHANNELS}, "
                f"got '{channels}'"
            )
    return {task: int(channels) for task, channels in heads.items()}


def _timm_pretrained(weights: str) -> bool:
    """``--weights`` for a timm model: pretrained (timm's download) or none."""
    if weights.lower() not in ("pretrained", "none"):
        raise CrossStitchError(
            f"--weights: a timm model takes pretrained or none, got {weights!r} (a state_dict "
            "file: --weights-file PATH)"
        )
    return weights.lower() == "pretrained"


@command()
def build(
    arch: Annotated[
        str,
        typer.Argument(
            metavar="ARCH",
            help="torchvision architecture, e.g. resnet18 (see `crossstitch list`), or timm/NAME "
            "(see `crossstitch list --timm`).",
        ),
    ],
    tasks: Annotated[
        list[str],
        typer.Option(
            "--tasks",
            "-t",
            help="Task names: `--tasks seg depth`, `--tasks seg,depth` or repeated.",
        ),
    ],
    weights: Annotated[
        str,
        typer.Option(
            help="torchvision weights for every task: DEFAULT, IMAGENET1K_V1, ... (see "
            "`crossstitch list`) or none; for timm/NAME: pretrained (timm's download) or none."
        ),
    ] = "none",
    weights_file: Annotated[
        Path | None,
        typer.Option(help="A classifier state_dict file used for every task instead of --weights."),
    ] = None,
    task_weights: Annotated[
        list[str] | None,
        typer.Option(
            "--task-weights",
            metavar="TASK=PATH",
            help="A single-task classifier state_dict for one task; repeatable.",
        ),
    ] = None,
    head: Annotated[
        list[str] | None,
        typer.Option(
            "--head",
            metavar="TASK=CHANNELS",
            help="A dense head for one task: its output is CHANNELS maps at the input size; "
            "repeatable. Tasks without one return their last-stage features.",
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Initial weight of a task's own features.")] = 0.9,
    beta: Annotated[
        float | None,
        typer.Option(
            show_default="(1-alpha)/(T-1)", help="Initial weight of the other tasks' features."
        ),
    ] = None,
    granularity: Annotated[
        Granularity,
        typer.Option(help="One unit weight per channel, or one per task pair."),
    ] = Granularity.channel,
    stages: Annotated[
        list[str] | None,
        typer.Option(
            show_default="all", help="Stages to stitch after: all, or names such as layer1,layer3."
        ),
    ] = None,
    output_stride: Annotated[
        OutputStride,
        typer.Option(
            help="Total stride of the last stage: 16 or 8 dilate the last stages (ResNet family "
            "only)."
        ),
    ] = OutputStride.s32,
    features: Annotated[
        Features,
        typer.Option(
            help="Outputs: each task's last stage or head, or all: every stitched stage, named "
            "TASK.STAGE, plus each head."
        ),
    ] = Features.last,
    checkpoint_stages: Annotated[
        bool,
        typer.Option(
            "--checkpoint-stages",
            metavar=FLAG,
            help="Recompute each task's stages in backward instead of keeping their activations: "
            "less training memory for more time (see `crossstitch bench`).",
        ),
    ] = False,
    input_size: Annotated[
        list[int] | None,
        size_option(
            "Input size for the summary's feature sizes",
            default="224, or the size a fixed-size model takes",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Random seed for the initial weights.")
    ] = 0,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Checkpoint file to write: NAME.safetensors, or NAME.pt for torch.save format.",
        ),
    ] = Path("crossstitch.safetensors"),
    force: Annotated[
        bool,
        typer.Option(
            "--force", metavar=FLAG, help="Replace the checkpoint if it exists (atomically)."
        ),
    ] = False,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Build a cross-stitch network, print its stages and save the checkpoint."""
    from crossstitch.files import check_output_path

    pairs = _task_pairs("--task-weights", "PATH", task_weights or [])
    reads = [p for p in (weights_file, *pairs.values()) if p]
    check_output_path(output, reads=reads)
    if weights_file is not None and weights.lower() != "none":
        raise CrossStitchError("give either --weights or --weights-file, not both")
    size = _input_size(input_size) if input_size else None
    timm_model = timm_name(arch)
    spec = arch_spec(arch) if timm_model is None else None
    if spec is not None and size and weights == "none":
        check_fixed_size(spec.name, spec.input_size, size)
    if timm_model is not None and output_stride is not OutputStride.s32:
        raise CrossStitchError(
            "--output-stride: timm models are built at their own total stride (32); dilation "
            "applies to torchvision ResNets only"
        )

    import dataclasses

    import torch

    from crossstitch.backbone import build as build_model
    from crossstitch.backbone import torchvision_config
    from crossstitch.checkpoint import save, uses_torch_save
    from crossstitch.memory import check_build
    from crossstitch.summary import summarize
    from crossstitch.timm_backbones import timm_config

    options: dict[str, Any] = dict(
        tasks=split_commas(tasks),
        alpha=alpha,
        beta=beta,
        granularity=granularity.value,
        stages=split_commas(stages or ["all"]),
        task_weights=pairs,
        heads=_heads(head or []),
        features=features.value,
        checkpoint_stages=checkpoint_stages,
    )
    if spec is not None:
        config = torchvision_config(
            spec.name,
            weights=weights_file or weights,
            output_stride=int(output_stride.value),
            **options,
        )
    else:
        config = timm_config(
            timm_model, pretrained=_timm_pretrained(weights), weights_file=weights_file, **options
        )
    if output.exists() and not force:
        raise CrossStitchError(f"{output} exists; pass --force to replace it, or choose -o PATH")
    uses_torch_save(output)
    check_build(config)
    torch.manual_seed(seed)
    with render.working(f"Building {arch}", quiet=json_output):
        model = build_model(config)
        model.config = dataclasses.replace(model.config, seed=seed)
        size = size or (model.input_size or DEFAULT_SIZE,) * 2
        model.check_input_size(size)
        summary = summarize(model, size)
        save(model, output)
    if json_output:
        render.emit_json(
            {"output": str(output), "config": model.config.to_dict(), "summary": summary}
        )
    else:
        render.build_summary(summary, str(output))


def _tolerance(name: str, value: float | None) -> float | None:
    """``min=0`` lets NaN and infinity through (they compare false); refuse them here."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise CrossStitchError(f"--{name} must be a finite number >= 0, got {value}")
    return value


def _formats(fmt: Format) -> list[str]:
    return [f.value for f in Format if f is not Format.all] if fmt is Format.all else [fmt.value]


@command()
def export(
    fmt: Annotated[
        Format,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="onnx, torchscript, pt2, or all for the three.",
        ),
    ],
    model_path: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint to export.")] = Path(
        "crossstitch.safetensors"
    ),
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Artifact file; with --format all, the path before each format's suffix. "
            "[default: beside the model, e.g. crossstitch.onnx]",
        ),
    ] = None,
    opset: Annotated[
        int | None,
        typer.Option(
            show_default="the newest the installed onnxruntime runs",
            help="ONNX opset, at least 18.",
        ),
    ] = None,
    static: Annotated[
        bool,
        typer.Option(
            "--static", metavar=FLAG, help="Fix batch, height and width to the export input."
        ),
    ] = False,
    input_size: Annotated[
        list[int] | None,
        size_option(
            "Example input size for the export", default="224, or the size a fixed-size model takes"
        ),
    ] = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify", metavar=FLAG, help="Skip verifying the artifact with its runtime."
        ),
    ] = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    keep_failed: Annotated[
        bool,
        typer.Option(
            "--keep-failed", metavar=FLAG, help="Write the artifact even if verification fails."
        ),
    ] = False,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the verification inputs.")
    ] = 0,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Export a checkpoint to ONNX, TorchScript and/or pt2, verifying each artifact."""
    formats = _formats(fmt)
    size = _input_size(input_size) if input_size else None
    atol, rtol = _tolerance("atol", atol), _tolerance("rtol", rtol)

    from crossstitch.checkpoint import load
    from crossstitch.exporters import onnx
    from crossstitch.exporters.common import ExportOptions
    from crossstitch.exporters.formats import FORMATS, default_path
    from crossstitch.exporters.pipeline import export_verified
    from crossstitch.files import check_output_path
    from crossstitch.summary import probe_or_refuse

    if opset is not None and not onnx.MIN_OPSET <= opset <= onnx.newest_opset():
        raise CrossStitchError(
            f"--opset {opset} is not supported; use {onnx.MIN_OPSET} to {onnx.newest_opset()}"
        )
    if fmt is Format.all and output is not None:
        destinations = {f: output.with_name(output.name + FORMATS[f].SUFFIX) for f in formats}
    else:
        destinations = {f: output or default_path(model_path, f) for f in formats}
    for destination in destinations.values():
        check_output_path(destination, reads=[model_path])
    with render.working(f"Loading {model_path}", quiet=json_output):
        model = load(model_path)
    size = size or (model.input_size or DEFAULT_SIZE,) * 2
    model.check_input_size(size)
    probe_or_refuse(model, size)
    results = []
    for name, destination in destinations.items():
        with render.working(f"Exporting {name} to {destination}", quiet=json_output):
            results.append(
                export_verified(
                    model,
                    name,
                    destination,
                    size,
                    ExportOptions(dynamic=not static, opset=opset),
                    verify=not no_verify,
                    atol=atol,
                    rtol=rtol,
                    seed=seed,
                    keep_failed=keep_failed,
                )
            )
    if json_output:
        render.emit_json({"model": str(model_path), "artifacts": results})
    else:
        render.export_results(results, debug)
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@command()
def verify(
    path: Annotated[Path, typer.Argument(help="A checkpoint or an exported artifact.")] = Path(
        "crossstitch.safetensors"
    ),
    against: Annotated[
        str | None,
        typer.Option(
            help="reference (for a checkpoint) or the checkpoint an artifact came from "
            "[default: reference for a checkpoint, crossstitch.safetensors for an artifact]."
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            min=1, show_default="3, or one more than the export's", help="Batch size of the inputs."
        ),
    ] = None,
    input_size: Annotated[
        list[int] | None,
        size_option("Input size", default="256 288; for an artifact its export size + (32, 64)"),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the random inputs (reported).")
    ] = 0,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Check a checkpoint against the reference, or an artifact against its checkpoint."""
    size = _input_size(input_size) if input_size else None
    atol, rtol = _tolerance("atol", atol), _tolerance("rtol", rtol)

    from crossstitch.checkpoint import load
    from crossstitch.exporters.formats import CHECKPOINT, FORMATS, detect
    from crossstitch.exporters.pipeline import (
        Inputs,
        check_artifact_size,
        compare_artifact,
        verification_inputs,
    )
    from crossstitch.memory import check_fits
    from crossstitch.reference import check_parity
    from crossstitch.summary import activation_bytes, probe_or_refuse

    kind = detect(path)
    if kind == CHECKPOINT:
        if against not in (None, "reference"):
            raise CrossStitchError(
                f"{path} is a checkpoint: it is verified against the reference formulation "
                "(--against reference); compare artifacts with a checkpoint instead"
            )
        with render.working(f"Loading {path}", quiet=json_output):
            model = load(path)
        if size:
            model.check_input_size(size)
        height, width = size or ((model.input_size,) * 2 if model.input_size else (256, 288))
        inputs = Inputs(batch or 3, height, width, seed)
        probe_or_refuse(model, (height, width))
        check_fits(
            2 * activation_bytes(model, inputs.batch, (height, width), training=False),
            f"verifying on a {inputs.batch}x3x{height}x{width} input",
        )
        with render.working("Comparing with the reference formulation", quiet=json_output):
            results = check_parity(model, inputs.tensor())
        passed = all(r.passed for r in results)
        if json_output:
            render.emit_json(
                {
                    "path": str(path),
                    "against": "reference",
                    "inputs": inputs,
                    "passed": passed,
                    "outputs": results,
                }
            )
        else:
            render.parity_report(path, inputs, results)
    else:
        if against == "reference":
            raise CrossStitchError(
                f"{path} is a {kind} artifact: it is verified against the checkpoint it came from "
                "(--against PATH, default crossstitch.safetensors)"
            )
        checkpoint = Path(against or "crossstitch.safetensors")
        module = FORMATS[kind]
        with render.working(f"Loading {path} and {checkpoint}", quiet=json_output):
            artifact = module.load(path)
            model = load(checkpoint)
        inputs = verification_inputs(artifact.export, seed)
        if size:
            check_artifact_size(artifact, path, size)
        if batch or size:
            height, width = size or (inputs.height, inputs.width)
            inputs = Inputs(batch or inputs.batch, height, width, seed)
        with render.working(f"Running {path} with its runtime", quiet=json_output):
            comparison = compare_artifact(
                artifact,
                path,
                model,
                inputs,
                module.ATOL if atol is None else atol,
                module.RTOL if rtol is None else rtol,
            )
        passed = comparison.passed
        if json_output:
            render.emit_json(
                {
                    "path": str(path),
                    "format": kind,
                    "against": str(checkpoint),
                    "inputs": inputs,
                    "passed": passed,
                    "comparison": comparison,
                }
            )
        else:
            render.comparison_report(f"{path} ({kind}) against {checkpoint}", inputs, comparison)
    if not passed:
        raise typer.Exit(1)


@command()
def bench(
    arch: Annotated[
        str | None,
        typer.Argument(metavar="[ARCH]", help="Build this architecture in memory (with --tasks)."),
    ] = None,
    tasks: Annotated[
        list[str] | None, typer.Option("--tasks", "-t", help="Task names, with ARCH.")
    ] = None,
    model_path: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Checkpoint to time, with the artifacts exported beside it "
            "[default: crossstitch.safetensors when no ARCH is given].",
        ),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 4,
    input_size: Annotated[
        list[int] | None,
        size_option("Input size", default="128, or the size a fixed-size model takes"),
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed calls per variant.")] = 10,
    threads: Annotated[
        int | None,
        typer.Option(min=1, show_default="torch's", help="CPU threads for torch and onnxruntime."),
    ] = None,
    training: Annotated[
        bool, typer.Option("--training/--no-training", help="Also time a training step.")
    ] = True,
    compiled: Annotated[
        bool,
        typer.Option(
            "--compile",
            metavar=FLAG,
            help="Also time the model and the bare backbones under torch.compile(fullgraph=True); "
            "compile times are reported apart.",
        ),
    ] = False,
    checkpoint_stages: Annotated[
        bool,
        typer.Option(
            "--checkpoint-stages",
            metavar=FLAG,
            help="Also time the training step with stage checkpointing, against the step "
            "without it: peak memory and time (always, for a model built with it).",
        ),
    ] = False,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Time the model against its bare backbones and its exported artifacts."""
    size = _input_size(input_size) if input_size else None
    if arch is not None and model_path is not None:
        raise CrossStitchError("give either ARCH (with --tasks) or --model, not both")
    if arch is None and tasks:
        raise CrossStitchError("--tasks needs ARCH: crossstitch bench resnet50 --tasks seg depth")
    timm_model = timm_name(arch) if arch is not None else None
    spec = arch_spec(arch) if arch is not None and timm_model is None else None
    if arch is not None and not tasks:
        raise CrossStitchError(f"name the tasks: crossstitch bench {arch} --tasks seg depth")

    import torch

    from crossstitch.backbone import build as build_model
    from crossstitch.backbone import torchvision_config
    from crossstitch.checkpoint import load
    from crossstitch.exporters.bench import artifacts_beside, run_bench
    from crossstitch.memory import check_build
    from crossstitch.summary import probe_or_refuse
    from crossstitch.timm_backbones import timm_config

    if arch is not None:
        if spec is not None:
            config = torchvision_config(spec.name, tasks=split_commas(tasks))
        else:
            config = timm_config(timm_model, tasks=split_commas(tasks))
        check_build(config)
        torch.manual_seed(0)
        with render.working(f"Building {arch}", quiet=json_output):
            model = build_model(config)
        artifacts, skipped = {}, []
    else:
        model_path = model_path or Path("crossstitch.safetensors")
        with render.working(f"Loading {model_path}", quiet=json_output):
            model = load(model_path)
        artifacts, skipped = artifacts_beside(model, model_path, threads or torch.get_num_threads())
    size = size or (model.input_size or BENCH_SIZE,) * 2
    model.check_input_size(size)
    probe_or_refuse(model, size)
    rounds = f"{runs} rounds, inference{' and training' if training else ''}"
    with render.working(f"Timing {rounds}", quiet=json_output):
        result = run_bench(
            model,
            batch,
            size,
            runs,
            threads or torch.get_num_threads(),
            artifacts=artifacts,
            training=training,
            compiled=compiled,
            checkpointing=checkpoint_stages,
        )
    if json_output:
        render.emit_json({**render.bench_payload(result), "skipped_artifacts": skipped})
    else:
        render.bench_table(result, skipped)


@command()
def predict(
    images: Annotated[
        list[Path],
        typer.Argument(
            metavar="IMAGE",
            help="PNG, JPEG or WebP files, or folders of them (not searched recursively).",
        ),
    ],
    model_path: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="A checkpoint or an exported artifact (recognised by content)."
        ),
    ] = Path("crossstitch.safetensors"),
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Folder for each image's .npy and .png per output (created)."
        ),
    ] = Path("predictions"),
    runtime: Annotated[
        Runtime | None,
        typer.Option(show_default="the one --model's contents call for", help="Runtime to use."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 8,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            metavar=FLAG,
            help="Also run the checkpoint (--against) in eager PyTorch on the same images and "
            "compare each output with the artifact's, by verify's rule.",
        ),
    ] = False,
    against: Annotated[
        Path,
        typer.Option(help="The checkpoint the artifact came from, for --compare."),
    ] = Path("crossstitch.safetensors"),
    atol: AtolOption = None,
    rtol: RtolOption = None,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Run a model or an exported artifact on images and write its outputs as .npy and .png.

    Images are converted to RGB and transformed as the model records (resize, crop, mean,
    std). Per image and output: the raw tensor as .npy, and a picture: a class map with a legend
    for a head of several channels, a coloured map with its range for one channel, the first
    three principal components as RGB for features. Exit code 2 when an image was skipped (the
    others are still written), 1 when --compare fails.
    """
    atol, rtol = _tolerance("atol", atol), _tolerance("rtol", rtol)

    import torch

    from crossstitch.exporters import predict as predicting
    from crossstitch.files import check_output_folder
    from crossstitch.images import batches, find_images, output_stems

    check_output_folder(output)
    paths = find_images(images)
    folder = output.resolve()
    for path in paths:
        if folder in path.resolve().parents:
            raise CrossStitchError(
                f"image {path} lies in the output folder {output}; its outputs could replace "
                "it: write elsewhere with -o"
            )
    with render.working(f"Loading {model_path}", quiet=json_output):
        runner = predicting.open_runner(model_path, runtime.value if runtime else None)
        reference = predicting.reference_runner(runner, against) if compare else None
    transform = runner.config.preprocess
    predicting.check_size(runner, transform.crop, min(batch, len(paths)))
    stems = output_stems(paths)
    rows, skipped, comparisons = [], [], []
    for start, (loaded, missed) in zip(
        range(0, len(paths), batch), batches(paths, transform, batch), strict=True
    ):
        skipped += missed
        if not loaded:
            continue
        end = min(start + batch, len(paths))
        with render.working(f"Predicting images {start + 1}-{end} of {len(paths)}", json_output):
            x = torch.stack([image.input for image in loaded])
            outputs = predicting.run_batch(runner, x)
            if reference is not None:
                want = predicting.run_batch(reference, x)
                comparisons.append(predicting.compare(runner, outputs, want, atol, rtol))
            rows += predicting.write_outputs(runner, loaded, outputs, output, stems)
    if not rows:
        for item in skipped:
            render.error(f"{item.path} skipped: {item.reason}")
        raise CrossStitchError("no image could be used; nothing was written")
    comparison = predicting.merge(comparisons) if comparisons else None
    if json_output:
        render.emit_json(
            {
                "model": str(model_path),
                "runtime": runner.runtime,
                "preprocess": transform.to_dict(),
                "output": str(output),
                "predictions": rows,
                "skipped": [{"image": str(s.path), "reason": s.reason} for s in skipped],
                "against": str(against) if comparison else None,
                "passed": comparison.passed if comparison else None,
                "comparison": comparison,
            }
        )
    else:
        render.prediction_report(
            str(model_path), runner.runtime, transform, rows, str(output), comparison, str(against)
        )
    for item in skipped:
        render.error(f"{item.path} skipped: {item.reason}")
    if skipped:
        raise typer.Exit(2)
    if comparison is not None and not comparison.passed:
        raise typer.Exit(1)


@command(name="inspect")
def inspect_model(
    path: Annotated[
        Path, typer.Argument(help="A checkpoint or an ONNX file exported by crossstitch.")
    ] = Path("crossstitch.safetensors"),
    png: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Also write each stitched stage's unit as STAGE.png in DIR (created): the TxT "
            "means, and the min and max over channels (rows receive, columns give).",
        ),
    ] = None,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Show a model's config, input transform, stages and what its units hold.

    For each stitched stage: the TxT matrix of unit weights A_ij (row i: the receiving task,
    column j: the source task, in task order) averaged over channels, with its min and max over
    channels, and the sharing score of each row: the sum over j != i of |A_ij| divided by the
    sum over all j of |A_ij|, with |A_ij| summed over channels.
    """
    from crossstitch.exporters import onnx
    from crossstitch.exporters.formats import CHECKPOINT, detect
    from crossstitch.files import check_output_folder
    from crossstitch.inspection import describe, inspect_checkpoint
    from crossstitch.visualize import write_unit_pictures

    if png is not None:
        check_output_folder(png)
    kind = detect(path)
    if kind == CHECKPOINT:
        report = inspect_checkpoint(path)
    elif kind == onnx.NAME:
        report = describe(*onnx.read_unit_weights(path), path)
    else:
        raise CrossStitchError(
            f"{path} is a {kind} artifact; inspect reads checkpoints and ONNX files: "
            "inspect the checkpoint it was exported from"
        )
    pictures = write_unit_pictures(report, png) if png is not None else []
    if json_output:
        pngs = {"png": [str(p) for p in pictures]} if png is not None else {}
        render.emit_json({"path": str(path), "format": kind, **vars(report), **pngs})
    else:
        render.inspection(str(path), kind, report)
        if pictures:
            render.wrote(pictures)


@command(name="list")
def list_architectures(
    pattern: Annotated[
        str | None,
        typer.Argument(
            metavar="[PATTERN]",
            show_default="all",
            help="With --timm: timm model names matching this pattern, e.g. 'convnext*'.",
        ),
    ] = None,
    timm: Annotated[
        bool,
        typer.Option(
            "--timm",
            metavar=FLAG,
            help="List timm models (timm/NAME) with their stages, or why one cannot be stitched.",
        ),
    ] = False,
    limit: Annotated[
        int, typer.Option(min=1, help="With --timm: the most matching models to describe.")
    ] = TIMM_LIST_LIMIT,
    json_output: JsonOption = False,
) -> None:
    """List the supported architectures with their stages and pretrained weights."""
    if not timm:
        if pattern is not None:
            raise CrossStitchError(
                f"PATTERN lists timm models: crossstitch list --timm {pattern!r}; "
                "`crossstitch list` shows every torchvision architecture"
            )
        specs = list(architectures().values())
        if json_output:
            render.emit_json(specs)
        else:
            render.arch_table(specs)
        return
    from crossstitch.timm_backbones import describe, matching

    names = matching(pattern or "*")
    shown = names[:limit]
    with render.working(f"Reading the stages of {len(shown)} timm models", quiet=json_output):
        listed = [describe(name) for name in shown]
    if json_output:
        render.emit_json({"pattern": pattern or "*", "matches": len(names), "models": listed})
    else:
        render.timm_table(listed, len(names))


def main() -> None:
    """Console-script entry point."""
    app()
