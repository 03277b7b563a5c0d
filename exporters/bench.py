"""Timing a cross-stitch model against its bare backbones and against its exported artifacts.

The baseline is the same task backbones run stage by stage with no stitching (the model's own
stage loop without units): the least any cross-stitch implementation can cost. With
``compiled=True`` both are also timed under ``torch.compile(fullgraph=True)``, the compile
time reported apart. Variants are run interleaved (one call of each per round), so drifting
clocks and background load hit all of them alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from crossstitch.backbone import CrossStitchBackbone, probe_shapes
from crossstitch.errors import CrossStitchError
from crossstitch.memory import check_fits
from crossstitch.summary import activation_bytes

from . import onnx
from .common import Artifact
from .formats import FORMATS, default_path
from .pipeline import check_compatible

BASELINE = "bare backbones"
STITCHED = "cross-stitch"
COMPILED = "compiled "
CHECKPOINTED = "checkpointed"


@dataclass
class Timing:
    """All timed calls of one variant, in seconds, and the peak tensor memory of one call.

    ``baseline`` names the variant its ``ratio`` is taken against: the bare backbones, compiled
    where the variant is. ``compile_seconds`` is the first (compiling) call of a compiled one.
    """

    name: str
    mode: str
    baseline: str = BASELINE
    seconds: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    ratio: float | None = None
    compile_seconds: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)


@dataclass
class BenchResult:
    """A benchmark run: its setting, one timing per variant and mode, and why its numbers may
    not be trusted (``warnings``: too few runs, or a spread over ``MAX_SPREAD``).

    ``checkpointing``: the training step with stage checkpointing against the one without, as
    ``{"memory_ratio", "time_ratio"}`` (peak memory and median time), when it was timed.
    """

    arch: str | None
    tasks: list[str]
    batch: int
    input_size: tuple[int, int]
    runs: int
    threads: int
    timings: list[Timing]
    warnings: list[str] = field(default_factory=list)
    checkpointing: dict[str, float] | None = None


# Below this many runs, or above this spread (slowest over median), a median says little.
MIN_RUNS = 5
MAX_SPREAD = 1.5


def trust_warnings(timings: list[Timing], runs: int) -> list[str]:
    """Why these timings cannot be trusted, with the number of runs to ask for instead."""
    suggested = max(20, 2 * runs)
    warnings = []
    if runs < MIN_RUNS:
        warnings.append(
            f"{runs} run{'s' if runs > 1 else ''} per variant: medians of fewer than {MIN_RUNS} "
            f"calls are noise; use --runs {suggested}"
        )
    spread = [t for t in timings if t.max / t.median > MAX_SPREAD]
    if spread and runs >= MIN_RUNS:
        worst = max(spread, key=lambda t: t.max / t.median)
        warnings.append(
            f"the slowest call of {worst.mode} {worst.name} took {worst.max / worst.median:.1f}x "
            f"its median (over {MAX_SPREAD}x): the machine was busy; use --runs {suggested} on "
            "a quiet machine"
        )
    return warnings


def bare_forward(model: CrossStitchBackbone, x: Tensor) -> dict[str, Tensor]:
    """The task networks stage by stage, as ``model.forward`` runs them, minus the units."""
    return model.run(x, None)


@contextlib.contextmanager
def _silenced_descriptors() -> Iterator[None]:
    """Send the process's stdout and stderr to /dev/null: the profiler logs from C++."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def peak_tensor_mb(call: Callable[[Tensor], object], x: Tensor) -> float:
    """Peak of the tensor memory torch allocates during one call, in MB.

    Replays, in time order, the allocation and free events (``"[memory]"``, ``Bytes`` positive
    or negative) of the profiler's documented Chrome-trace export. Memory that a runtime
    allocates outside torch (onnxruntime) is not seen.
    """
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        with _silenced_descriptors():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                call(x)
            prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    deltas = sorted(
        (float(e["ts"]), index, e["args"]["Bytes"])
        for index, e in enumerate(events)
        if e.get("name") == "[memory]"
    )
    current = peak = 0
    for _, _, nbytes in deltas:
        current += nbytes
        peak = max(peak, current)
    return peak / 1e6


def _training_step(
    model: CrossStitchBackbone, forward: Callable[[Tensor], dict], checkpoint_stages: bool = False
) -> Callable:
    """Forward, backward, then drop the gradients: every step starts from none, alike, and
    allocates its gradients again. Stage checkpointing is on for this step only if asked."""

    def step(x: Tensor) -> None:
        model.checkpoint_stages = checkpoint_stages
        out = forward(x)
        sum(o.mean() for o in out.values()).backward()
        model.zero_grad(set_to_none=True)

    return step


def artifacts_beside(
    model: CrossStitchBackbone, model_path: Path, threads: int
) -> tuple[dict[str, Artifact], list[str]]:
    """The artifacts exported from this checkpoint that sit beside it under their default names.

    Each is checked and loaded like any artifact (a hostile file is refused); one whose stored
    config describes another network is left out, and the second list says which and why.
    """
    found, skipped = {}, []
    for fmt, module in FORMATS.items():
        path = default_path(model_path, fmt)
        if not path.is_file():
            continue
        artifact = onnx.load(path, threads=threads) if fmt == onnx.NAME else module.load(path)
        try:
            check_compatible(artifact, model, path)
        except CrossStitchError as exc:
            skipped.append(str(exc))
            continue
        found[fmt] = artifact
    return found, skipped


