"""`crossstitch inspect`: the numbers shown are exactly those stored in the file."""

import json
import shutil

import onnx
import pytest
import torch

import crossstitch
from crossstitch.exporters import onnx as onnx_format
from crossstitch.exporters.common import ExportOptions
from crossstitch.exporters.pipeline import export_verified
from crossstitch.inspection import unit_mixing
from helpers import build


def _f32(value: float) -> float:
    """The float a float32 tensor stores for ``value``, as JSON carries it."""
    return torch.tensor(value, dtype=torch.float32).item()


def test_channel_units_report_mean_min_and_max_of_the_values_set(cli, tmp_path):
    model = build(tasks=["seg", "depth"], stages=["layer1", "layer3"])
    unit = model.cross_stitch["layer1"]
    unit["seg", "seg"][:] = torch.linspace(0.5, 1.5, 64)
    unit["seg", "depth"][:] = 0.0
    unit["seg", "depth"][7] = -2.0
    unit["depth", "seg"][:] = 0.25
    unit["depth", "depth"][:] = torch.arange(64) / 64
    crossstitch.save(model, tmp_path / "m.pt")

    code, out, err = cli("inspect", "m.pt", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tasks"] == ["seg", "depth"] and result["format"] == "checkpoint"
    assert list(result["stages"]) == ["layer1", "layer3"]
    layer1 = result["stages"]["layer1"]
    weight = unit.weight.detach().to(torch.float64)
    assert layer1["matrix"] == weight.mean(dim=-1).tolist()
    assert layer1["min"] == [[0.5, -2.0], [0.25, 0.0]]
    assert layer1["max"] == [[1.5, 0.0], [0.25, 63 / 64]]
    assert layer1["min"] == unit.weight.detach().amin(dim=-1).tolist()
    assert layer1["channels"] == 64
    seg_row = weight[0].abs().sum(dim=-1)
    assert layer1["sharing"][0] == pytest.approx((seg_row[1] / seg_row.sum()).item(), rel=1e-12)
    layer3 = result["stages"]["layer3"]
    assert layer3["min"] == layer3["max"] == [[_f32(0.9), _f32(0.1)], [_f32(0.1), _f32(0.9)]]
    assert layer3["sharing"] == pytest.approx([0.1, 0.1], rel=1e-6)
    table = {row["name"]: row for row in result["stage_table"]}
    assert table["layer1"] == {"name": "layer1", "channels": 64, "reduction": 4}
    assert "layer2" in table and "layer2" not in result["stages"]
    assert result["config"]["arch"] == "resnet18"


def test_layer_units_report_each_value_as_matrix_min_and_max(cli, tmp_path):
    model = build(tasks=["a", "b", "c"], granularity="layer")
    values = torch.tensor([[1.0, -0.5, 0.0], [0.125, 0.3, 0.7], [2.0, 0.0, 0.0]])
    model.cross_stitch["layer2"].weight.data.copy_(values)
    crossstitch.save(model, tmp_path / "m.pt")
    code, out, _ = cli("inspect", "m.pt", "--json")
    assert code == 0
    layer2 = json.loads(out)["stages"]["layer2"]
    assert layer2["matrix"] == layer2["min"] == layer2["max"] == values.tolist()
    assert layer2["channels"] is None
    assert layer2["sharing"] == pytest.approx([0.5 / 1.5, 0.825 / 1.125, 1.0], rel=1e-6)


def test_sharing_is_undefined_for_a_row_of_zeros():
    mixing = unit_mixing(torch.tensor([[0.0, 0.0], [0.5, 0.5]]))
    assert mixing.sharing[0] != mixing.sharing[0] and mixing.sharing[1] == 0.5


def test_human_output_draws_each_unit_as_a_heatmap(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    model = build(tasks=["seg", "depth", "normals", "edges", "parts"], heads={"seg": 21})
    model.cross_stitch["layer4"]["edges", "parts"][:] = -0.75
    crossstitch.save(model, tmp_path / "m.pt")
    code, out, err = cli("inspect", "m.pt")
    assert code == 0, err
    for text in [
        "resnet18 × 5 tasks",
        "seg → 21 channels",
        "layer4: A[to, from], 512 channels",
        "-0.750",
        "0.900",
        "10.0%",
        "sharing",
    ]:
        assert text in out, text
    assert max(len(line) for line in out.splitlines()) <= 80


def test_onnx_file_reports_the_same_numbers_as_its_checkpoint(cli, exported, tmp_path):
    folder, _ = exported
    shutil.copy(folder / "crossstitch.onnx", tmp_path / "m.onnx")
    shutil.copy(folder / "crossstitch.safetensors", tmp_path / "m.safetensors")
    from_onnx = json.loads(cli("inspect", "m.onnx", "--json")[1])
    from_checkpoint = json.loads(cli("inspect", "m.safetensors", "--json")[1])
    assert from_onnx["format"] == "onnx"
    for key in ("tasks", "stages", "stage_table"):
        assert from_onnx[key] == from_checkpoint[key]
    assert from_onnx["config"]["tasks"] == ["seg", "depth"]


def test_onnx_values_are_the_ones_the_graph_runs(cli, exported, tmp_path):
    folder, _ = exported
    path = tmp_path / "m.onnx"
    shutil.copy(folder / "crossstitch.onnx", path)
    shutil.copy(folder / "crossstitch.safetensors", tmp_path / "crossstitch.safetensors")
    proto = onnx.load(str(path))
    (tensor,) = [t for t in proto.graph.initializer if t.name == "cross_stitch.layer2.weight"]
    values = onnx.numpy_helper.to_array(tensor).copy()
    values[0, 1] = 3.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(proto, str(path))
    layer2 = json.loads(cli("inspect", "m.onnx", "--json")[1])["stages"]["layer2"]
    assert layer2["min"][0][1] == layer2["max"][0][1] == 3.0
    code, out, _ = cli("verify", "m.onnx")
    assert code == 1 and "FAIL" in out


def test_onnx_units_of_exactly_one_are_read_from_external_data(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 0)
    model = build(granularity="layer", alpha=1.0, beta=1.0)
    result = export_verified(model, "onnx", tmp_path / "m.onnx", (64, 64), ExportOptions())
    assert result.passed and (tmp_path / "m.onnx.data").is_file()
    code, out, err = cli("inspect", "m.onnx", "--json")
    assert code == 0, err
    stages = json.loads(out)["stages"]
    assert list(stages) == ["layer1", "layer2", "layer3", "layer4"]
    assert all(s["matrix"] == [[1.0, 1.0], [1.0, 1.0]] for s in stages.values())


def test_onnx_without_named_unit_weights_is_refused(cli, exported, tmp_path):
    folder, _ = exported
    proto = onnx.load(str(folder / "crossstitch.onnx"))
    for tensor in proto.graph.initializer:
        if tensor.name.startswith("cross_stitch."):
            old, tensor.name = tensor.name, f"folded_{tensor.name.replace('.', '_')}"
            for node in proto.graph.node:
                node.input[:] = [tensor.name if i == old else i for i in node.input]
    onnx.save(proto, str(tmp_path / "m.onnx"))
    code, out, err = cli("inspect", "m.onnx")
    assert code == 2 and out == ""
    assert "cross_stitch.<stage>.weight" in err and "inspect the checkpoint" in err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("crossstitch.pt2", "pt2 artifact; inspect reads checkpoints and ONNX files"),
        ("crossstitch.torchscript.pt", "torchscript artifact"),
    ],
)
def test_other_artifacts_are_refused_naming_what_inspect_reads(cli, exported, name, expected):
    folder, _ = exported
    code, out, err = cli("inspect", str(folder / name))
    assert code == 2 and out == ""
    assert err.startswith("Error: ") and expected in err


def _damage_unit(path):
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["cross_stitch.layer1.weight"] = torch.zeros(2, 2, 3)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.write_bytes(b"\x00not a model" * 50), "is neither a crossstitch checkpoint"),
        (lambda p: torch.save(build().state_dict(), p), "not a crossstitch checkpoint"),
        (
            lambda p: (crossstitch.save(build(), p), _damage_unit(p)),
            "the unit after layer1 has shape [2, 2, 3]",
        ),
    ],
)
def test_foreign_and_damaged_files_are_one_error_line(cli, tmp_path, write, expected):
    write(tmp_path / "m.pt")
    code, out, err = cli("inspect", "m.pt")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0]


def test_missing_file_names_the_path(cli):
    code, _, err = cli("inspect")
    assert code == 2 and "crossstitch.safetensors does not exist" in err
