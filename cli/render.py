"""Rich rendering of command results, and the JSON form of the same results.

Text that comes from users or files (task names, paths, config strings, exception texts) is
data: it is put into ``Text`` objects, never parsed as markup, and its control characters are
shown as ``\\xNN`` escapes, so it cannot restyle the output, make links or move the cursor.
Where the output's encoding is not UTF, symbols fall back to ASCII.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CONTROL
from crossstitch.stages import ArchSpec

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def unicode_output() -> bool:
    """Whether standard output can encode the tables' symbols."""
    return stdout.encoding.lower().replace("-", "").startswith("utf")


def sym(fancy: str, plain: str) -> str:
    """``fancy`` where the output encodes it, ``plain`` otherwise."""
    return fancy if unicode_output() else plain


def clean(value: Any) -> str:
    """``value`` as text with its control characters escaped."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def cell(value: Any, style: str | None = None, justify: str | None = None) -> Text:
    """User or file text for a table cell or a line: shown as it is, never as markup."""
    return Text(clean(value), style=style or "", justify=justify)


def line(*parts: tuple[str, str] | str | Text) -> Text:
    """A line from plain parts, ``(text, style)`` pairs and ``Text``; every part is data."""
    out = Text()
    for part in parts:
        if isinstance(part, Text):
            out.append_text(part)
        elif isinstance(part, tuple):
            out.append(clean(part[0]), style=part[1])
        else:
            out.append(clean(part))
    return out


Cell = Text | str


def grid(
    title: str,
    columns: list[tuple[str, str]],
    rows: list[list[Cell]],
    styles: list[str | None] | None = None,
) -> RenderableType:
    """A table that never cuts a value, whatever the width: cells wrap between words, and
    where even the longest words of every column do not fit side by side, each row becomes a
    block of ``header: value`` lines instead. ``columns`` are ``(header, justify)`` pairs.
    """
    table = Table(title=cell(title), title_justify="left")
    for header, justify in columns:
        table.add_column(header, justify=justify, overflow="fold")
    for index, row in enumerate(rows):
        table.add_row(*row, style=(styles or [None] * len(rows))[index])
    if _renders_whole(table, [[h for h, _ in columns], *rows]):
        return table
    lines = Text(clean(title), style="bold")
    for row in rows:
        for position, ((header, _), value) in enumerate(zip(columns, row, strict=True)):
            style = value.style if isinstance(value, Text) else ""
            value = Text(" ".join(str(value).splitlines()), style=style)
            indent = "" if position == 0 else "  "
            lines.append(f"\n{indent}{header}: ")
            lines.append_text(value)
    return lines


def _renders_whole(table: Table, rows: list[list[Cell]]) -> bool:
    """Whether ``table`` at the output's width shows every word of every cell unbroken."""
    probe = Console(width=stdout.width, file=io.StringIO(), color_system=None, highlight=False)
    with probe.capture() as captured:
        probe.print(table)
    shown = set(captured.get().split())
    return all(word in shown for row in rows for value in row for word in str(value).split())


def error(message: str, hint: str | None = None) -> None:
    """One ``Error:`` line on stderr, and an optional hint line under it."""
    stderr.print(line(("Error:", "bold red"), " ", message), soft_wrap=True)
    if hint:
        stderr.print(cell(hint), soft_wrap=True)


