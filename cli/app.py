"""The ``crossstitch`` commands. Each one parses its options, calls the library, renders.

torch is imported inside the commands that need it, so ``--help``, ``list`` and usage errors
answer quickly.
"""

from __future__ import annotations

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
from crossstitch.stages import arch_spec, architectures

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
        render.error(exc.format_message(), hint)
        return exc.exit_code
    except ClickException as exc:
        render.error(exc.format_message())
        return exc.exit_code
    except CrossStitchError as exc:
        if debug:
            traceback.print_exc()
        render.error(str(exc))
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        render.error(
            f"{type(exc).__name__}: {exc}".splitlines()[0],
            "This is a failure inside crossstitch or a library; rerun with --debug for details.",
        )
        return 1
    return result if isinstance(result, int) else 0


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


def _task_weights(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise CrossStitchError(f"--task-weights takes TASK=PATH, got '{value}'")
        if task in pairs:
            raise CrossStitchError(f"--task-weights gives task '{task}' twice")
        pairs[task] = path
    return pairs


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
    input_size: Annotated[
        list[int] | None,
        typer.Option(metavar="SIZE|H W", help="Input size for the summary's feature sizes."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = 0,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Checkpoint file to write.")
    ] = Path("crossstitch.pt"),
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Build a cross-stitch network, print its stages and save the checkpoint."""
    from crossstitch.checkpoint import save
    from crossstitch.files import check_output_path
    from crossstitch.summary import summarize

    check_output_path(output)
    size = _input_size(input_size or [224])
    spec = arch_spec(arch)
    stitched = split_commas(stages or ["all"])
    options = dict(
        tasks=split_commas(tasks),
        weights=weights,
        alpha=alpha,
        beta=beta,
        granularity=granularity,
        stages=stitched,
        task_weights=_task_weights(task_weights or []),
        weights_file=str(weights_file) if weights_file else None,
    )
    import torch

    torch.manual_seed(seed)
    with render.working(f"Building {spec.name}", quiet=json_output):
        model = crossstitch.CrossStitchBackbone.from_torchvision(spec.name, **options)
        model.config["seed"] = seed
        summary = summarize(model, size)
        save(model, output)
    if json_output:
        render.emit_json({"output": str(output), "config": model.config, "summary": summary})
    else:
        render.build_summary(summary, str(output), seed)


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
