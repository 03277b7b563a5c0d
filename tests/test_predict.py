"""`crossstitch predict` and `inspect --png`: real images in, .npy and readable .png out."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy
import onnx
import pytest
import torch
from onnx import numpy_helper
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png
from typer.testing import CliRunner

import crossstitch
from crossstitch.cli.app import app
from crossstitch.config import Preprocess
from crossstitch.errors import CrossStitchError
from crossstitch.exporters.compare import compare_outputs
from crossstitch.exporters.predict import Runner, merge, run_batch
from crossstitch.images import (
    ImageProblem,
    decode,
    find_images,
    output_stems,
    read_header,
)
from crossstitch.visualize import (
    SCALE,
    as_maps,
    class_map,
    colormap,
    output_picture,
    principal_rgb,
    write_png,
)
from helpers import build, randomize_units

SMALL = Preprocess(resize=72, crop=64, source="test transform")


def picture(height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """A drawn RGB image: a gradient with a bright square, so every model sees structure."""
    ys = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    image = torch.stack([ys, xs, 255 - xs]).clone()
    offset = 4 + seed
    image[:, offset : offset + height // 3, offset : offset + width // 3] = 250
    return image.round().to(torch.uint8)


def write(path: Path, data: torch.Tensor | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.numpy().tobytes())
    return path


def png_bytes(width: int, height: int, bits: int = 8, colour: int = 2, rows: bytes = b"") -> bytes:
    """A PNG written by hand: torchvision encodes neither 16-bit images nor huge headers."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(rows)) if rows else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def png16(width: int = 20, height: int = 16) -> bytes:
    """A 16-bit RGB PNG whose red channel ramps over the full 16-bit range."""
    rows = b""
    for y in range(height):
        value = y * 65535 // (height - 1)
        rows += b"\x00" + struct.pack(">HHH", value, 0, 65535) * width
    return png_bytes(width, height, bits=16, colour=2, rows=rows)


def read_png(path: Path) -> torch.Tensor:
    return decode_image(str(path), mode=ImageReadMode.RGB)


