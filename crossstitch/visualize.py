"""Model outputs and unit weights as pictures a person can read, written as PNG files.

Class maps get a fixed palette and a legend of the classes present; one-channel maps a colour
scale with their value range; feature maps their first three principal components as RGB.
Labels are drawn with a built-in 3x5 pixel font, so no font or plotting library is needed.
Every image is ``uint8 [3, H, W]``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from crossstitch.files import atomic_path
from crossstitch.inspection import Inspection

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
# The scale of one-channel maps, low to high: dark blue, blue, teal, green, light yellow.
SCALE = ((20, 30, 90), (40, 100, 180), (40, 170, 150), (150, 205, 70), (250, 240, 150))
# Unit weights: red below zero, white at zero, blue above (as `inspect` colours its cells).
NEGATIVE, ZERO, POSITIVE = (214, 39, 40), (255, 255, 255), (31, 119, 180)
GLYPHS = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", "..#", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
    "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."),
    ".": ("...", "...", "...", "...", ".#."),
    " ": ("...", "...", "...", "...", "..."),
    "a": ("...", "##.", ".##", "#.#", "###"),
    "e": (".##", "#.#", "###", "#..", ".##"),
    "f": (".##", "#..", "###", "#..", "#.."),
    "i": (".#.", "...", ".#.", ".#.", ".#."),
    "m": ("...", "###", "###", "#.#", "#.#"),
    "n": ("...", "##.", "#.#", "#.#", "#.#"),
    "x": ("...", "#.#", ".#.", ".#.", "#.#"),
}
DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def _colour(rgb: tuple[int, int, int]) -> Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)


def canvas(height: int, width: int, rgb: tuple[int, int, int] = BACKGROUND) -> Tensor:
    """A ``uint8 [3, height, width]`` image of one colour."""
    return _colour(rgb).expand(3, height, width).clone()


def text(
    label: str,
    scale: int = 1,
    rgb: tuple[int, int, int] = INK,
    background: tuple[int, int, int] = BACKGROUND,
) -> Tensor:
    """``label`` drawn with the 3x5 font in ``rgb`` on ``background``, one column between.

    Only digits, ``+ - .``, space and the letters of ``mean min max nan inf`` are drawn.
    """
    unknown = sorted(set(label) - set(GLYPHS))
    if unknown:
        raise ValueError(f"the built-in font has no glyph for {unknown}")
    columns = []
    for position, char in enumerate(label):
        if position:
            columns.append(torch.zeros(5, 1, dtype=torch.bool))
        columns.append(torch.tensor([[c == "#" for c in row] for row in GLYPHS[char]]))
    mask = torch.cat(columns, dim=1) if columns else torch.zeros(5, 0, dtype=torch.bool)
    mask = mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    image = canvas(*mask.shape, background)
    image[:, mask] = _colour(rgb).view(3, 1)
    return image


def paste(target: Tensor, image: Tensor, top: int, left: int) -> None:
    """Copy ``image`` into ``target`` at ``(top, left)``, cut at ``target``'s edges."""
    height = min(image.shape[1], target.shape[1] - top)
    width = min(image.shape[2], target.shape[2] - left)
    if height > 0 and width > 0:
        target[:, top : top + height, left : left + width] = image[:, :height, :width]


def stack(images: list[Tensor], gap: int = 4, vertical: bool = True) -> Tensor:
    """Images one under (or beside) the other on white, left (or top) aligned."""
    along, across = (1, 2) if vertical else (2, 1)
    length = sum(i.shape[along] for i in images) + gap * (len(images) - 1)
    breadth = max(i.shape[across] for i in images)
    out = canvas(length, breadth) if vertical else canvas(breadth, length)
    offset = 0
    for image in images:
        paste(out, image, offset if vertical else 0, 0 if vertical else offset)
        offset += image.shape[along] + gap
    return out


def palette(classes: Tensor) -> Tensor:
    """A fixed colour per class index: its bits spread over R, G and B, high bits first.

    Class 0 is black; neighbouring indices differ strongly; indices below 2**24 are distinct.
    """
    classes = classes.to(torch.int64)
    rgb = torch.zeros(*classes.shape, 3, dtype=torch.int64)
    for bit in range(8):
        for channel in range(3):
            rgb[..., channel] |= ((classes >> (3 * bit + channel)) & 1) << (7 - bit)
    return rgb.to(torch.uint8).movedim(-1, 0)


