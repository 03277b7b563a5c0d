"""The ``crossstitch`` commands. Each one parses its options, calls the library, renders.

torch is imported inside the commands that need it, so ``--help``, ``list`` and usage errors
answer quickly.
"""

from __future__ import annotations

import math
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

import crossstitch
from crossstitch.errors import CrossStitchError
from crossstitch.exporters.errors import ExportFailed
from crossstitch.stages import arch_spec, architectures, check_fixed_size

from . import render
from .argv import expand_multi_values, split_commas


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
    except NoArgsIsHelpError as exc:
        exc.show()
        return exc.exit_code
    except UsageError as exc:
        hint = f"Try '{exc.ctx.command_path} --help' for help." if exc.ctx else None
        render.error(_usage_message(exc), hint)
        return exc.exit_code
    except ClickException as exc:
        render.error(exc.format_message())
        return exc.exit_code
    except CrossStitchError as exc:
        if debug:
            traceback.print_exc()
        render.error(str(exc))
        return 2
    except ExportFailed as exc:
        if debug:
            traceback.print_exc()
        render.error(str(exc), "Rerun with --debug for the exporter's log and traceback.")
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        render.error(
            f"{type(exc).__name__}: {exc}".splitlines()[0],
            "This is a failure inside crossstitch or a library; rerun with --debug for details.",
        )
        return 1
    return result if isinstance(result, int) else 0


def _usage_message(exc: UsageError) -> str:
    """Typer's message, with the value that failed to convert when Typer knows it."""
    message = exc.format_message()
    errors = getattr(exc.__cause__, "errors", None)
    inputs = [e["input"] for e in errors() if "input" in e] if callable(errors) else []
    return f"{message.rstrip('.')} (got {inputs[0]!r})" if inputs else message


app = typer.Typer(
    cls=CrossStitchGroup,
    name="crossstitch",
    help="Build, inspect, verify and export cross-stitch multi-task networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print a machine-readable result on stdout, nothing else.")
]
AtolOption = Annotated[float | None, typer.Option(help="Absolute tolerance [default: per format].")]
RtolOption = Annotated[float | None, typer.Option(help="Relative tolerance [default: per format].")]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks and library warnings on failure.")
]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"crossstitch {crossstitch.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Build, inspect, verify and export cross-stitch multi-task networks."""


def _input_size(values: list[int]) -> tuple[int, int]:
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        given = " ".join(map(str, values))
        raise CrossStitchError(
            f"--input-size takes one or two positive integers (SIZE or HEIGHT WIDTH), got {given}"
        )
    return (values[0], values[-1])


MAX_SEED = 2**63 - 1
DEFAULT_SIZE = 224
BENCH_SIZE = 128


def _seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise CrossStitchError(f"--seed must be between 0 and {MAX_SEED}, got {value}")
    return value


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
        if not channels.isdigit() or int(channels) < 1:
            raise CrossStitchError(
                f"--head {task}={channels}: CHANNELS must be a positive integer, got '{channels}'"
            )
    return {task: int(channels) for task, channels in heads.items()}