@pytest.fixture(scope="module")
def heads_checkpoint(tmp_path_factory) -> Path:
    """ResNet-18 with a 3-class head and a 1-channel head, recording a 64 px transform."""
    model = build(heads={"seg": 3, "depth": 1})
    randomize_units(model)
    model.config = dataclasses.replace(model.config, preprocess=SMALL)
    path = tmp_path_factory.mktemp("heads") / "model.safetensors"
    crossstitch.save(model, path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    write(folder / "a.jpg", encode_jpeg(picture()))
    write(folder / "b.png", encode_png(picture(40, 40, seed=3)))
    return folder


def colours(image: torch.Tensor) -> set[tuple[int, ...]]:
    return set(map(tuple, image.flatten(1).T.tolist()))


# --- library: headers, files, pictures ---


def test_headers_give_format_size_and_conversion():
    jpeg = read_header(encode_jpeg(picture(30, 50)).numpy().tobytes())
    assert (jpeg.format, jpeg.width, jpeg.height, jpeg.grey) == ("jpeg", 50, 30, False)
    grey = read_header(encode_png(picture(7, 9)[:1]).numpy().tobytes())
    assert (grey.format, grey.width, grey.height, grey.grey) == ("png", 9, 7, True)
    deep = read_header(png16())
    assert (deep.bits, deep.grey) == (16, False)
    with pytest.raises(ImageProblem, match="not a PNG, JPEG or WebP"):
        read_header(b"GIF89a" + bytes(20))
    with pytest.raises(ImageProblem, match="truncated PNG header"):
        read_header(png16()[:14])


def test_webp_is_read(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    features = pytest.importorskip("PIL.features")
    if not features.check("webp"):
        pytest.skip("this Pillow cannot write WebP (torchvision has no WebP encoder)")
    buffer = io.BytesIO()
    Image.fromarray(picture(12, 20).permute(1, 2, 0).numpy()).save(buffer, "WEBP", lossless=True)
    path = write(tmp_path / "x.webp", buffer.getvalue())
    pixels, header = decode(path)
    assert (header.format, header.width, header.height) == ("webp", 20, 12)
    assert torch.equal(pixels, picture(12, 20))


def test_huge_image_is_refused_from_its_header_alone(tmp_path):
    path = write(tmp_path / "huge.png", png_bytes(20000, 20000))
    with pytest.raises(ImageProblem, match="20000x20000 is 400 megapixels"):
        decode(path)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    pixels, header = decode(write(tmp_path / "deep.png", png16()))
    assert header.bits == 16 and pixels.dtype == torch.uint8
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and (pixels[2] == 255).all()


def test_find_images_reads_folders_by_content(tmp_path, photos):
    write(photos / "notes.txt", b"not an image")
    write(photos / "renamed.dat", encode_png(picture(8, 8)))
    (photos / "sub").mkdir()
    write(photos / "sub" / "c.png", encode_png(picture(8, 8)))
    assert [p.name for p in find_images([photos])] == ["a.jpg", "b.png", "renamed.dat"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CrossStitchError, match="holds no PNG, JPEG or WebP image"):
        find_images([empty])
    with pytest.raises(CrossStitchError, match="does not exist"):
        find_images([tmp_path / "missing.jpg"])


def test_output_stems_never_collide():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("b/y.png")]
    stems = output_stems(paths)
    assert stems[Path("b/y.png")] == "y"
    assert len(set(stems.values())) == 3
    assert stems[Path("a/x.jpg")] == "a_x.jpg"


def test_two_class_map_has_exactly_two_colours():
    logits = torch.zeros(5, 16, 24)
    logits[3, :, :10] = 1  # class 3 on the left, class 1 elsewhere
    logits[1, :, 10:] = 1
    image, labels = class_map(logits)
    assert image.shape == (3, 16, 24) and image.dtype == torch.uint8
    assert labels.unique().tolist() == [1, 3]
    assert len(colours(image)) == 2
    assert colours(image[:, :, :10]) != colours(image[:, :, 10:])
    with_legend = output_picture(logits, 5, "nchw", (16, 24))
    assert torch.equal(with_legend[:, :16, :24], image)
    assert with_legend.shape[1] > 16  # the legend under the map


def test_colormap_spans_the_scale_and_marks_nan():
    values = torch.linspace(-3, 5, 40).view(1, 40).expand(6, 40).clone()
    values[0, 0] = float("nan")
    image = colormap(values, -3, 5)
    assert image.shape == (3, 6, 40)
    assert tuple(image[:, 1, 0].tolist()) == SCALE[0]
    assert tuple(image[:, 1, -1].tolist()) == SCALE[-1]
    assert image[:, 0, 0].tolist() == [0, 0, 0]
    picture_with_range = output_picture(values.unsqueeze(0), 1, "nchw", (6, 40))
    assert picture_with_range.shape[1] > 6 and picture_with_range.shape[2] == 40


def test_principal_components_separate_regions():
    features = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    features[:4, :, :4] += 5  # the left half differs along one direction
    image = principal_rgb(features, (32, 32))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    left, right = image[0, :, :12].float().mean(), image[0, :, 20:].float().mean()
    assert abs(left - right) > 200
    # As between runtimes: tiny differences must not flip a component's sign.
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(1)) * 1e-5
    again = principal_rgb(features + noise, (32, 32))
    assert (image[0].int() - again[0].int()).abs().max() <= 1


def test_features_of_every_layout_become_maps():
    maps = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    assert torch.equal(as_maps(maps.movedim(0, -1), "nhwc"), maps)
    tokens = torch.cat([torch.full((1, 2), -1.0), maps.flatten(1).T])  # class token first
    assert torch.equal(as_maps(tokens, "tokens"), maps)
    assert torch.equal(as_maps(maps, "nchw"), maps)