def _label_scale(width: int) -> int:
    return 2 if width >= 160 else 1


def class_map(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``[C, H, W]`` scores to the picture of their argmax and the label map ``[H, W]``."""
    labels = logits.argmax(dim=0)
    return palette(labels), labels


def legend(labels: Tensor, width: int) -> Tensor:
    """Swatches with class numbers for the classes present, most frequent first, in rows."""
    scale = _label_scale(width)
    counts = torch.bincount(labels.flatten())
    present = [int(i) for i in torch.argsort(counts, descending=True, stable=True) if counts[i]]
    swatch = 5 * scale
    entries = []
    for index in present:
        entry = canvas(swatch, swatch + 2 * scale + len(str(index)) * 4 * scale)
        paste(entry, palette(torch.tensor([[index]])).expand(3, swatch, swatch), 0, 0)
        paste(entry, text(str(index), scale), 0, swatch + 2 * scale)
        entries.append(entry)
    rows, row, used = [], [], 0
    for entry in entries:
        if row and used + entry.shape[2] > width:
            rows.append(stack(row, gap=3 * scale, vertical=False))
            row, used = [], 0
        row.append(entry)
        used += entry.shape[2] + 3 * scale
    rows.append(stack(row, gap=3 * scale, vertical=False))
    return stack(rows, gap=2 * scale)


def colormap(values: Tensor, low: float, high: float) -> Tensor:
    """``[H, W]`` values to colours along ``SCALE`` from ``low`` to ``high``; NaN is black."""
    anchors = torch.tensor(SCALE, dtype=torch.float32)
    span = high - low if high > low else 1.0
    t = ((values.to(torch.float32) - low) / span).clamp(0, 1) * (len(SCALE) - 1)
    t = torch.nan_to_num(t, nan=0.0)
    below = t.floor().clamp(max=len(SCALE) - 2).long()
    frac = (t - below).unsqueeze(-1)
    rgb = anchors[below] * (1 - frac) + anchors[below + 1] * frac
    rgb[values.isnan()] = 0
    return rgb.round().to(torch.uint8).movedim(-1, 0)


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def value_range(values: Tensor) -> tuple[float, float]:
    """The finite minimum and maximum of ``values`` (NaN, NaN where none is finite)."""
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return math.nan, math.nan
    return finite.min().item(), finite.max().item()


def scale_bar(low: float, high: float, width: int) -> Tensor:
    """The colour scale from ``low`` to ``high`` with both values written under its ends."""
    scale = _label_scale(width)
    ramp = torch.linspace(0, 1, max(width, 2)).expand(4 * scale, -1)
    bar = colormap(ramp, 0.0, 1.0)
    left, right = text(_number(low), scale), text(_number(high), scale)
    labels = canvas(5 * scale, max(width, left.shape[2] + right.shape[2] + 4 * scale))
    paste(labels, left, 0, 0)
    paste(labels, right, 0, labels.shape[2] - right.shape[2])
    return stack([bar, labels], gap=scale)


def scalar_map(values: Tensor) -> tuple[Tensor, float, float]:
    """``[H, W]`` values coloured over their finite range; the image and the range."""
    low, high = value_range(values)
    if math.isnan(low):
        low = high = 0.0
    return colormap(values, low, high), low, high


def principal_rgb(features: Tensor, size: tuple[int, int]) -> Tensor:
    """``[C, h, w]`` features as their first three principal components in R, G and B.

    Each component is scaled to its own range over the map, its sign chosen so that its
    largest loading is positive (the picture does not flip between runtimes), and the result
    is upsampled bilinearly to ``size``. Fewer than three components leave the rest at 0.
    """
    channels, height, width = features.shape
    x = features.reshape(channels, -1).T.to(torch.float64)
    x = torch.nan_to_num(x - x.mean(dim=0), nan=0.0, posinf=0.0, neginf=0.0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:3]
    signs = components.gather(1, components.abs().argmax(dim=1, keepdim=True)).sign()
    projected = x @ (components * torch.where(signs == 0, 1.0, signs)).T
    low, high = projected.amin(dim=0), projected.amax(dim=0)
    scaled = (projected - low) / torch.where(high > low, high - low, 1.0)
    rgb = torch.zeros(height * width, 3, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    maps = rgb.T.reshape(1, 3, height, width).to(torch.float32)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return (maps[0].clamp(0, 1) * 255).round().to(torch.uint8)


def as_maps(features: Tensor, layout: str) -> Tensor:
    """One image's features as ``[C, h, w]``: NHWC maps moved, ViT tokens without the class
    token laid out on their square grid."""
    if layout == "nhwc":
        return features.movedim(-1, 0)
    if layout == "tokens":
        side = math.isqrt(features.shape[0] - 1)
        return features[1:].T.reshape(features.shape[1], side, side)
    return features


def output_picture(
    output: Tensor, head_channels: int | None, layout: str, size: tuple[int, int]
) -> Tensor:
    """The picture of one image's output: a class map with legend, a coloured map with its
    range, or the principal components of features (``head_channels`` None)."""
    if head_channels is None:
        return principal_rgb(as_maps(output, layout), size)
    if head_channels > 1:
        image, labels = class_map(output)
        return stack([image, legend(labels, image.shape[2])])
    image, low, high = scalar_map(output[0])
    return stack([image, scale_bar(low, high, image.shape[2])])


def unit_picture(
    mean: list[list[float]],
    low: list[list[float]] | None = None,
    high: list[list[float]] | None = None,
    cell: int = 48,
) -> Tensor:
    """A unit's TxT weights as coloured cells with their values: the means, and where given
    the minimum and maximum over channels beside them, all on one colour scale."""
    panels = [("mean", mean)] + ([("min", low), ("max", high)] if low and high else [])
    values = torch.tensor([m for _, m in panels], dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    bound = finite.abs().max().item() if finite.numel() else 0.0
    pictures = [_matrix(title, matrix, bound, cell) for title, matrix in panels]
    return stack(pictures, gap=cell // 4, vertical=False)


def _matrix(title: str, matrix: list[list[float]], bound: float, cell: int) -> Tensor:
    """One TxT panel: a title, then a cell per weight coloured by value and labelled with it."""
    size = len(matrix)
    grid = canvas(size * cell + 1, size * cell + 1, (160, 160, 160))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            rgb = _diverging(value, bound)
            ink = INK if sum(rgb) > 384 else BACKGROUND
            shown = f"{value:.2f}" if math.isfinite(value) and abs(value) < 100 else _number(value)
            label = text(shown, 2, ink, rgb)
            if label.shape[2] > cell - 5:
                label = text(shown, 1, ink, rgb)
            box = canvas(cell - 1, cell - 1, rgb)
            top, left = (cell - 1 - label.shape[1]) // 2, (cell - 1 - label.shape[2]) // 2
            paste(box, label, top, max(0, left))
            paste(grid, box, i * cell + 1, j * cell + 1)
    return stack([text(title, 2), grid], gap=4)


def _diverging(value: float, bound: float) -> tuple[int, int, int]:
    if not math.isfinite(value):
        return (0, 0, 0)
    strength = min(abs(value) / bound, 1.0) if bound > 0 else 0.0
    target = POSITIVE if value >= 0 else NEGATIVE
    return tuple(round(z + (t - z) * strength) for z, t in zip(ZERO, target, strict=True))


def write_png(image: Tensor, path: str | os.PathLike[str]) -> None:
    """Encode ``uint8 [3, H, W]`` as PNG and write it atomically (no partial file on failure)."""
    from torchvision.io import encode_png

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATION)
        data = encode_png(image.contiguous())
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.numpy().tobytes())


def write_unit_pictures(report: Inspection, folder: str | os.PathLike[str]) -> list[Path]:
    """Each stitched stage's unit as ``STAGE.png`` in ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    written = []
    for stage, unit in report.stages.items():
        spread = (unit.min, unit.max) if unit.channels else (None, None)
        path = folder / f"{stage}.png"
        write_png(unit_picture(unit.matrix, *spread), path)
        written.append(path)
    return written
