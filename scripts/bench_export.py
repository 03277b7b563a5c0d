"""Time `crossstitch export --format onnx` work against a bare torch.onnx.export + one ORT run.

Both sides export the same ResNet-18 two-task model with dynamic batch, height and width. The
bare side saves the file, opens an onnxruntime session and runs one batch; our side adds what
`crossstitch export` does (metadata, onnx.checker full check, verification against the eager
model at another batch and size). Runs alternate; medians are reported.
Run: python scripts/bench_export.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from crossstitch import CrossStitchBackbone
from crossstitch.exporters.common import ExportOptions, dynamic_shapes, quiet
from crossstitch.exporters.pipeline import Inputs, export_verified


def bare(model: CrossStitchBackbone, folder: Path) -> None:
    """The floor: the exporter, a session and one run, nothing else."""
    example = Inputs(2, 224, 224, 1).tensor()
    with quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=list(model.tasks),
            dynamic_shapes=dynamic_shapes(True),
        )
        program.save(folder / "bare.onnx")
    session = onnxruntime.InferenceSession(
        str(folder / "bare.onnx"), providers=["CPUExecutionProvider"]
    )
    session.run(None, {"image": Inputs(3, 256, 288, 0).tensor().numpy()})


def ours(model: CrossStitchBackbone, folder: Path) -> None:
    """What `crossstitch export --format onnx` does after loading the checkpoint."""
    result = export_verified(model, "onnx", folder / "ours.onnx", (224, 224), ExportOptions())
    assert result.passed


def cpu_name() -> str:
    """The processor model, as the kernel reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CrossStitchBackbone.from_torchvision("resnet18", ["seg", "depth"]).eval()
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, step in (("bare", bare), ("ours", ours)):
                start = time.perf_counter()
                step(model, Path(tmp))
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    for name, values in times.items():
        print(
            f"{name}: median {medians[name]:.2f} s  (runs: {', '.join(f'{v:.2f}' for v in values)})"
        )
    print(f"ratio ours/bare: {medians['ours'] / medians['bare']:.2f}")


if __name__ == "__main__":
    main()