def run_bench(
    model: CrossStitchBackbone,
    batch: int,
    input_size: tuple[int, int],
    runs: int,
    threads: int,
    *,
    artifacts: dict[str, Artifact] | None = None,
    training: bool = True,
    compiled: bool = False,
    checkpointing: bool = False,
    warmup: int = 2,
) -> BenchResult:
    """Time inference (eager, baseline, each artifact) and a training step (eager, baseline);
    with ``compiled``, the model and the baseline under ``torch.compile(fullgraph=True)`` too.
    Training steps run without stage checkpointing; with ``checkpointing`` (or for a model
    configured with it) the eager model's step is also timed with it.
    """
    if training:
        _check_trainable_size(model, batch, input_size)
    height, width = input_size
    check_fits(
        activation_bytes(model, batch, input_size, training),
        f"timing batch {batch} at {height}x{width}",
    )
    checkpointing = training and (checkpointing or model.config.checkpoint_stages)
    previous_threads, previous_setting = torch.get_num_threads(), model.checkpoint_stages
    torch.set_num_threads(threads)
    try:
        timings = _time_variants(
            model,
            batch,
            input_size,
            runs,
            artifacts,
            training,
            compiled,
            checkpointing,
            warmup,
        )
    finally:
        torch.set_num_threads(previous_threads)
        model.checkpoint_stages = previous_setting
    return BenchResult(
        arch=model.config.arch,
        tasks=list(model.tasks),
        batch=batch,
        input_size=tuple(input_size),
        runs=runs,
        threads=threads,
        timings=timings,
        warnings=trust_warnings(timings, runs),
        checkpointing=_checkpointing_ratios(timings) if checkpointing else None,
    )


def _checkpointing_ratios(timings: list[Timing]) -> dict[str, float]:
    """Peak memory and median time of the checkpointed training step over the plain one's."""
    steps = {t.name: t for t in timings if t.mode == "training"}
    plain, checkpointed = steps[STITCHED], steps[CHECKPOINTED]
    return {
        "memory_ratio": checkpointed.peak_mb / plain.peak_mb,
        "time_ratio": checkpointed.median / plain.median,
    }


def _check_trainable_size(
    model: CrossStitchBackbone, batch: int, input_size: tuple[int, int]
) -> None:
    """Batch norm in training mode needs more than one value per channel at every stage."""
    shapes = probe_shapes(model.backbones[model.tasks[0]], input_size)
    smallest = min(s.numel() // (s[0] * s[model.channel_dim]) for s in shapes.values())
    if batch * smallest < 2:
        raise CrossStitchError(
            f"a training step at batch {batch} and {input_size[0]}x{input_size[1]} leaves one "
            "value per channel for batch norm; use a larger --batch or --input-size, "
            "or --no-training"
        )


def _time_variants(
    model: CrossStitchBackbone,
    batch: int,
    input_size: tuple[int, int],
    runs: int,
    artifacts: dict[str, Artifact] | None,
    training: bool,
    compiled: bool,
    checkpointing: bool,
    warmup: int,
) -> list[Timing]:
    x = torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))
    forwards: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
        STITCHED: model,
        BASELINE: lambda t: bare_forward(model, t),
    }
    if compiled:
        for name, call in list(forwards.items()):
            forwards[COMPILED + name] = torch.compile(call, fullgraph=True)
    inference: dict[str, Callable[[Tensor], object]] = dict(forwards)
    for fmt, artifact in (artifacts or {}).items():
        inference[fmt] = artifact.run
    timings = [_timing(name, "inference") for name in inference]
    model.eval()
    with torch.no_grad():
        _interleave(list(inference.values()), timings, x, runs, warmup)
    if training:
        steps = [_training_step(model, call) for call in forwards.values()]
        train_timings = [_timing(name, "training") for name in forwards]
        if checkpointing:
            steps.append(_training_step(model, model, checkpoint_stages=True))
            train_timings.append(_timing(CHECKPOINTED, "training"))
        model.train()
        model.zero_grad(set_to_none=True)
        _interleave(steps, train_timings, x, runs, warmup)
        model.eval()
        timings += train_timings
    for timing in timings:
        baseline = next(t for t in timings if t.mode == timing.mode and t.name == timing.baseline)
        timing.ratio = timing.median / baseline.median
    return timings


def _timing(name: str, mode: str) -> Timing:
    compiled = name.startswith(COMPILED)
    return Timing(name, mode, baseline=COMPILED + BASELINE if compiled else BASELINE)


def _interleave(
    calls: list[Callable], timings: list[Timing], x: Tensor, runs: int, warmup: int
) -> None:
    """Warm up, time ``runs`` rounds, then one more round under the profiler for memory.

    The first warm-up call of a compiled variant compiles it and is recorded as its compile
    time. Every other round runs the variants in reverse order, so none always follows the same
    neighbour; the profiler stays off while timing so that it cannot slow any call.
    """
    for index in range(warmup):
        for call, timing in zip(calls, timings, strict=True):
            start = time.perf_counter()
            call(x)
            if index == 0 and timing.name.startswith(COMPILED):
                timing.compile_seconds = time.perf_counter() - start
    pairs = list(zip(calls, timings, strict=True))
    for round_index in range(runs):
        for call, timing in pairs if round_index % 2 == 0 else reversed(pairs):
            start = time.perf_counter()
            call(x)
            timing.seconds.append(time.perf_counter() - start)
    for call, timing in zip(calls, timings, strict=True):
        if timing.name != onnx.NAME:
            timing.peak_mb = peak_tensor_mb(call, x)
