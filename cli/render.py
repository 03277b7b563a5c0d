"""Rich rendering of command results, and the JSON form of the same results."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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
    sys.stdout.write(json.dumps(_plain(payload), indent=2, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    """Dataclasses, paths and tuples as JSON values; NaN and infinities (no JSON value) as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
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
    fixed = " (the only size it takes)" if summary.fixed_input else ""
    table = Table(
        title=f"{summary.arch} × {len(summary.tasks)} tasks, input {height}×{width}{fixed}",
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
    has_heads = any(row.head for row in summary.outputs)
    if has_heads or summary.features == "all":
        stdout.print(_outputs_table(summary.outputs))
    heads = f"{_millions(summary.head_params)} in heads, " if has_heads else ""
    stdout.print(
        f"[bold]parameters[/]  {_millions(summary.params_per_task)} per task backbone, "
        f"{heads}{_millions(summary.total_params)} in total"
    )
    stdout.print(f"[bold]stitching[/]   {summary.stitch_params:,} parameters added")
    stdout.print(
        f"[bold]memory[/]      {summary.float32_mb:,.1f} MB of float32 weights; a training step "
        f"keeps about {summary.training_mb_per_image:,.0f} MB of activations per image"
    )
    stdout.print(f"[bold]tasks[/]       {', '.join(summary.tasks)}")
    stdout.print(
        f"[bold]init[/]        alpha={summary.alpha:g}, beta={summary.beta:g}, "
        f"granularity={summary.granularity}, seed={seed}"
    )
    stdout.print(
        f"[bold]outputs[/]     {', '.join(row.name for row in summary.outputs)} "
        f"(features={summary.features}, output stride {summary.output_stride})"
    )
    stdout.print(f"[bold]wrote[/]       [green]{output}[/]")


def _outputs_table(outputs: list) -> Table:
    """Per output: its head, the head's parameters and the shape of one image's output."""
    table = Table(title="Outputs per image", title_justify="left")
    table.add_column("output")
    table.add_column("head")
    table.add_column("head params", justify="right")
    table.add_column("shape", justify="right")
    for row in outputs:
        table.add_row(
            row.name,
            row.head or "none (features)",
            _millions(row.head_params) if row.head else "-",
            "×".join(map(str, row.shape)),
        )
    return table


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
    table.add_column("input")
    table.add_column("weights")
    for spec in specs:
        table.add_row(
            spec.name,
            spec.family,
            _stage_names([s.name for s in spec.stages]),
            " ".join(f"{s.channels}/{s.reduction}" for s in spec.stages),
            f"{spec.input_size} only" if spec.input_size else f">= {spec.min_size}",
            " ".join(spec.weights),
        )
    stdout.print(table)


def _verdict(passed: bool) -> str:
    return "[bold green]PASS[/]" if passed else "[bold red]FAIL[/]"


def _error(value: float) -> str:
    return "-" if value != value else f"{value:.3g}"


def _inputs(inputs: Any) -> str:
    return f"inputs {inputs.batch}×3×{inputs.height}×{inputs.width}, seed {inputs.seed}"


def comparison_table(title: str, comparison: Any) -> Table:
    """Per output: shape, error statistics, tolerance and verdict (as polygraphy reports them)."""
    table = Table(title=title, title_justify="left")
    for column in ("output", "shape", "max abs err", "mean abs err", "max rel err"):
        text = column in ("output", "shape")
        table.add_column(column, justify="left" if text else "right", no_wrap=text)
    table.add_column("tolerance", justify="right")
    table.add_column("result")
    for row in comparison.outputs:
        shape = "×".join(map(str, row.shape)) if row.shape else "-"
        if row.problem:
            expected = "×".join(map(str, row.expected_shape or ())) or "-"
            shape = f"{shape} ({row.problem}, expected {expected})"
        table.add_row(
            row.name,
            shape,
            _error(row.max_abs_error),
            _error(row.mean_abs_error),
            _error(row.max_rel_error),
            _error(row.tolerance),
            _verdict(row.passed),
        )
    return table


def comparison_report(title: str, inputs: Any, comparison: Any) -> None:
    """``crossstitch verify`` of an artifact."""
    stdout.print(comparison_table(title, comparison))
    stdout.print(
        f"{_inputs(inputs)}; PASS when max abs err <= atol + rtol × max|expected| "
        f"(atol {comparison.atol:g}, rtol {comparison.rtol:g})"
    )
    stdout.print(_verdict(comparison.passed))


def parity_report(path: Any, inputs: Any, results: list) -> None:
    """``crossstitch verify`` of a checkpoint against the reference formulation."""
    table = Table(title=f"{path} against the reference formulation", title_justify="left")
    for column in ("output", "shape", "max abs err", "mean abs err", "tolerance", "result"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.task,
            "×".join(map(str, r.shape)),
            _error(r.max_abs_error),
            _error(r.mean_abs_error),
            "bit-exact",
            _verdict(r.passed),
        )
    stdout.print(table)
    stdout.print(_inputs(inputs))
    stdout.print(_verdict(all(r.passed for r in results)))


def export_results(results: list, debug: bool) -> None:
    """``crossstitch export``: one row per artifact, then each verification's details."""
    table = Table(title="Exported artifacts", title_justify="left")
    for column in ("format", "file", "how", "size", "export", "verification"):
        table.add_column(column, no_wrap=column != "how")
    for r in results:
        how = r.details.get("exporter") or r.details.get("method") or "torch.export"
        if "opset" in r.details:
            how = f"{how}, opset {r.details['opset']}"
        if r.details.get("external_data"):
            how += ", external data"
        if r.comparison is None:
            verdict = "not verified"
        else:
            verdict = _verdict(r.passed) + ("" if r.written else " (not written)")
        table.add_row(
            r.format,
            str(r.path),
            how,
            f"{r.size_bytes / 1e6:.1f} MB",
            f"{r.seconds:.1f} s",
            verdict,
        )
    stdout.print(table)
    for r in results:
        if r.comparison is not None:
            stdout.print(comparison_table(f"{r.format}: {_inputs(r.inputs)}", r.comparison))
        if debug and r.details.get("log"):
            stderr.print(r.details["log"], markup=False)


def bench_payload(result: Any) -> dict:
    """The benchmark as JSON: the setting, then per variant its statistics and raw times."""
    payload = _plain(result)
    for timing, plain in zip(result.timings, payload["timings"], strict=True):
        plain.update(median=timing.median, min=timing.min, max=timing.max)
    return payload


def bench_table(result: Any) -> None:
    """``crossstitch bench``: medians, spread, ratio to the bare backbones, peak memory."""
    height, width = result.input_size
    table = Table(
        title=f"{result.arch or 'model'} × {len(result.tasks)} tasks, batch {result.batch}, "
        f"{height}×{width}, {result.threads} threads, {result.runs} runs",
        title_justify="left",
    )
    for column in ("mode", "variant", "median ms", "min ms", "max ms", "vs bare", "peak MB"):
        table.add_column(column, justify="left" if column in ("mode", "variant") else "right")
    for t in result.timings:
        table.add_row(
            t.mode,
            t.name,
            f"{t.median * 1e3:.1f}",
            f"{t.min * 1e3:.1f}",
            f"{t.max * 1e3:.1f}",
            f"{t.ratio:.3f}x",
            "-" if t.peak_mb is None else f"+{t.peak_mb:.0f}",
        )
    stdout.print(table)
    stdout.print(
        "vs bare: median time over that of the same backbones run stage by stage without "
        "stitching. peak MB: most tensor memory torch held during one call (not measured "
        "inside onnxruntime)."
    )
    stdout.print(f"cross-stitch units: {result.unit_kernel}.")


NEUTRAL, POSITIVE, NEGATIVE = (48, 48, 48), (31, 119, 180), (214, 39, 40)


def _heat(value: float, scale: float) -> str:
    """Cell style: blue for positive, red for negative, deeper the larger ``|value| / scale``."""
    if not math.isfinite(value) or scale == 0:
        return "bold"
    strength = min(abs(value) / scale, 1.0)
    target = POSITIVE if value >= 0 else NEGATIVE
    r, g, b = (round(n + (t - n) * strength) for n, t in zip(NEUTRAL, target, strict=True))
    return f"bold white on rgb({r},{g},{b})"


def _share(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1%}"


def _heads(heads: dict) -> str:
    if not heads:
        return "none: every task returns its last-stage features"
    return ", ".join(
        f"{task} → {channels} channel{'s' if channels > 1 else ''}"
        for task, channels in heads.items()
    )


def heatmap(stage: str, tasks: list[str], unit: Any) -> Table:
    """One unit's TxT matrix: rows receive, columns give; cells coloured by their mean."""
    per = f", {unit.channels} channels" if unit.channels else ""
    table = Table(title=escape(f"{stage}: A[to, from]{per}"), title_justify="left")
    table.add_column("to \\ from", style="bold")
    for task in tasks:
        table.add_column(task, justify="center")
    table.add_column("sharing", justify="right")
    finite = [abs(v) for row in unit.matrix for v in row if math.isfinite(v)]
    scale = max(finite, default=0.0)
    for i, task in enumerate(tasks):
        cells = []
        for j in range(len(tasks)):
            text = f"{unit.matrix[i][j]:.3f}"
            if unit.channels:
                text += f"\n{unit.min[i][j]:.3f} … {unit.max[i][j]:.3f}"
            cells.append(Text(text, style=_heat(unit.matrix[i][j], scale), justify="center"))
        table.add_row(task, *cells, _share(unit.sharing[i]))
    return table


def inspection(path: str, kind: str, report: Any) -> None:
    """``crossstitch inspect``: the config, the stage table, then one heatmap per unit."""
    config = report.config
    stdout.print(f"[bold]{escape(path)}[/] ({kind}): {config['arch']} × {len(report.tasks)} tasks")
    stdout.print(f"[bold]tasks[/]        {', '.join(report.tasks)}")
    stdout.print(
        f"[bold]init[/]         alpha={config['alpha']:g}, beta={config['beta']:g}, "
        f"granularity={config['granularity']}"
    )
    stdout.print(f"[bold]heads[/]        {_heads(config.get('heads', {}))}")
    stdout.print(
        f"[bold]outputs[/]      features={config.get('features', 'last')}, "
        f"output stride {config.get('output_stride', 32)}"
    )
    table = Table(title="Stages", title_justify="left")
    for column in ("stage", "channels", "reduction", "unit", "sharing per task"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in report.stage_table:
        unit = report.stages.get(row.name)
        table.add_row(
            row.name,
            str(row.channels),
            f"/{row.reduction}",
            "×".join(map(str, row.unit_shape)) if row.stitched else "not stitched",
            " ".join(_share(s) for s in unit.sharing) if unit else "-",
            style=None if row.stitched else "dim",
        )
    stdout.print(table)
    for stage, unit in report.stages.items():
        stdout.print(heatmap(stage, report.tasks, unit))
    channel = config["granularity"] == "channel"
    cells = "the mean over channels, min … max under it" if channel else "the weight"
    stdout.print(
        f"cells: {cells}; colour: blue > 0, red < 0, deeper for a larger magnitude; "
        "sharing: the part of row i's weight magnitude (sum of |A| over channels) that "
        "comes from other tasks"
    )