def emit_json(payload: Any) -> None:
    """The machine-readable result: JSON on stdout and nothing else there (ASCII-escaped)."""
    sys.stdout.write(json.dumps(_plain(payload), indent=2, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    """Dataclasses, paths and tuples as JSON values; NaN and infinities (no JSON value) as null."""
    if isinstance(value, CrossStitchConfig):
        return value.to_dict()
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


PROGRESS_END = " ..."


@contextmanager
def working(message: str, quiet: bool) -> Iterator[None]:
    """Say that a long step runs: a spinner on a terminal, else one line on stderr ending in
    ``PROGRESS_END``, so a log never shows a long silence. ``quiet`` (``--json``) says nothing.
    """
    if not quiet and not stderr.is_terminal:
        stderr.print(line(message, PROGRESS_END), soft_wrap=True)
    show = not quiet and stderr.is_terminal
    with stderr.status(cell(message)) if show else nullcontext():
        yield


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f} M" if count >= 10_000 else f"{count:,}"


def _size(dims: Any) -> str:
    return sym("×", "x").join(map(str, dims))


def _field(label: str, *value: tuple[str, str] | str | Text) -> Text:
    """A ``label  value`` line of a summary, the label bold and padded."""
    return line((f"{label:<12}", "bold"), *value)


def build_summary(summary: Any, output: str) -> None:
    """The stage table and totals printed by ``crossstitch build``."""
    config = summary.config
    height, width = summary.input_size
    fixed = " (the only size it takes)" if config.input_size else ""
    title = (
        f"{config.model_name} {sym('×', 'x')} {len(config.tasks)} tasks, input "
        f"{_size((height, width))}{fixed}"
    )
    columns = [("stage", "left"), ("channels", "right"), ("reduction", "right")]
    columns += [("features", "right"), ("params / task", "right"), ("cross-stitch params", "right")]
    rows: list[list[Cell]] = [["stem", "", "", "", _millions(summary.stem_params_per_task), "-"]]
    for stage in summary.stages:
        stitch = summary.unit_params.get(stage.name)
        rows.append(
            [
                cell(stage.name),
                str(stage.channels),
                f"/{stage.reduction}",
                _size(summary.feature_sizes[stage.name]),
                _millions(summary.stage_params[stage.name]),
                f"{stitch:,}" if stitch else "not stitched",
            ]
        )
    stdout.print(grid(title, columns, rows, ["dim"] + [None] * len(summary.stages)))
    has_heads = any(row.head for row in summary.outputs)
    if has_heads or config.features == "all":
        stdout.print(_outputs_table(summary.outputs))
    heads = f"{_millions(summary.head_params)} in heads, " if has_heads else ""
    stdout.print(
        _field(
            "parameters",
            f"{_millions(summary.params_per_task)} per task backbone, {heads}"
            f"{_millions(summary.total_params)} in total",
        )
    )
    stdout.print(_field("stitching", f"{summary.stitch_params:,} parameters added"))
    stdout.print(
        _field(
            "memory",
            f"{summary.float32_mb:,.1f} MB of float32 weights; a training step keeps about "
            f"{summary.training_mb_per_image:,.0f} MB of activations per image",
        )
    )
    stdout.print(_field("tasks", ", ".join(config.tasks)))
    stdout.print(
        _field(
            "init",
            f"alpha={config.alpha:g}, beta={config.beta:g}, granularity={config.granularity}, "
            f"seed={config.seed}",
        )
    )
    weights = _weights(config)
    if weights:
        stdout.print(_field("weights", weights))
    stdout.print(
        _field(
            "outputs",
            f"{', '.join(row.name for row in summary.outputs)} (features={config.features}, "
            f"output stride {config.output_stride})",
        )
    )
    if config.checkpoint_stages:
        stdout.print(_field("training", CHECKPOINTING))
    stdout.print(_field("wrote", (output, "green")))


CHECKPOINTING = "stage checkpointing: stages recomputed in backward, not kept"


def _weights(config: CrossStitchConfig) -> str:
    """Where the task backbones' weights came from, when not from random init."""
    parts = []
    if config.weights:
        parts.append(f"{config.weights} ({config.source}) for every task")
    if config.weights_file:
        parts.append(f"{config.weights_file} for every task")
    parts += [f"{path} for {task}" for task, path in config.task_weights]
    return "; ".join(parts)


def _outputs_table(outputs: list) -> RenderableType:
    """Per output: its head, the head's parameters and the shape of one image's output."""
    columns = [("output", "left"), ("head", "left"), ("head params", "right"), ("shape", "right")]
    rows: list[list[Cell]] = [
        [
            cell(row.name),
            cell(row.head or "none (features)"),
            _millions(row.head_params) if row.head else "-",
            _size(row.shape),
        ]
        for row in outputs
    ]
    return grid("Outputs per image", columns, rows)


def _stage_names(names: list[str]) -> str:
    """``layer1 layer2 layer3 layer4`` -> ``layer1-4`` where names are numbered in order."""
    prefix = names[0].rstrip("0123456789")
    if len(names) > 2 and names == [f"{prefix}{i}" for i in range(1, len(names) + 1)]:
        return f"{prefix}1-{len(names)}"
    return " ".join(names)


def arch_table(specs: list[ArchSpec]) -> None:
    """The supported architectures, as ``crossstitch list`` shows them."""
    columns = [("architecture", "left"), ("family", "left"), ("stages", "left")]
    columns += [("channels/reduction per stage", "left"), ("input", "left"), ("weights", "left")]
    rows: list[list[Cell]] = [
        [
            spec.name,
            spec.family,
            _stage_names([s.name for s in spec.stages]),
            " ".join(f"{s.channels}/{s.reduction}" for s in spec.stages),
            f"{spec.input_size} only" if spec.input_size else f">= {spec.min_size}",
            " ".join(spec.weights),
        ]
        for spec in specs
    ]
    stdout.print(grid("Supported architectures", columns, rows))


def timm_table(listed: list, matches: int) -> None:
    """timm models as ``crossstitch list --timm`` shows them, with a note when it stopped short."""
    columns = [("timm model", "left"), ("family", "left"), ("stages", "left")]
    columns += [("channels/reduction per stage", "left"), ("input", "left")]
    rows: list[list[Cell]] = [
        [
            f"timm/{item.name}",
            item.family or "-",
            _stage_names([s.name for s in item.stages]) if item.refused is None else "refused",
            " ".join(f"{s.channels}/{s.reduction}" for s in item.stages) or item.refused,
            f"{item.input_size} only"
            if item.input_size
            else "any"
            if item.refused is None
            else "-",
        ]
        for item in listed
    ]
    stdout.print(grid("timm models", columns, rows))
    if matches > len(listed):
        stdout.print(
            line(
                f"Showing {len(listed)} of {matches} matching models; narrow PATTERN or raise "
                "--limit."
            )
        )


def _verdict(passed: bool) -> Text:
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def _error(value: float) -> str:
    return "-" if value != value else f"{value:.3g}"


def _inputs(inputs: Any) -> str:
    return f"inputs {_size((inputs.batch, 3, inputs.height, inputs.width))}, seed {inputs.seed}"


def comparison_table(title: str, comparison: Any) -> RenderableType:
    """Per output: shape, the largest error, the error allowed, and the verdict.

    The rule is polygraphy's, in the table's own terms: PASS when ``max abs err <= allowed``
    (``allowed = atol + rtol * max|expected|``) and every value is finite. The elementwise
    relative error decides nothing and is left to ``--json``.
    """
    columns = [("output", "left"), ("shape", "left"), ("max abs err", "right")]
    columns += [("allowed", "right"), ("result", "left")]
    rows: list[list[Cell]] = []
    for row in comparison.outputs:
        shape = _size(row.shape) if row.shape else "-"
        if row.problem:
            expected = _size(row.expected_shape or ()) or "-"
            shape = f"{shape} ({row.problem}, expected {expected})"
        rows.append(
            [
                cell(row.name),
                cell(shape),
                _error(row.max_abs_error),
                _error(row.tolerance),
                _verdict(row.passed),
            ]
        )
    return grid(title, columns, rows)


def rule(comparison: Any) -> str:
    """The footnote under every comparison table, in ``export`` and ``verify`` alike."""
    return (
        f"allowed = atol + rtol {sym('×', '*')} max|expected| (atol {comparison.atol:g}, rtol "
        f"{comparison.rtol:g}); PASS when max abs err <= allowed and every value is finite. "
        "Mean and elementwise relative errors: --json."
    )


def comparison_report(title: str, inputs: Any, comparison: Any) -> None:
    """``crossstitch verify`` of an artifact."""
    stdout.print(comparison_table(title, comparison))
    stdout.print(f"{_inputs(inputs)}. {rule(comparison)}", markup=False)
    stdout.print(_verdict(comparison.passed))


def parity_report(path: Any, inputs: Any, results: list) -> None:
    """``crossstitch verify`` of a checkpoint against the reference formulation."""
    columns = [("output", "left"), ("shape", "left"), ("max abs err", "right")]
    columns += [("rule", "left"), ("result", "left")]
    rows: list[list[Cell]] = [
        [cell(r.task), _size(r.shape), _error(r.max_abs_error), "bit-exact", _verdict(r.passed)]
        for r in results
    ]
    stdout.print(grid(f"{path} against the reference formulation", columns, rows))
    for problem in dict.fromkeys(r.problem for r in results if r.problem):
        stdout.print(line(("FAIL:", "bold red"), " ", problem))
    stdout.print(
        f"{_inputs(inputs)}. PASS when every output equals the reference bit for bit and every "
        "value is finite.",
        markup=False,
    )
    stdout.print(_verdict(all(r.passed for r in results)))


def export_results(results: list, debug: bool) -> None:
    """``crossstitch export``: one row per artifact, then each verification's details."""
    columns = [("format", "left"), ("file", "left"), ("how", "left"), ("size", "right")]
    columns += [("export", "right"), ("verification", "left")]
    rows: list[list[Cell]] = []
    for r in results:
        how = r.details.get("exporter") or r.details.get("method") or "torch.export"
        if "opset" in r.details:
            how = f"{how}, opset {r.details['opset']}"
        if r.details.get("external_data"):
            how += ", external data"
        if r.comparison is None:
            verdict = Text("not verified")
        else:
            verdict = _verdict(r.passed)
            if not r.written:
                verdict.append(" (not written)")
        rows.append(
            [
                r.format,
                cell(r.path),
                cell(how),
                f"{r.size_bytes / 1e6:.1f} MB",
                f"{r.seconds:.1f} s",
                verdict,
            ]
        )
    stdout.print(grid("Exported artifacts", columns, rows))
    compared = [r for r in results if r.comparison is not None]
    for r in compared:
        stdout.print(comparison_table(f"{r.format}: {_inputs(r.inputs)}", r.comparison))
    if compared:
        stdout.print(rule(compared[0].comparison), markup=False)
    for r in results:
        if debug and r.details.get("log"):
            stderr.print(cell(r.details["log"]))


def bench_payload(result: Any) -> dict:
    """The benchmark as JSON: the setting, then per variant its statistics and raw times."""
    payload = _plain(result)
    for timing, plain in zip(result.timings, payload["timings"], strict=True):
        plain.update(median=timing.median, min=timing.min, max=timing.max)
    return payload


def bench_table(result: Any, skipped: list[str]) -> None:
    """``crossstitch bench``: medians, spread, ratio to the bare backbones, peak memory."""
    height, width = result.input_size
    title = (
        f"{result.arch or 'model'} {sym('×', 'x')} {len(result.tasks)} tasks, batch "
        f"{result.batch}, {_size((height, width))}, {result.threads} threads, {result.runs} runs"
    )
    columns = [("mode", "left"), ("variant", "left")]
    columns += [(name, "right") for name in ("median ms", "min ms", "max ms", "vs bare", "peak MB")]
    rows: list[list[Cell]] = [
        [
            t.mode,
            t.name,
            f"{t.median * 1e3:.1f}",
            f"{t.min * 1e3:.1f}",
            f"{t.max * 1e3:.1f}",
            f"{t.ratio:.3f}x",
            "-" if t.peak_mb is None else f"+{t.peak_mb:.0f}",
        ]
        for t in result.timings
    ]
    stdout.print(grid(title, columns, rows))
    stdout.print(
        "vs bare: median time over that of the same backbones run stage by stage without "
        "stitching (compiled variants: over the compiled bare backbones). peak MB: most tensor "
        "memory torch held during one call (not measured inside onnxruntime).",
        markup=False,
    )
    for t in result.timings:
        if t.compile_seconds is not None:
            stdout.print(f"compile time, {t.mode}, {t.name}: {t.compile_seconds:.1f} s")
    if result.checkpointing:
        stdout.print(
            "stage checkpointing, training step: "
            f"{result.checkpointing['memory_ratio']:.2f}x the peak memory and "
            f"{result.checkpointing['time_ratio']:.2f}x the median time of cross-stitch "
            "without it.",
            markup=False,
        )
    for warning in result.warnings:
        stdout.print(line(("Warning:", "bold yellow"), " ", warning))
    for reason in skipped:
        stdout.print(line("not timed: ", reason))


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


def _preprocess(preprocess: Any) -> None:
    """The input transform in three summary lines: resize and crop, mean and std, its source."""
    lines = [
        f"resize {preprocess.resize} ({preprocess.interpolation}), center crop {preprocess.crop}",
        f"mean {', '.join(map(str, preprocess.mean))}; std "
        f"{', '.join(map(str, preprocess.std))} (R, G, B)",
        f"from {preprocess.source}",
    ]
    for label, text in zip(("preprocess", "", ""), lines, strict=True):
        stdout.print(_field(label, text))


def _heads(heads: dict) -> str:
    if not heads:
        return "none: every task returns its last-stage features"
    arrow = sym("→", "->")
    return ", ".join(
        f"{task} {arrow} {channels} channel{'s' if channels > 1 else ''}"
        for task, channels in heads.items()
    )


def heatmap(stage: str, tasks: list[str], unit: Any) -> RenderableType:
    """One unit's TxT matrix: rows receive, columns give; cells coloured by their mean."""
    per = f", {unit.channels} channels" if unit.channels else ""
    columns = [("to \\ from", "left"), *((clean(t), "center") for t in tasks)]
    columns.append(("sharing", "right"))
    finite = [abs(v) for row in unit.matrix for v in row if math.isfinite(v)]
    scale = max(finite, default=0.0)
    rows: list[list[Cell]] = []
    for i, task in enumerate(tasks):
        cells: list[Cell] = [cell(task, style="bold")]
        for j in range(len(tasks)):
            text = f"{unit.matrix[i][j]:.3f}"
            if unit.channels:
                text += f"\n{unit.min[i][j]:.3f} to {unit.max[i][j]:.3f}"
            cells.append(Text(text, style=_heat(unit.matrix[i][j], scale), justify="center"))
        rows.append([*cells, _share(unit.sharing[i])])
    return grid(f"{stage}: A[to, from]{per}", columns, rows)


def inspection(path: str, kind: str, report: Any) -> None:
    """``crossstitch inspect``: the config, the stage table, then one heatmap per unit."""
    config = report.config
    stdout.print(
        line(
            (path, "bold"),
            f" ({kind}): {config.model_name} {sym('×', 'x')} {len(report.tasks)} tasks",
        )
    )
    stdout.print(_field("tasks", ", ".join(report.tasks)))
    stdout.print(
        _field(
            "init",
            f"alpha={config.alpha:g}, beta={config.beta:g}, granularity={config.granularity}",
        )
    )
    stdout.print(_field("heads", _heads(config.head_channels)))
    stdout.print(
        _field("outputs", f"features={config.features}, output stride {config.output_stride}")
    )
    if config.checkpoint_stages:
        stdout.print(_field("training", CHECKPOINTING))
    _preprocess(config.preprocess)
    columns = [("stage", "left"), ("channels", "right"), ("reduction", "right")]
    columns += [("unit", "right"), ("sharing per task", "right")]
    rows: list[list[Cell]] = []
    styles: list[str | None] = []
    for row in report.stage_table:
        unit = report.stages.get(row.name)
        shape = (len(report.tasks),) * 2 + ((row.channels,) if unit and unit.channels else ())
        rows.append(
            [
                cell(row.name),
                str(row.channels),
                f"/{row.reduction}",
                _size(shape) if unit else "not stitched",
                " ".join(_share(s) for s in unit.sharing) if unit else "-",
            ]
        )
        styles.append(None if unit else "dim")
    stdout.print(grid("Stages", columns, rows, styles))
    for stage, unit in report.stages.items():
        stdout.print(heatmap(stage, report.tasks, unit))
    cells = (
        "the mean over channels, min to max under it"
        if config.granularity == "channel"
        else "the weight"
    )
    stdout.print(
        f"cells: {cells}; colour: blue > 0, red < 0, deeper for a larger magnitude; "
        "sharing: the part of row i's weight magnitude (sum of |A| over channels) that "
        "comes from other tasks",
        markup=False,
    )


def _value(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4g}"


def prediction_report(
    model: str,
    runtime: str,
    transform: Any,
    rows: list,
    folder: str,
    comparison: Any | None = None,
    against: str = "",
) -> None:
    """``crossstitch predict``: per image and output its shape and range, then the files."""
    columns = [("image", "left"), ("output", "left"), ("shape", "right")]
    columns += [("min", "right"), ("max", "right")]
    cells: list[list[Cell]] = [
        [cell(r.image), cell(r.output), _size(r.shape), _value(r.min), _value(r.max)] for r in rows
    ]
    images = len(dict.fromkeys(r.image for r in rows))
    title = f"{model} ({runtime}) on {images} image{'s' if images > 1 else ''}"
    stdout.print(grid(title, columns, cells))
    _preprocess(transform)
    stdout.print(_field("wrote", (folder, "green"), ": IMAGE.OUTPUT.npy (raw) and .png each"))
    for image, notes in dict.fromkeys((r.image, tuple(r.notes)) for r in rows if r.notes):
        stdout.print(_field("converted", f"{image}: {', '.join(notes)}"))
    if comparison is not None:
        stdout.print(comparison_table(f"{model} ({runtime}) against {against}", comparison))
        stdout.print(rule(comparison), markup=False)
        stdout.print(_verdict(comparison.passed))


def wrote(paths: list) -> None:
    """The files a command wrote besides its main result."""
    stdout.print(_field("wrote", (", ".join(clean(p) for p in paths), "green")))