@app.command()
def build(
    arch: Annotated[
        str,
        typer.Argument(
            metavar="ARCH", help="torchvision architecture, e.g. resnet18 (see `crossstitch list`)."
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
            help="torchvision weights for every task: DEFAULT, IMAGENET1K_V1, ... or none."
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
            help="Initial weight of the other tasks' features [default: (1-alpha)/(T-1)]."
        ),
    ] = None,
    granularity: Annotated[
        str, typer.Option(help="channel (one weight per channel) or layer (one per task pair).")
    ] = "channel",
    stages: Annotated[
        list[str] | None,
        typer.Option(help="Stages to stitch after: all, or names such as layer1,layer3."),
    ] = None,
    output_stride: Annotated[
        int,
        typer.Option(
            help="Total stride of the last stage: 32, or 16 or 8 by dilating the last stages "
            "(ResNet family only)."
        ),
    ] = 32,
    features: Annotated[
        str,
        typer.Option(
            help="Outputs: last (each task's last stage or head) or all (every stitched stage, "
            "named TASK.STAGE, plus each head)."
        ),
    ] = "last",
    input_size: Annotated[
        list[int] | None,
        typer.Option(
            metavar="SIZE|H W",
            help="Input size for the summary's feature sizes [default: 224, or the size a "
            "fixed-size model takes].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = 0,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Checkpoint file to write.")
    ] = Path("crossstitch.pt"),
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Build a cross-stitch network, print its stages and save the checkpoint."""
    from crossstitch.files import check_output_path

    check_output_path(output)
    size = _input_size(input_size) if input_size else None
    seed = _seed(seed)
    spec = arch_spec(arch)
    if size and weights == "none":
        check_fixed_size(spec.name, spec.input_size, size, "--input-size")

    import torch

    from crossstitch.checkpoint import save
    from crossstitch.summary import summarize

    stitched = split_commas(stages or ["all"])
    options = dict(
        tasks=split_commas(tasks),
        weights=weights,
        alpha=alpha,
        beta=beta,
        granularity=granularity,
        stages=stitched,
        task_weights=_task_pairs("--task-weights", "PATH", task_weights or []),
        weights_file=str(weights_file) if weights_file else None,
        heads=_heads(head or []),
        output_stride=output_stride,
        features=features,
    )
    torch.manual_seed(seed)
    with render.working(f"Building {spec.name}", quiet=json_output):
        model = crossstitch.CrossStitchBackbone.from_torchvision(spec.name, **options)
        model.config["seed"] = seed
        size = size or (model.input_size or DEFAULT_SIZE,) * 2
        model.check_input_size(size)
        summary = summarize(model, size)
        save(model, output)
    if json_output:
        render.emit_json({"output": str(output), "config": model.config, "summary": summary})
    else:
        render.build_summary(summary, str(output), seed)


FORMAT_CHOICES = ("onnx", "torchscript", "pt2", "all")


def _tolerance(name: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise CrossStitchError(f"--{name} must be a finite number >= 0, got {value}")
    return value


def _formats(value: str) -> list[str]:
    if value not in FORMAT_CHOICES:
        raise CrossStitchError(f"unknown format '{value}'; use one of: {', '.join(FORMAT_CHOICES)}")
    return list(FORMAT_CHOICES[:-1]) if value == "all" else [value]


@app.command()
def export(
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript, pt2 or all.")],
    model_path: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint to export.")] = Path(
        "crossstitch.pt"
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
        typer.Option(help="ONNX opset [default: the newest the installed onnxruntime runs]."),
    ] = None,
    static: Annotated[
        bool, typer.Option("--static", help="Fix batch, height and width to the export input.")
    ] = False,
    input_size: Annotated[
        list[int] | None,
        typer.Option(
            metavar="SIZE|H W",
            help="Example input size for the export [default: 224, or the size a fixed-size "
            "model takes].",
        ),
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip verifying the artifact with its runtime.")
    ] = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    keep_failed: Annotated[
        bool, typer.Option("--keep-failed", help="Write the artifact even if verification fails.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the verification inputs.")] = 0,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Export a checkpoint to ONNX, TorchScript and/or pt2, verifying each artifact."""
    formats = _formats(fmt)
    size = _input_size(input_size) if input_size else None
    seed = _seed(seed)
    atol, rtol = _tolerance("atol", atol), _tolerance("rtol", rtol)

    from crossstitch.checkpoint import load
    from crossstitch.exporters import onnx
    from crossstitch.exporters.common import ExportOptions
    from crossstitch.exporters.formats import FORMATS, default_path
    from crossstitch.exporters.pipeline import export_verified
    from crossstitch.files import check_output_path

    if opset is not None and not onnx.MIN_OPSET <= opset <= onnx.newest_opset():
        raise CrossStitchError(
            f"--opset {opset} is not supported; use {onnx.MIN_OPSET} to {onnx.newest_opset()}"
        )
    if fmt == "all" and output is not None:
        destinations = {f: output.with_name(output.name + FORMATS[f].SUFFIX) for f in formats}
    else:
        destinations = {f: output or default_path(model_path, f) for f in formats}
    for destination in destinations.values():
        check_output_path(destination)
    with render.working(f"Loading {model_path}", quiet=json_output):
        model = load(model_path)
    size = size or (model.input_size or DEFAULT_SIZE,) * 2
    model.check_input_size(size)
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


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A checkpoint or an exported artifact.")] = Path(
        "crossstitch.pt"
    ),
    against: Annotated[
        str | None,
        typer.Option(
            help="reference (for a checkpoint) or the checkpoint an artifact came from "
            "[default: reference for a checkpoint, crossstitch.pt for an artifact]."
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="Batch size of the inputs [default: 3].")
    ] = None,
    input_size: Annotated[
        list[int] | None,
        typer.Option(metavar="SIZE|H W", help="Input size [default: export size + (32, 64)]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs (reported).")] = 0,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Check a checkpoint against the reference, or an artifact against its checkpoint."""
    if batch is not None and batch < 1:
        raise CrossStitchError(f"--batch must be a positive integer, got {batch}")
    size = _input_size(input_size) if input_size else None
    seed = _seed(seed)
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
    from crossstitch.summary import activation_bytes

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
                "(--against PATH, default crossstitch.pt)"
            )
        checkpoint = Path(against or "crossstitch.pt")
        module = FORMATS[kind]
        with render.working(f"Loading {path} and {checkpoint}", quiet=json_output):
            artifact = module.load(path)
            model = load(checkpoint)
        inputs = verification_inputs(artifact.config, seed)
        if size:
            check_artifact_size(artifact.config, path, size)
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


@app.command()
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
            "[default: crossstitch.pt when no ARCH is given].",
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 4,
    input_size: Annotated[
        list[int] | None,
        typer.Option(
            metavar="SIZE|H W",
            help="Input size [default: 128, or the size a fixed-size model takes].",
        ),
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed calls per variant.")] = 10,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch and onnxruntime [default: torch's].")
    ] = None,
    training: Annotated[
        bool, typer.Option("--training/--no-training", help="Also time a training step.")
    ] = True,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Time the model against its bare backbones and its exported artifacts."""
    size = _input_size(input_size) if input_size else None
    for name, value in (("batch", batch), ("runs", runs), ("threads", threads)):
        if value is not None and value < 1:
            raise CrossStitchError(f"--{name} must be a positive integer, got {value}")
    if arch is not None and model_path is not None:
        raise CrossStitchError("give either ARCH (with --tasks) or --model, not both")
    if arch is None and tasks:
        raise CrossStitchError("--tasks needs ARCH: crossstitch bench resnet50 --tasks seg depth")
    spec = arch_spec(arch) if arch is not None else None
    if spec is not None and not tasks:
        raise CrossStitchError(f"name the tasks: crossstitch bench {arch} --tasks seg depth")

    import torch

    from crossstitch.checkpoint import load
    from crossstitch.exporters.bench import artifacts_beside, run_bench

    if spec is not None:
        torch.manual_seed(0)
        with render.working(f"Building {spec.name}", quiet=json_output):
            model = crossstitch.CrossStitchBackbone.from_torchvision(spec.name, split_commas(tasks))
        artifacts = {}
    else:
        model_path = model_path or Path("crossstitch.pt")
        with render.working(f"Loading {model_path}", quiet=json_output):
            model = load(model_path)
        artifacts = artifacts_beside(model_path)
    size = size or (model.input_size or BENCH_SIZE,) * 2
    model.check_input_size(size)
    with render.working("Timing", quiet=json_output):
        result = run_bench(
            model,
            batch,
            size,
            runs,
            threads or torch.get_num_threads(),
            artifacts=artifacts,
            training=training,
        )
    if json_output:
        render.emit_json(render.bench_payload(result))
    else:
        render.bench_table(result)


