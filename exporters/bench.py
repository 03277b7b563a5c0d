"""Timing a cross-stitch model against its bare backbones and against its exported artifacts.

The baseline is the same task backbones run stage by stage with no stitching: the least any
cross-stitch implementation can cost. Variants are run interleaved (one call of each per round),
so drifting clocks and background load hit all of them alike.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from crossstitch import fused
from crossstitch.backbone import CrossStitchBackbone, probe_shapes
from crossstitch.errors import CrossStitchError
from crossstitch.heads import head_output
from crossstitch.memory import check_fits
from crossstitch.summary import activation_bytes

from . import onnx
from .formats import FORMATS

BASELINE = "bare backbones"
STITCHED = "cross-stitch"


@dataclass
class Timing:
    """All timed calls of one variant, in seconds, and the peak tensor memory of one call."""

    name: str
    mode: str
    seconds: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    ratio: float | None = None

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
    """A benchmark run: its setting, one timing per variant and mode, what ran the units.

    ``unit_kernel`` names what ran the eager model's units, for inference and training steps
    alike.
    """

    arch: str | None
    tasks: list[str]
    batch: int
    input_size: tuple[int, int]
    runs: int
    threads: int
    timings: list[Timing]
    unit_kernel: str


def bare_forward(model: CrossStitchBackbone, x: Tensor) -> dict[str, Tensor]:
    """The task networks stage by stage, as ``model.forward`` runs them, minus the units."""
    feats = {task: backbone.stem(x) for task, backbone in model.backbones.items()}
    for name in model.backbones[model.tasks[0]].stages:
        feats = {task: net.stages[name](feats[task]) for task, net in model.backbones.items()}
    size = x.shape[-2:]
    return {
        task: head_output(model.heads[task], f, size) if task in model.heads else f
        for task, f in feats.items()
    }


@contextlib.contextmanager
def _silenced_descriptors() -> Iterator[None]:
    """Send the process's stdout and stderr to /dev/null: the profiler logs from C++."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def peak_tensor_mb(call: Callable[[Tensor], object], x: Tensor) -> float:
    """Peak of the tensor memory torch allocates during one call, in MB.

    Replays the profiler's allocation and free events in time order; memory that a runtime
    allocates outside torch (onnxruntime) is not seen.
    """
    with (
        _silenced_descriptors(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        call(x)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 1e6


def _training_step(model: CrossStitchBackbone, forward: Callable[[Tensor], dict]) -> Callable:
    """Forward, backward, then drop the gradients: every step starts from none, alike."""

    def step(x: Tensor) -> None:
        out = forward(x)
        sum(o.mean() for o in out.values()).backward()
        model.zero_grad(set_to_none=True)

    return step


def artifacts_beside(model_path: Path) -> dict[str, Path]:
    """The exported artifacts that sit beside a checkpoint under their default names."""
    from .formats import default_path

    found = {fmt: default_path(model_path, fmt) for fmt in FORMATS}
    return {fmt: path for fmt, path in found.items() if path.is_file()}


def run_bench(
    model: CrossStitchBackbone,
    batch: int,
    input_size: tuple[int, int],
    runs: int,
    threads: int,
    artifacts: dict[str, Path] | None = None,
    training: bool = True,
    warmup: int = 2,
) -> BenchResult:
    """Time inference (eager, baseline, each artifact) and a training step (eager, baseline)."""
    if training:
        _check_trainable_size(model, batch, input_size)
    height, width = input_size
    check_fits(
        activation_bytes(model, batch, input_size, training),
        f"timing batch {batch} at {height}x{width}",
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    fused_calls = fused.calls
    try:
        timings = _time_variants(
            model, batch, input_size, runs, threads, artifacts, training, warmup
        )
    finally:
        torch.set_num_threads(previous_threads)
    return BenchResult(
        arch=model.config.get("arch"),
        tasks=list(model.tasks),
        batch=batch,
        input_size=tuple(input_size),
        runs=runs,
        threads=threads,
        timings=timings,
        unit_kernel=fused.kernel_name(fused.calls > fused_calls),
    )


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
    threads: int,
    artifacts: dict[str, Path] | None,
    training: bool,
    warmup: int,
) -> list[Timing]:
    x = torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))
    inference: dict[str, Callable[[Tensor], object]] = {
        STITCHED: model,
        BASELINE: lambda t: bare_forward(model, t),
    }
    for fmt, path in (artifacts or {}).items():
        loaded = onnx.load(path, threads=threads) if fmt == onnx.NAME else FORMATS[fmt].load(path)
        inference[fmt] = loaded.run
    timings = [Timing(name, "inference") for name in inference]
    model.eval()
    with torch.no_grad():
        _interleave(list(inference.values()), timings, x, runs, warmup)
    if training:
        steps = [_training_step(model, model), _training_step(model, inference[BASELINE])]
        train_timings = [Timing(STITCHED, "training"), Timing(BASELINE, "training")]
        model.train()
        model.zero_grad(set_to_none=True)
        _interleave(steps, train_timings, x, runs, warmup)
        model.eval()
        timings += train_timings
    for timing in timings:
        baseline = next(t for t in timings if t.mode == timing.mode and t.name == BASELINE)
        timing.ratio = timing.median / baseline.median
    return timings


def _interleave(
    calls: list[Callable], timings: list[Timing], x: Tensor, runs: int, warmup: int
) -> None:
    """Warm up, time ``runs`` rounds, then one more round under the profiler for memory.

    Every other round runs the variants in reverse order, so none always follows the same
    neighbour; the profiler stays off while timing so that it cannot slow any call.
    """
    for _ in range(warmup):
        for call in calls:
            call(x)
    pairs = list(zip(calls, timings, strict=True))
    for round_index in range(runs):
        for call, timing in pairs if round_index % 2 == 0 else reversed(pairs):
            start = time.perf_counter()
            call(x)
            timing.seconds.append(time.perf_counter() - start)
    for call, timing in zip(calls, timings, strict=True):
        if timing.name != onnx.NAME:
            timing.peak_mb = peak_tensor_mb(call, x)