def test_png_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    write_png(picture(8, 8), target)
    before = target.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_png(picture(9, 9), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.png"]


def test_a_fixed_batch_is_filled_up_and_cut_back():
    seen = []

    def run(x):
        seen.append(x.shape[0])
        return {"y": x.sum(dim=(1, 2, 3), keepdim=True)}

    runner = Runner(Path("m"), "onnx", build().config, run, batch=2)
    x = torch.randn(3, 3, 4, 4)
    out = run_batch(runner, x)
    assert seen == [2, 2]
    assert torch.allclose(out["y"].flatten(), x.sum(dim=(1, 2, 3)))


def test_batch_comparisons_merge_into_the_whole_one():
    generator = torch.Generator().manual_seed(0)
    want = {"seg": torch.randn(5, 3, 4, 4, generator=generator) * 10}
    got = {"seg": want["seg"] + torch.randn(5, 3, 4, 4, generator=generator) * 1e-3}
    whole = compare_outputs(got, want, 1e-4, 1e-3)
    parts = [
        compare_outputs({"seg": got["seg"][s]}, {"seg": want["seg"][s]}, 1e-4, 1e-3)
        for s in (slice(0, 2), slice(2, 5))
    ]
    (merged,), (expected,) = merge(parts).outputs, whole.outputs
    assert merged.shape == expected.shape == (5, 3, 4, 4)
    for field in ("max_abs_error", "mean_abs_error", "max_rel_error", "tolerance", "passed"):
        assert getattr(merged, field) == pytest.approx(getattr(expected, field)), field


# --- the command ---


def test_predict_writes_maps_per_image_and_head(cli, heads_checkpoint, photos):
    code, out, err = cli("predict", str(photos), "--model", str(heads_checkpoint), "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["runtime"] == "eager" and payload["skipped"] == []
    assert payload["preprocess"]["source"] == "test transform"
    rows = {(Path(r["image"]).name, r["output"]): r for r in payload["predictions"]}
    assert sorted(rows) == [
        ("a.jpg", "depth"),
        ("a.jpg", "seg"),
        ("b.png", "depth"),
        ("b.png", "seg"),
    ]
    seg = rows["a.jpg", "seg"]
    array = numpy.load(seg["npy"], allow_pickle=False)
    assert array.shape == (3, 64, 64) == tuple(seg["shape"])
    assert array.min() == pytest.approx(seg["min"]) and array.max() == pytest.approx(seg["max"])
    seg_png = read_png(Path(seg["png"]))
    assert seg_png.shape[1:] != (64, 64) and seg_png.shape[2] == 64
    assert len(colours(seg_png[:, :64, :64])) <= 3  # at most one colour per class
    depth_png = read_png(Path(rows["a.jpg", "depth"]["png"]))
    assert depth_png.shape[2] == 64 and depth_png.shape[1] > 64
    assert sorted(os.listdir("predictions")) == sorted(
        f"{s}.{o}.{e}" for s in "ab" for o in ("seg", "depth") for e in ("npy", "png")
    )


def test_predict_table_and_imagenet_default(cli, tmp_path, photos):
    model = build()
    crossstitch.save(model, tmp_path / "plain.safetensors")
    code, out, err = cli("predict", str(photos / "b.png"), "--model", "plain.safetensors")
    assert code == 0, err
    assert "ImageNet defaults" in out and "b.png" in out
    assert "512×7×7" in out or "512x7x7" in out  # features at 224 / 32


@pytest.fixture(scope="module")
def eager_outputs(exported, tmp_path_factory) -> tuple[Path, Path]:
    """The drawn image and what the exported fixture's checkpoint predicts for it."""
    folder = tmp_path_factory.mktemp("eager")
    image = write(folder / "a.jpg", encode_jpeg(picture()))
    result = CliRunner().invoke(
        app,
        ["predict", str(image), "--model", exported[1]["model"], "-o", str(folder / "want")],
    )
    assert result.exit_code == 0, result.stderr
    return image, folder / "want"


@pytest.mark.parametrize("runtime", ["onnx", "pt2", "torchscript"])
def test_every_runtime_gives_the_eager_outputs(cli, exported, eager_outputs, runtime):
    image, want_folder = eager_outputs
    artifact = next(a["path"] for a in exported[1]["artifacts"] if a["format"] == runtime)
    code, out, err = cli("predict", str(image), "--model", artifact, "--runtime", runtime, "--json")
    assert code == 0, err
    rows = json.loads(out)["predictions"]
    assert [r["output"] for r in rows] == ["seg", "depth"]
    for row in rows:
        got = numpy.load(row["npy"])
        want = numpy.load(want_folder / Path(row["npy"]).name)
        assert got.shape == want.shape == (512, 7, 7)
        assert numpy.abs(got - want).max() <= 1e-4 + 1e-3 * numpy.abs(want).max()
        assert read_png(Path(row["png"])).shape == (3, 224, 224)  # PCA of features, upsampled


def test_runtime_must_match_the_file(cli, exported, photos):
    _, payload = exported
    onnx_path = next(a["path"] for a in payload["artifacts"] if a["format"] == "onnx")
    code, _, err = cli("predict", str(photos), "--model", onnx_path, "--runtime", "pt2")
    assert code == 2
    assert "runs with --runtime onnx, not --runtime pt2" in err
    assert not Path("predictions").exists()


def test_compare_passes_on_the_artifact_and_fails_when_tampered(cli, exported, photos, tmp_path):
    _, payload = exported
    checkpoint = payload["model"]
    onnx_path = next(a["path"] for a in payload["artifacts"] if a["format"] == "onnx")
    args = ("predict", str(photos), "--compare", "--against", checkpoint)
    code, out, err = cli(*args, "--model", onnx_path)
    assert code == 0, err
    assert "PASS" in out and "FAIL" not in out

    proto = onnx.load(onnx_path)
    for tensor in proto.graph.initializer:
        if tensor.name == "cross_stitch.layer2.weight":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, tensor.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, tampered)
    code, out, err = cli(*args, "--model", str(tampered), "--json")
    assert code == 1, err
    result = json.loads(out)
    assert result["passed"] is False
    assert any(not o["passed"] for o in result["comparison"]["outputs"])


def test_compare_needs_an_artifact(cli, heads_checkpoint, photos):
    code, _, err = cli("predict", str(photos), "--model", str(heads_checkpoint), "--compare")
    assert code == 2
    assert "give the artifact as --model" in err


def test_bad_images_are_skipped_and_the_rest_written(cli, heads_checkpoint, photos, tmp_path):
    good = photos / "a.jpg"
    png, jpeg = (encode(picture()).numpy().tobytes() for encode in (encode_png, encode_jpeg))
    broken = write(tmp_path / "broken.png", png[: len(png) // 2])
    cut = write(tmp_path / "cut.jpg", jpeg[: len(jpeg) // 2])
    text = write(tmp_path / "text.png", b"hello, not an image")
    huge = write(tmp_path / "huge.png", png_bytes(20000, 20000))
    grey = write(tmp_path / "grey.png", encode_png(picture()[:1]))
    deep = write(tmp_path / "deep.png", png16())
    images = [good, broken, cut, text, huge, grey, deep]
    code, out, err = cli("predict", *map(str, images), "--model", str(heads_checkpoint))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 4
    assert "broken.png skipped: cannot be decoded" in err
    assert "cut.jpg skipped: cannot be decoded" in err
    assert "text.png skipped: not a PNG, JPEG or WebP image" in err
    assert "huge.png skipped: 20000x20000 is 400 megapixels" in err
    shown = " ".join(out.split())
    assert "grey.png: greyscale, converted to RGB" in shown
    assert "deep.png: 16-bit, reduced to 8 bits" in shown
    written = os.listdir("predictions")
    assert {"a.seg.png", "grey.seg.png", "deep.depth.npy"} <= set(written)
    assert not any(name.startswith(("broken", "cut", "text", "huge", ".")) for name in written)


def test_nothing_usable_is_an_error(cli, heads_checkpoint, tmp_path):
    text = write(tmp_path / "text.jpg", b"plain text")
    code, _, err = cli("predict", str(text), "--model", str(heads_checkpoint))
    assert code == 2
    assert "Error: no image could be used; nothing was written" in err
    assert not Path("predictions").exists()


def test_bad_folders_are_refused_before_any_work(cli, heads_checkpoint, photos, tmp_path):
    write(tmp_path / "taken", b"a file")
    code, _, err = cli("predict", str(photos), "--model", str(heads_checkpoint), "-o", "taken")
    assert code == 2 and "output folder taken is a file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("predict", str(empty), "--model", str(heads_checkpoint))
    assert code == 2 and "holds no PNG, JPEG or WebP image" in err
    shutil.copy(photos / "a.jpg", tmp_path / "empty" / "a.jpg")
    code, _, err = cli("predict", "empty", "--model", str(heads_checkpoint), "-o", "empty")
    assert code == 2 and "lies in the output folder" in err
    assert os.listdir(empty) == ["a.jpg"]


def test_inspect_png_writes_one_picture_per_stitched_stage(cli, heads_checkpoint, exported):
    code, out, err = cli("inspect", str(heads_checkpoint), "--png", "units", "--json")
    assert code == 0, err
    written = json.loads(out)["png"]
    assert [Path(p).name for p in written] == [f"layer{i}.png" for i in range(1, 5)]
    channel = read_png(Path(written[0]))
    model = build(granularity="layer", stages="layer2")
    crossstitch.save(model, Path("layer.safetensors"))
    code, out, err = cli("inspect", "layer.safetensors", "--png", "units")
    assert code == 0, err
    layer = read_png(Path("units/layer2.png"))
    assert layer.shape[1] == channel.shape[1] and layer.shape[2] < channel.shape[2] / 2
    onnx_path = next(a["path"] for a in exported[1]["artifacts"] if a["format"] == "onnx")
    code, out, err = cli("inspect", onnx_path, "--png", "from-onnx")
    assert code == 0, err
    code, out, err = cli("inspect", exported[1]["model"], "--png", "from-checkpoint")
    assert code == 0, err
    for stage in ("layer1", "layer4"):
        from_onnx = read_png(Path("from-onnx") / f"{stage}.png")
        assert torch.equal(from_onnx, read_png(Path("from-checkpoint") / f"{stage}.png"))
