"""Images for prediction: find them, check their headers, decode them, apply a model's transform.

A file is judged by its bytes, not its name: PNG, JPEG and WebP are read. Its dimensions come
from its header before anything is decoded, so an image too large to hold in memory is refused
without decoding it (docs/design.md §11).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from crossstitch.config import Preprocess
from crossstitch.errors import CrossStitchError, first_line

# 100 megapixels: 300 MB decoded, about 1.2 GB while being resized; phone photos are 12 to 50.
MAX_PIXELS = 100_000_000
# Larger files are not read: a 100-megapixel PNG of noise is about 300 MB.
MAX_FILE_BYTES = 512 * 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: every 0xC0-0xCF but DHT (C4), JPG (C8) and DAC (CC).
JPEG_FRAMES = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}
DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class ImageProblem(Exception):
    """Why one image cannot be used; the others still can."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format, size, and whether it needs converting."""

    format: str
    width: int
    height: int
    grey: bool = False
    bits: int = 8


@dataclass(frozen=True)
class Skipped:
    """An image that was not used, and why."""

    path: Path
    reason: str


def image_format(head: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from a file's first bytes, else ``None``."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read_header(data: bytes) -> ImageHeader:
    """The format and dimensions from a file's header; ``ImageProblem`` otherwise.

    JPEG's size sits after its metadata segments, which are skipped by their lengths.
    """
    kind = image_format(data)
    if kind is None:
        raise ImageProblem("not a PNG, JPEG or WebP image")
    try:
        header = {"png": _png, "jpeg": _jpeg, "webp": _webp}[kind](data)
    except (struct.error, IndexError):
        header = None
    if header is None or header.width < 1 or header.height < 1:
        raise ImageProblem(f"damaged or truncated {kind.upper()} header")
    return header


def _png(data: bytes) -> ImageHeader | None:
    if data[12:16] != b"IHDR":
        return None
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    return ImageHeader("png", width, height, grey=colour in (0, 4), bits=bits)


def _jpeg(data: bytes) -> ImageHeader | None:
    """Walk the marker segments up to the first start-of-frame, which holds the size."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in JPEG_FRAMES:
            bits, height, width, components = struct.unpack(">BHHB", data[at + 4 : at + 10])
            return ImageHeader("jpeg", width, height, grey=components == 1, bits=bits)
        if marker in (0xD9, 0xDA) or length < 2:
            return None
        at += 2 + length
    return None


def _webp(data: bytes) -> ImageHeader | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", width, height)
    return None


def _is_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return image_format(f.read(16)) is not None
    except OSError:
        return True  # reported as unreadable when it is loaded


def find_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The image files named, and the PNG, JPEG and WebP files directly inside named folders.

    Folders are not searched recursively, and their other files are passed over; a named file
    is kept whatever it holds, so that a bad one is reported. A path that does not exist, or a
    folder without images, is an error.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p))
            if not inside:
                raise CrossStitchError(
                    f"folder {path} holds no PNG, JPEG or WebP image (subfolders are not searched)"
                )
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise CrossStitchError(f"image {path} does not exist")
    unique = dict.fromkeys(found)
    return list(unique)


@dataclass(frozen=True)
class Loaded:
    """An image ready for a model: its header, the cropped view and the normalised input."""

    path: Path
    header: ImageHeader
    view: Tensor
    input: Tensor

    @property
    def notes(self) -> list[str]:
        """What was converted to read the image as 8-bit RGB."""
        notes = []
        if self.header.grey:
            notes.append("greyscale, converted to RGB")
        if self.header.bits == 16:
            notes.append("16-bit, reduced to 8 bits")
        return notes


def decode(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[Tensor, ImageHeader]:
    """Read and decode one image as ``uint8 [3, H, W]`` RGB; ``ImageProblem`` says why not.

    The pixel count is checked from the header before decoding. Greyscale images are converted
    to RGB and alpha is dropped; 16-bit PNGs are scaled to 8 bits.
    """
    from torchvision.io import ImageReadMode, decode_image

    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageProblem(
                f"the file is {size / 1e6:,.0f} MB; images of at most "
                f"{MAX_FILE_BYTES / 1e6:,.0f} MB are read"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ImageProblem(f"unreadable ({exc.strerror or first_line(exc)})") from exc
    header = read_header(data)
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageProblem(
            f"{header.width}x{header.height} is {pixels / 1e6:,.0f} megapixels; at most "
            f"{max_pixels / 1e6:,.0f} are decoded"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=DEPRECATION)
            image = decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
    except RuntimeError as exc:
        raise ImageProblem(f"cannot be decoded: {_decoder_reason(exc)}") from exc
    if image.dtype == torch.uint16:
        eight = torch.empty(image.shape, dtype=torch.uint8)
        for channel, values in enumerate(image):  # one channel at a time: int32 is 4x larger
            eight[channel] = (values.to(torch.int32) + 128).div_(257, rounding_mode="floor")
        image = eight
    return image, header


def _decoder_reason(exc: BaseException) -> str:
    """torchvision's message without its source location: ``decode_png, file.cpp:79, why``."""
    text = first_line(exc)
    return text.rsplit(", ", 1)[-1] if ".cpp:" in text else text


def crop(image: Tensor, transform: Preprocess) -> Tensor:
    """``uint8 [3, H, W]`` resized and cropped as the model expects: ``uint8 [3, crop, crop]``.

    The shorter side is resized to ``transform.resize`` (antialiased), then the centre cropped.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(transform.interpolation)
    resized = F.resize(image, [transform.resize], interpolation=mode, antialias=True)
    return F.center_crop(resized, [transform.crop, transform.crop])


def normalize(view: Tensor, transform: Preprocess) -> Tensor:
    """A cropped ``uint8`` view as the model's ``float32`` input: in [0, 1], then mean and std."""
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    return (view.to(torch.float32) / 255 - mean) / std


def load(path: Path, transform: Preprocess, max_pixels: int = MAX_PIXELS) -> Loaded:
    """Decode one image and prepare it for a model; ``ImageProblem`` says why it cannot be."""
    image, header = decode(path, max_pixels)
    view = crop(image, transform)
    return Loaded(path, header, view, normalize(view, transform))


def batches(
    paths: list[Path], transform: Preprocess, size: int
) -> Iterator[tuple[list[Loaded], list[Skipped]]]:
    """Load ``paths`` ``size`` at a time: the images that could be used, and the skipped ones.

    Each image is decoded and cropped before the next is read, so memory holds one full image.
    """
    for start in range(0, len(paths), size):
        good, skipped = [], []
        for path in paths[start : start + size]:
            try:
                good.append(load(path, transform))
            except ImageProblem as exc:
                skipped.append(Skipped(path, str(exc)))
        yield good, skipped


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """A distinct file-name stem per image for its outputs: the image's own stem, or where two
    images share one (``a/x.jpg``, ``b/x.png``), their paths from the folder they share."""
    stems = {path: path.stem for path in paths}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    clashing = [p for p in paths if counts[p.stem] > 1]
    if clashing:
        resolved = [p.resolve() for p in clashing]
        common = Path(os.path.commonpath([p.parent for p in resolved]))
        for path, full in zip(clashing, resolved, strict=True):
            stems[path] = "_".join(full.relative_to(common).parts)
    taken: set[str] = set()
    for path, stem in stems.items():
        name, number = stem, 2
        while name in taken:
            name, number = f"{stem}-{number}", number + 1
        taken.add(name)
        stems[path] = name
    return stems