@app.command(name="inspect")
def inspect_model(
    path: Annotated[
        Path, typer.Argument(help="A checkpoint or an ONNX file exported by crossstitch.")
    ] = Path("crossstitch.pt"),
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Show a model's config, stages and what its cross-stitch units hold.

    For each stitched stage: the TxT matrix of unit weights A_ij (row i: the receiving task,
    column j: the source task, in task order) averaged over channels, with its min and max over
    channels, and the sharing score of each row: the sum over j != i of |A_ij| divided by the
    sum over all j of |A_ij|, with |A_ij| summed over channels.
    """
    from crossstitch.exporters import onnx
    from crossstitch.exporters.formats import CHECKPOINT, detect
    from crossstitch.inspection import describe, inspect_checkpoint

    kind = detect(path)
    if kind == CHECKPOINT:
        report = inspect_checkpoint(path)
    elif kind == onnx.NAME:
        config, weights = onnx.read_unit_weights(path)
        report = describe(config, weights, path)
    else:
        raise CrossStitchError(
            f"{path} is a {kind} artifact; inspect reads checkpoints and ONNX files: "
            "inspect the checkpoint it was exported from"
        )
    if json_output:
        render.emit_json({"path": str(path), "format": kind, **vars(report)})
    else:
        render.inspection(str(path), kind, report)


@app.command(name="list")
def list_architectures(json_output: JsonOption = False) -> None:
    """List the supported architectures with their stages and pretrained weights."""
    specs = list(architectures().values())
    if json_output:
        render.emit_json(specs)
    else:
        render.arch_table(specs)


def main() -> None:
    """Console-script entry point."""
    app()
