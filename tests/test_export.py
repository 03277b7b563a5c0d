"""Exported artifacts: each format round-trips, verification catches tampering, writes are safe."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import crossstitch
from crossstitch.exporters import onnx as onnx_format
from crossstitch.exporters.common import ExportOptions
from crossstitch.exporters.formats import FORMATS, detect
from crossstitch.exporters.pipeline import Inputs, compare_artifact, export_verified
from helpers import build, randomize_units


def test_every_format_is_written_verified_and_named_beside_the_model(exported):
    folder, result = exported
    artifacts = {a["format"]: a for a in result["artifacts"]}
    assert set(artifacts) == {"onnx", "torchscript", "pt2"}
    for fmt, name in [
        ("onnx", "crossstitch.onnx"),
        ("torchscript", "crossstitch.torchscript.pt"),
        ("pt2", "crossstitch.pt2"),
    ]:
        artifact = artifacts[fmt]
        assert artifact["path"] == str(folder / name) and artifact["written"]
        assert (folder / name).is_file() and detect(folder / name) == fmt
        inputs = artifact["inputs"]
        assert (inputs["batch"], inputs["height"], inputs["width"]) == (3, 128, 160)
        assert all(o["passed"] for o in artifact["comparison"]["outputs"])
    assert sorted(p.name for p in folder.iterdir()) == [
        "crossstitch.onnx",
        "crossstitch.pt2",
        "crossstitch.safetensors",
        "crossstitch.torchscript.pt",
    ]


def test_onnx_file_keeps_the_contract(exported):
    folder, _ = exported
    path = folder / "crossstitch.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["seg", "depth"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["crossstitch.tasks"] == "seg,depth"
    assert props["crossstitch.arch"] == "resnet18"
    assert json.loads(props["crossstitch.config"])["crossstitch"] == crossstitch.__version__
    assert not (folder / "crossstitch.onnx.data").exists()


def test_torchscript_runs_where_crossstitch_cannot_be_imported(exported):
    folder, _ = exported
    script = (
        "import sys; sys.modules['crossstitch'] = None\n"
        "import torch\n"
        "try:\n    import crossstitch\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('crossstitch importable')\n"
        f"m = torch.jit.load({str(folder / 'crossstitch.torchscript.pt')!r})\n"
        "out = m(torch.randn(1, 3, 80, 112))\n"
        "assert isinstance(out, dict), type(out)\n"
        "print(sorted((k, tuple(v.shape)) for k, v in out.items()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('depth', (1, 512, 3, 4)), ('seg', (1, 512, 3, 4))]"


def test_pt2_loads_with_torch_export(exported):
    folder, _ = exported
    program = torch.export.load(folder / "crossstitch.pt2")
    out = program.module()(torch.randn(1, 3, 70, 90))
    assert set(out) == {"seg", "depth"} and out["seg"].shape == (1, 512, 3, 3)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_three_tasks_round_trip_at_another_size(tmp_path, fmt):
    model = build(tasks=["seg", "depth", "normals"], granularity="layer")
    randomize_units(model, seed=3)
    result = export_verified(
        model, fmt, tmp_path / f"m{FORMATS[fmt].SUFFIX}", (64, 80), ExportOptions()
    )
    assert result.written and result.passed
    assert [o.name for o in result.comparison.outputs] == ["seg", "depth", "normals"]
    artifact = FORMATS[fmt].load(result.path)
    again = compare_artifact(artifact, result.path, model, Inputs(1, 97, 65, seed=9), 1e-4, 1e-3)
    assert again.passed and again.outputs[0].shape == (1, 512, 4, 3)


def test_static_export_fixes_the_shape(tmp_path):
    result = export_verified(
        build(), "onnx", tmp_path / "s.onnx", (64, 64), ExportOptions(dynamic=False)
    )
    assert result.passed
    assert (result.inputs.batch, result.inputs.height) == (2, 64)
    dims = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 64, 64]


def test_large_models_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 0)
    result = export_verified(build(), "onnx", tmp_path / "big.onnx", (64, 64), ExportOptions())
    assert result.details["external_data"] and result.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 1_000_000
    path = tmp_path / "big.onnx"
    again = compare_artifact(
        onnx_format.load(path), path, build(), Inputs(1, 64, 64, 0), 1e-4, 1e-3
    )
    assert again.passed


def test_failed_verification_leaves_nothing_unless_asked(tmp_path):
    previous = tmp_path / "m.onnx"
    previous.write_bytes(b"previous good export")
    options = ExportOptions()
    failed = export_verified(build(), "onnx", previous, (64, 64), options, atol=0.0, rtol=0.0)
    assert not failed.passed and not failed.written
    assert previous.read_bytes() == b"previous good export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    kept = export_verified(
        build(), "onnx", previous, (64, 64), options, atol=0.0, rtol=0.0, keep_failed=True
    )
    assert kept.written and detect(previous) == "onnx"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_interrupted_export_cleans_up_and_keeps_the_previous_file(tmp_path, monkeypatch, fmt):
    previous = tmp_path / "m.out"
    previous.write_bytes(b"previous good export")

    def interrupted(model, path, example, options):
        Path(path).write_bytes(b"half an artifact")
        raise KeyboardInterrupt

    monkeypatch.setattr(FORMATS[fmt], "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_verified(build(), fmt, previous, (64, 64), ExportOptions())
    assert [p.name for p in tmp_path.iterdir()] == ["m.out"]
    assert previous.read_bytes() == b"previous good export"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_heads_give_input_sized_outputs_in_every_format(tmp_path, fmt):
    model = build(tasks=["seg", "depth", "normals"], heads={"seg": 5, "depth": 1})
    randomize_units(model)
    result = export_verified(
        model, fmt, tmp_path / f"m{FORMATS[fmt].SUFFIX}", (64, 64), ExportOptions()
    )
    assert result.written and result.passed
    artifact = FORMATS[fmt].load(result.path)
    x = Inputs(1, 72, 100, seed=4).tensor()
    shapes = {name: tuple(out.shape) for name, out in artifact.run(x).items()}
    assert shapes == {"seg": (1, 5, 72, 100), "depth": (1, 1, 72, 100), "normals": (1, 512, 3, 4)}
    again = compare_artifact(artifact, result.path, model, Inputs(2, 96, 80, seed=5), 1e-4, 1e-3)
    assert again.passed


def test_onnx_head_outputs_have_dynamic_batch_height_and_width(tmp_path):
    path = tmp_path / "m.onnx"
    export_verified(build(heads={"seg": 3}), "onnx", path, (64, 64), ExportOptions(), verify=False)
    proto = onnx.load(str(path))
    image_dims = proto.graph.input[0].type.tensor_type.shape.dim
    seg_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert seg_dims[1].dim_value == 3
    assert [d.dim_param for d in seg_dims] == [
        image_dims[0].dim_param,
        "",
        image_dims[2].dim_param,
        image_dims[3].dim_param,
    ]
    assert all(image_dims[i].dim_param for i in (0, 2, 3))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["crossstitch.heads"] == "seg=3"
    with pytest.raises(crossstitch.CrossStitchError, match=r"heads is \{'seg': 3\} there"):
        compare_artifact(onnx_format.load(path), path, build(), Inputs(1, 64, 64, 0), 1e-4, 1e-3)
