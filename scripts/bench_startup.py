"""Start-up time of `crossstitch --help` and `crossstitch list` against `python -c "import torch"`.

The CLI imports torch only inside the commands that need it; this measures that it stays so.
Each command runs in a fresh process, alternating, and the medians are compared.
Run: python scripts/bench_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    exe = shutil.which("crossstitch", path=str(Path(sys.executable).parent)) or "crossstitch"
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "crossstitch --help": [exe, "--help"],
        "crossstitch list": [exe, "list"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    baseline = statistics.median(times["import torch"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20s} median {median * 1e3:7.1f} ms   {median / baseline:.2f}x import torch")


if __name__ == "__main__":
    main()
