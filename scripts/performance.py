"""Run the benchmarks behind docs/performance.md and the README's summary, and write both.

Each benchmark is one `crossstitch bench --json` run of the installed command; the tables are
made from its JSON alone, with the machine and the command that produced them, so the docs only
ever show runs that happened. Run it on a quiet machine: the variants are timed interleaved, but
a busy machine still widens the spread (bench warns when it does).

The VM's timings drift by a few percent from run to run, so each benchmark runs ``--repeats``
times: the README shows every run's ratio, the docs the full table of each run.

Run: python scripts/performance.py [--runs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
BENCHMARKS = {
    "resnet18-compiled": "bench resnet18 --tasks seg depth --batch 4 --input-size 128 --compile",
    "resnet50-eager": "bench resnet50 --tasks seg depth normals --batch 4 --input-size 128",
}


def run(command: str, runs: int) -> dict:
    """One benchmark's JSON result."""
    exe = shutil.which("crossstitch", path=os.path.dirname(sys.executable)) or "crossstitch"
    args = [*command.split(), "--runs", str(runs), "--json"]
    result = subprocess.run([exe, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def machine() -> str:
    """The machine and library versions the numbers come from."""
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()}-core {cpu} CPU, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )


def table(result: dict) -> str:
    """The full timing table of one benchmark."""
    rows = [
        "| mode | variant | median ms | min ms | max ms | vs its baseline | peak MB | compile s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in result["timings"]:
        peak = "-" if t["peak_mb"] is None else f"+{t['peak_mb']:.0f}"
        compile_s = "-" if t["compile_seconds"] is None else f"{t['compile_seconds']:.1f}"
        rows.append(
            f"| {t['mode']} | {t['name']} | {t['median'] * 1e3:.1f} | {t['min'] * 1e3:.1f} | "
            f"{t['max'] * 1e3:.1f} | {t['ratio']:.3f}x | {peak} | {compile_s} |"
        )
    return "\n".join(rows)


def ratios(runs: list[dict], mode: str, variant: str) -> str:
    """One variant's ratio to its baseline in every run, in run order."""
    found = [
        t["ratio"]
        for run in runs
        for t in run["timings"]
        if (t["mode"], t["name"]) == (mode, variant)
    ]
    return " / ".join(f"{r:.3f}x" for r in found) or "-"


def summary(results: dict[str, list[dict]]) -> str:
    """The README's table: the cross-stitch model over its bare backbones, every run."""
    rows = [
        "| model | mode | eager, each run | compiled, each run | command |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        first = runs[0]
        for mode in ("inference", "training"):
            rows.append(
                f"| {first['arch']} × {len(first['tasks'])} tasks | {mode} | "
                f"{ratios(runs, mode, 'cross-stitch')} | "
                f"{ratios(runs, mode, 'compiled cross-stitch')} | "
                f"`crossstitch {BENCHMARKS[name]}` |"
            )
    return "\n".join(rows)


def replace(path: Path, marker: str, text: str) -> None:
    """Put ``text`` between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path``."""
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    content = path.read_text()
    if not pattern.search(content):
        raise SystemExit(f"{path} has no {marker} markers")
    path.write_text(pattern.sub(lambda m: f"{m[1]}{text}\n{m[2]}", content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per variant")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each benchmark")
    args = parser.parse_args()
    results = {
        name: [run(command, args.runs) for _ in range(args.repeats)]
        for name, command in BENCHMARKS.items()
    }
    sections = [f"Measured on: {machine()}."]
    for name, runs in results.items():
        for index, result in enumerate(runs, 1):
            sections.append(
                f"`crossstitch {BENCHMARKS[name]} --runs {args.runs}`, run {index} of "
                f"{len(runs)}\n\n{table(result)}"
            )
            sections += [f"Warning from bench: {w}" for w in result["warnings"]]
    replace(DOC, "performance", "\n\n".join(sections))
    replace(README, "performance", f"{summary(results)}\n\nMeasured on: {machine()}.")


if __name__ == "__main__":
    main()
