"""One cross-stitch unit's inference forward: the torch ops against the fused C kernel.

ResNet-50 stage outputs for 3 tasks, batch 4, 128 px input (layer1..layer4). Both paths run
interleaved, alternating which goes first, and the medians are compared; the fused outputs are
checked bit for bit against the torch ops' before timing.
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
    totals = {"torch ops": 0.0, "fused": 0.0}
    for stage, shape in SHAPES.items():
        unit = CrossStitchUnit(TASKS, shape[1])
        with torch.no_grad():
            unit.weight.copy_(torch.rand(unit.weight.shape) * 2 - 1)
        xs = [torch.randn(shape) for _ in TASKS]
        calls = {
            "torch ops": lambda unit=unit, xs=xs: unit.mix(xs),
            "fused": lambda unit=unit, xs=xs: fused.stitch(unit.weight, xs, 1),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            got, want = calls["fused"](), calls["torch ops"]()
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            for round_index in range(args.repeats):
                order = list(calls) if round_index % 2 == 0 else list(reversed(calls))
                for name in order:
                    times[name].append(_timed(calls[name]))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            totals[name] += value
        print(
            f"{stage} {list(shape)!s:18s} torch ops {medians['torch ops'] * 1e3:7.3f} ms   "
            f"fused {medians['fused'] * 1e3:7.3f} ms   "
            f"{medians['torch ops'] / medians['fused']:.2f}x faster"
        )
    print(
        f"all four units      torch ops {totals['torch ops'] * 1e3:7.3f} ms   "
        f"fused {totals['fused'] * 1e3:7.3f} ms   "
        f"{totals['torch ops'] / totals['fused']:.2f}x faster"
    )


if __name__ == "__main__":
    main()
