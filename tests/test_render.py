"""Output a person can read: at 40, 80 and 120 columns, and piped, no value is ever cut."""

import json

import pytest

from crossstitch.cli import render
from crossstitch.stages import architectures

WIDTHS = [40, 80, 120]


@pytest.fixture(params=WIDTHS, ids=[f"{w}-columns" for w in WIDTHS])
def width(request, monkeypatch):
    monkeypatch.setattr(render.stdout, "width", request.param)
    return request.param


def _whole(out: str, values: list[str]) -> None:
    """Every value stands in the output as one word: not folded, not cut to an ellipsis."""
    words = set(out.split())
    missing = [v for v in values if v not in words]
    assert not missing, f"cut or missing: {missing}\n{out}"
    assert "…" not in out


def test_list_shows_every_name_whole(cli, width):
    code, out, err = cli("list")
    assert code == 0, err
    specs = architectures().values()
    names = [s.name for s in specs] + [w for s in specs for w in s.weights]
    _whole(out, names + [f"{st.channels}/{st.reduction}" for s in specs for st in s.stages])
    assert max(len(line) for line in out.splitlines()) <= width


def test_build_summary_shows_every_number_whole(cli, width):
    args = ["build", "resnet18", "-t", "segmentation,depth", "--stages", "layer1,layer4"]
    code, out, err = cli(*args, "--head", "segmentation=21")
    assert code == 0, err
    _whole(out, ["layer1", "layer2", "56×56", "0.15", "2,048", "segmentation", "21×224×224"])
    assert "not stitched" in " ".join(out.split())


@pytest.fixture
def artifacts(exported, tmp_path):
    """The exported files linked into the working folder, so their names stay short."""
    folder, _ = exported
    for path in folder.iterdir():
        (tmp_path / path.name).symlink_to(path)
    return tmp_path


def test_verification_tables_show_every_number_and_verdict_whole(cli, artifacts, width):
    code, out, err = cli("verify", "crossstitch.onnx", "--json")
    assert code == 0, err
    rows = json.loads(out)["comparison"]["outputs"]
    code, out, err = cli("verify", "crossstitch.onnx")
    assert code == 0, err
    values = [f"{r['max_abs_error']:.3g}" for r in rows] + [f"{r['tolerance']:.3g}" for r in rows]
    _whole(out, [*values, "seg", "depth", "PASS", "3×512×4×5"])
    assert "allowed = atol + rtol" in " ".join(out.split())
    assert "max rel err" not in out


def test_export_tables_show_every_file_and_verdict_whole(cli, artifacts, width):
    code, out, err = cli("export", "--format", "torchscript", "-o", "again.torchscript.pt")
    assert code == 0, err
    _whole(out, ["again.torchscript.pt", "traced", "PASS", "torchscript"])
    assert "allowed = atol + rtol" in " ".join(out.split())


def test_inspect_shows_every_weight_and_share_whole(cli, artifacts, width):
    code, out, err = cli("inspect", "crossstitch.safetensors", "--json")
    layer1 = json.loads(out)["stages"]["layer1"]
    code, out, err = cli("inspect", "crossstitch.safetensors")
    assert code == 0, err
    values = [f"{v:.3f}" for row in layer1["matrix"] for v in row]
    _whole(out, [*values, "seg", "depth", "2×2×64", f"{layer1['sharing'][0]:.1%}"])


def test_a_narrow_terminal_gets_one_value_per_line_instead_of_cut_cells(cli, width):
    code, out, err = cli("build", "resnet18", "-t", "a,b", "--input-size", "64")
    assert code == 0, err
    vertical = "channels: 64" in out
    assert vertical == (width == 40), out
