"""Write the pictures the README shows: a drawn photo and what `crossstitch predict` makes of it.

The photo is drawn with torch (a house under a sky), so the repository ships no photograph. The
prediction comes from the README's own commands, run in a fresh folder: build ResNet-18 with a
21-class ``seg`` head and a 1-channel ``depth`` head (random init), export it to ONNX, predict.

Run: python scripts/readme_images.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from crossstitch.config import Preprocess
from crossstitch.images import crop
from crossstitch.visualize import stack, write_png

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
COMMANDS = [
    ["build", "resnet18", "--tasks", "seg", "depth", "--head", "seg=21", "--head", "depth=1"],
    ["export", "--format", "onnx"],
    ["predict", "photo.png", "--model", "crossstitch.onnx"],
]


def draw_photo(height: int = 192, width: int = 256) -> torch.Tensor:
    """A house with a red roof on grass under a blue sky with a sun, ``uint8 [3, H, W]``."""
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    sky = torch.stack([90 + ys * 0.6, 150 + ys * 0.4, 235 - ys * 0.1])
    image = sky.clone()
    horizon = int(height * 0.62)
    grass = torch.stack([60 + 0 * ys, 150 - (ys - horizon) * 0.5, 60 + 0 * ys])
    image[:, horizon:] = grass[:, horizon:]
    sun = (ys - 38) ** 2 + (xs - 205) ** 2 < 20**2
    image[:, sun] = torch.tensor([250.0, 220, 90]).view(3, 1)
    left, right, top = 70, 170, horizon - 55
    image[:, top : horizon + 10, left:right] = torch.tensor([225.0, 215, 190]).view(3, 1, 1)
    roof = (ys < top) & (ys > top - 40) & ((xs - 120).abs() < (ys - (top - 40)) * 1.5)
    image[:, roof] = torch.tensor([170.0, 50, 40]).view(3, 1)
    image[:, top + 25 : horizon + 10, 110:130] = torch.tensor([110.0, 70, 40]).view(3, 1, 1)
    for x in (80, 140):
        image[:, top + 12 : top + 30, x : x + 20] = torch.tensor([120.0, 170, 220]).view(3, 1, 1)
    return image.clamp(0, 255).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    IMAGES.mkdir(exist_ok=True)
    photo = IMAGES / "photo.png"
    write_png(draw_photo(), photo)
    exe = shutil.which("crossstitch", path=os.path.dirname(sys.executable)) or "crossstitch"
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(photo, folder)
        for args in COMMANDS:
            subprocess.run([exe, *args], cwd=folder, check=True, capture_output=True)
        outputs = Path(folder) / "predictions"
        seg, depth = (
            decode_image(str(outputs / f"photo.{task}.png"), mode=ImageReadMode.RGB)
            for task in ("seg", "depth")
        )
    view = crop(draw_photo(), Preprocess())  # what the model sees: the default transform
    write_png(stack([view, seg, depth], gap=8, vertical=False), IMAGES / "predict.png")


if __name__ == "__main__":
    main()
