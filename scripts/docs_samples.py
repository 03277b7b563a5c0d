"""Write the sample outputs of docs/cli.md from real runs of the installed command.

Each sample sits between ``<!-- sample:NAME -->`` and ``<!-- /sample -->`` and is the output of
its commands, run in a fresh folder in an 80-column terminal without colours. The test suite
runs the same commands and fails when the file and the real output differ.

Run: python scripts/docs_samples.py
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
WIDTH = 80
# Each sample: the commands run in one folder, in order; every one's output is shown.
SAMPLES = {
    "build": [["build", "resnet18", "--tasks", "seg", "depth"]],
    "build-heads": [
        ["build", "resnet18", "--tasks", "seg", "depth", "--head", "seg=21", "--head", "depth=1"]
    ],
    "verify": [
        ["build", "resnet18", "--tasks", "seg", "depth", "--json"],
        ["verify", "--against", "reference"],
    ],
    "inspect": [
        ["build", "resnet18", "--tasks", "seg", "depth", "--stages", "layer1,layer4", "--json"],
        ["inspect"],
    ],
    "predict": [
        ["build", "resnet18", "--tasks", "seg", "depth", "--head", "seg=21", "--json"],
        ["predict", "photo.png"],
    ],
}
# Files a sample's commands read, copied into its folder first (made by scripts/readme_images.py).
FILES = {"predict": (ROOT / "docs" / "images" / "photo.png",)}
MARKER = re.compile(r"<!-- sample:(?P<name>[\w-]+) -->\n.*?<!-- /sample -->", re.S)


def run(commands: list[list[str]], files: tuple[Path, ...] = ()) -> str:
    """The shown output of ``commands`` run in a fresh folder holding ``files``:
    ``$ crossstitch ...`` and stdout."""
    exe = shutil.which("crossstitch", path=os.path.dirname(sys.executable)) or "crossstitch"
    env = {**os.environ, "COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"}
    shown = []
    with tempfile.TemporaryDirectory() as folder:
        for path in files:
            shutil.copy(path, folder)
        for args in commands:
            result = subprocess.run(
                [exe, *args], cwd=folder, env=env, capture_output=True, text=True, check=True
            )
            if "--json" not in args:
                output = "\n".join(line.rstrip() for line in result.stdout.rstrip().splitlines())
                shown.append(f"$ crossstitch {' '.join(args)}\n{output}")
    return "\n\n".join(shown)


def render(text: str) -> str:
    """``text`` with every sample replaced by the real output of its commands."""

    def block(match: re.Match[str]) -> str:
        name = match["name"]
        shown = run(SAMPLES[name], FILES.get(name, ()))
        return f"<!-- sample:{name} -->\n```text\n{shown}\n```\n<!-- /sample -->"

    return MARKER.sub(block, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    DOC.write_text(render(DOC.read_text()))


if __name__ == "__main__":
    main()
