"""One cross-stitch unit's inference forward: the torch ops against the fused C kernel.

ResNet-50 stage outputs for 3 tasks, batch 4, 128 px input (layer1..layer4). The torch ops, the
fused kernel into new outputs and the fused kernel written over its inputs (as the backbone runs
it) are run interleaved, in turn first, and the medians are compared; the fused outputs are
checked bit for bit against the torch ops' before timing. Every call starts from the same
input values, copied in untimed.
Run: python scripts/bench_units.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from crossstitch import CrossStitchUnit, fused

SHAPES = {
    "layer1": (4, 256, 32, 32),
    "layer2": (4, 512, 16, 16),
    "layer3": (4, 1024, 8, 8),
    "layer4": (4, 2048, 4, 4),
}
TASKS = ["seg", "depth", "normals"]


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not fused.AVAILABLE:
        raise SystemExit("the fused C kernel is not built in this install")
    torch.set_num_threads(args.threads)
    print(f"{len(TASKS)} tasks, {args.threads} threads, {args.repeats} interleaved runs, medians")
    totals = {"torch ops": 0.0, "fused": 0.0, "in place": 0.0}
    for stage, shape in SHAPES.items():
        unit = CrossStitchUnit(TASKS, shape[1])
        with torch.no_grad():
            unit.weight.copy_(torch.rand(unit.weight.shape) * 2 - 1)
        sources = [torch.randn(shape) for _ in TASKS]
        xs = [x.clone() for x in sources]
        calls = {
            "torch ops": lambda unit=unit, xs=xs: unit.mix(xs),
            "fused": lambda unit=unit, xs=xs: fused.stitch(unit.weight, xs, 1),
            "in place": lambda unit=unit, xs=xs: fused.stitch_(unit.weight, xs, 1),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            want = calls["torch ops"]()
            for name in ("fused", "in place"):
                got = calls[name]()
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
                for x, source in zip(xs, sources, strict=True):
                    x.copy_(source)
            names = list(calls)
            for round_index in range(args.repeats):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    for x, source in zip(xs, sources, strict=True):
                        x.copy_(source)
                    times[name].append(_timed(calls[name]))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            totals[name] += value
        print(_line(f"{stage} {list(shape)!s:18s}", medians))
    print(_line(f"{'all four units':25s}", totals))


def _line(label: str, seconds: dict[str, float]) -> str:
    times = "   ".join(f"{name} {value * 1e3:7.3f} ms" for name, value in seconds.items())
    return f"{label} {times}   in place {seconds['torch ops'] / seconds['in place']:.2f}x faster"


if __name__ == "__main__":
    main()
