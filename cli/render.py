"""Rich rendering of command results, and the JSON form of the same results."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.table import Table

from crossstitch.stages import ArchSpec

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def error(message: str, hint: str | None = None) -> None:
    """One ``Error:`` line on stderr, and an optional hint line under it."""
    stderr.print(f"[bold red]Error:[/] {message}", markup=True, soft_wrap=True)
    if hint:
        stderr.print(hint, markup=False, soft_wrap=True)


def emit_json(payload: Any) -> None:
    """The machine-readable result: JSON on stdout and nothing else there."""
    sys.stdout.write(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


@contextmanager
def working(message: str, quiet: bool) -> Iterator[None]:
    """A spinner on stderr while a long step runs, on a terminal only."""
    show = not quiet and stderr.is_terminal
    with stderr.status(message) if show else nullcontext():
        yield


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f} M" if count >= 10_000 else f"{count:,}"


def build_summary(summary: Any, output: str, seed: int) -> None:
    """The stage table and totals printed by ``crossstitch build``."""
    height, width = summary.input_size
    table = Table(
        title=f"{summary.arch} × {len(summary.tasks)} tasks, input {height}×{width}",
        title_justify="left",
    )
    table.add_column("stage")
    table.add_column("channels", justify="right")
    table.add_column("reduction", justify="right")
    table.add_column("features", justify="right")
    table.add_column("params / task", justify="right")
    table.add_column("cross-stitch params", justify="right")
    table.add_row("stem", "", "", "", _millions(summary.stem_params_per_task), "-", style="dim")
    for row in summary.stages:
        stitch = f"{row.stitch_params:,}" if row.stitch_params else "not stitched"
        h, w = row.feature_size
        table.add_row(
            row.name,
            str(row.channels),
            f"/{row.reduction}",
            f"{h}×{w}",
            _millions(row.params_per_task),
            stitch,
        )
    stdout.print(table)
    stdout.print(
        f"[bold]parameters[/]  {_millions(summary.params_per_task)} per task backbone, "
        f"{_millions(summary.total_params)} in total"
    )
    stdout.print(f"[bold]stitching[/]   {summary.stitch_params:,} parameters added")
    stdout.print(f"[bold]size[/]        {summary.float32_mb:,.1f} MB in float32")
    stdout.print(f"[bold]tasks[/]       {', '.join(summary.tasks)}")
    stdout.print(
        f"[bold]init[/]        alpha={summary.alpha:g}, beta={summary.beta:g}, "
        f"granularity={summary.granularity}, seed={seed}"
    )
    stdout.print(f"[bold]wrote[/]       [green]{output}[/]")


def _stage_names(names: list[str]) -> str:
    """``layer1 layer2 layer3 layer4`` -> ``layer1-4`` where names are numbered in order."""
    prefix = names[0].rstrip("0123456789")
    if len(names) > 2 and names == [f"{prefix}{i}" for i in range(1, len(names) + 1)]:
        return f"{prefix}1-{len(names)}"
    return " ".join(names)


def arch_table(specs: list[ArchSpec]) -> None:
    """The supported architectures, as ``crossstitch list`` shows them."""
    table = Table(title="Supported architectures", title_justify="left")
    table.add_column("architecture", no_wrap=True)
    table.add_column("family")
    table.add_column("stages")
    table.add_column("channels/reduction per stage")
    table.add_column("weights")
    for spec in specs:
        table.add_row(
            spec.name,
            spec.family,
            _stage_names([s.name for s in spec.stages]),
            " ".join(f"{s.channels}/{s.reduction}" for s in spec.stages),
            " ".join(spec.weights),
        )
    stdout.print(table)
