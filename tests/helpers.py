"""Small builders and inputs shared by the tests: random init, 64 px images, fast."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import crossstitch

SMALL = 64


def load_script(name: str) -> types.ModuleType:
    """A script from scripts/ as a module, so tests run the code the scripts run."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize_units(model: crossstitch.CrossStitchBackbone, seed: int = 0) -> None:
    """Give every unit non-trivial values so parity tests exercise all products."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in model.cross_stitch.values():
            unit.weight.copy_(torch.rand(unit.weight.shape, generator=generator) * 2 - 1)


def build(
    arch: str = "resnet18", tasks=("seg", "depth"), **kwargs
) -> crossstitch.CrossStitchBackbone:
    torch.manual_seed(0)
    return crossstitch.CrossStitchBackbone.from_torchvision(arch, tasks=list(tasks), **kwargs)


def image(batch: int = 2, size: int = SMALL, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def without_progress(stderr: str) -> str:
    """stderr without the one line per long step the CLI prints when it is not a terminal."""
    return "".join(
        line for line in stderr.splitlines(keepends=True) if not line.rstrip().endswith(" ...")
    )


EXE = shutil.which("crossstitch", path=os.path.dirname(sys.executable)) or "crossstitch"


def interrupt_when_staged(
    args: list[str], cwd: Path, staged: str, sig: int, settle: float = 0.0
) -> tuple[int, bytes]:
    """Run the installed CLI, send ``sig`` once a file matching ``staged`` appears in ``cwd``.

    Returns the exit code and stderr. The CLI starts with SIGINT at its default, as from a
    terminal: a shell starting the test run in the background (``pytest &``) leaves it ignored,
    and that would be inherited.
    """
    process = subprocess.Popen(
        [EXE, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 180
    while not list(cwd.glob(staged)) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    time.sleep(settle)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err
