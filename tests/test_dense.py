"""Dense prediction options: output stride by dilation, and every stitched stage's features."""

import json

import onnx
import pytest
import torch
import torchvision
from torch import nn

import crossstitch
from crossstitch import CrossStitchError, check_parity
from crossstitch.dilation import dilate_resnet
from crossstitch.exporters.pipeline import check_compatible
from crossstitch.inspection import inspect_checkpoint
from crossstitch.summary import summarize
from helpers import SMALL, build, image, randomize_units

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _trunk(model: torchvision.models.ResNet) -> nn.Sequential:
    """The classifier up to ``layer4``: the features whose resolution dilation keeps."""
    names = ["conv1", "bn1", "relu", "maxpool", *STAGES]
    return nn.Sequential(*(getattr(model, name) for name in names))


def _conv_settings(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (m.stride, m.dilation, m.padding)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@pytest.mark.parametrize(
    ("arch", "output_stride"),
    [("resnet50", 16), ("resnet50", 8), ("resnext50_32x4d", 8)],
)
def test_bottleneck_dilation_equals_torchvisions(arch, output_stride):
    torch.manual_seed(0)
    ours = torchvision.models.get_model(arch)
    theirs = torchvision.models.get_model(
        arch, replace_stride_with_dilation=[False, output_stride == 8, True]
    )
    theirs.load_state_dict(ours.state_dict())
    dilate_resnet(ours, output_stride)
    assert _conv_settings(ours) == _conv_settings(theirs)
    assert [b.stride for b in ours.layer4] == [b.stride for b in theirs.layer4]
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    assert all(torch.equal(mine[k], reference[k]) for k in mine)
    x = image(batch=1)
    with torch.no_grad():
        got, want = _trunk(ours.eval())(x), _trunk(theirs.eval())(x)
    assert got.shape[-1] == SMALL // output_stride
    assert torch.equal(got, want)
    assert torch.equal(ours(x), theirs(x))


def test_basic_blocks_are_dilated_by_the_same_rule():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dilate_resnet(model, 8)
    dilations = [
        [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in layer]
        for layer in (model.layer2, model.layer3, model.layer4)
    ]
    assert dilations == [[(1, 1), (1, 1)], [(1, 1), (2, 2)], [(2, 2), (4, 4)]]
    convs = [c for c in model.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert all(c.padding == c.dilation for c in convs)
    assert model.layer2[0].conv1.stride == (2, 2)
    assert model.layer3[0].conv1.stride == model.layer3[0].downsample[0].stride == (1, 1)
    assert model.layer4[0].conv1.stride == model.layer4[0].downsample[0].stride == (1, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_model_equals_reference_bit_for_bit(arch, output_stride):
    model = build(arch, output_stride=output_stride)
    randomize_units(model)
    out = model.eval()(image())
    assert out["seg"].shape[-1] == SMALL // output_stride
    results = check_parity(model, image())
    assert [r.task for r in results] == ["seg", "depth"]
    assert all(r.identical and r.max_abs_error == 0.0 for r in results)


@pytest.mark.parametrize(
    ("output_stride", "reductions", "sizes"),
    [(8, [4, 8, 8, 8], [16, 8, 8, 8]), (16, [4, 8, 16, 16], [16, 8, 4, 4])],
)
def test_stages_report_the_dilated_reduction(output_stride, reductions, sizes):
    model = build("resnet50", output_stride=output_stride)
    assert [s.reduction for s in model.stages] == reductions
    assert [s.channels for s in model.stages] == [256, 512, 1024, 2048]
    summary = summarize(model, (SMALL, SMALL))
    assert [row.reduction for row in summary.stages] == reductions
    assert [row.feature_size for row in summary.stages] == [(s, s) for s in sizes]
    assert summary.output_stride == output_stride
    assert summary.outputs[0].shape == (2048, sizes[-1], sizes[-1])


@pytest.mark.parametrize("heads", [{}, {"seg": 3}])
def test_all_features_equal_reference_bit_for_bit(heads):
    model = build(tasks=["seg", "depth", "normals"], heads=heads, features="all")
    randomize_units(model)
    expected = [f"{t}.{s}" for t in ["seg"] for s in STAGES] + list(heads)
    expected += [f"{t}.{s}" for t in ["depth", "normals"] for s in STAGES]
    assert model.output_names == expected
    out = model.eval()(image())
    assert list(out) == expected
    assert [out[f"seg.{s}"].shape[1:] for s in STAGES] == [
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
    ]
    results = check_parity(model, image())
    assert [r.task for r in results] == expected
    assert all(r.identical and r.max_abs_error == 0.0 for r in results)


def test_all_features_are_the_stitched_ones():
    model = build(stages=["layer2", "layer4"], features="all")
    randomize_units(model)
    x = image()
    out = model.eval()(x)
    assert list(out) == ["seg.layer2", "seg.layer4", "depth.layer2", "depth.layer4"]
    last = build(stages=["layer2", "layer4"])
    last.load_state_dict(model.state_dict())
    want = last.eval()(x)
    assert torch.equal(out["seg.layer4"], want["seg"])
    assert torch.equal(out["depth.layer4"], want["depth"])
    assert not torch.equal(out["seg.layer2"], out["depth.layer2"])


def test_unknown_features_and_strides_are_refused_before_building():
    with pytest.raises(CrossStitchError, match="unknown features 'some'; use one of: last, all"):
        build(features="some")
    with pytest.raises(CrossStitchError, match="unknown output stride 4; use one of: 8, 16, 32"):
        build(output_stride=4)
    with pytest.raises(CrossStitchError, match="only the resnet family supports"):
        build("vgg11", output_stride=8)
    with pytest.raises(CrossStitchError, match="unknown features"):
        crossstitch.CrossStitchBackbone(
            {"a": torchvision.models.resnet18(), "b": torchvision.models.resnet18()},
            features="first",
        )


def test_checkpoint_keeps_output_stride_and_features(tmp_path):
    model = build(output_stride=8, features="all", heads={"seg": 2})
    randomize_units(model)
    path = crossstitch.save(model, tmp_path / "m.pt")
    loaded = crossstitch.load(path)
    assert loaded.config["output_stride"] == 8 and loaded.config["features"] == "all"
    assert [s.reduction for s in loaded.stages] == [4, 8, 8, 8]
    x = image()
    want, got = model.eval()(x), loaded.eval()(x)
    assert list(got) == list(want) == loaded.output_names
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [e.reduction for e in inspect_checkpoint(path).stage_table] == [4, 8, 8, 8]


def test_checkpoints_without_the_options_load_as_before(tmp_path):
    model = build()
    path = crossstitch.save(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    del payload["config"]["output_stride"], payload["config"]["features"]
    torch.save(payload, path)
    loaded = crossstitch.load(path)
    assert (loaded.config["output_stride"], loaded.config["features"]) == (32, "last")
    assert list(loaded.eval()(image())) == ["seg", "depth"]
    payload["config"]["output_stride"] = 4
    torch.save(payload, path)
    with pytest.raises(CrossStitchError, match="'output_stride' must be one of 8, 16, 32"):
        crossstitch.load(path)


def test_an_artifact_of_other_outputs_is_not_compared():
    model = build()
    config = {**model.config, "features": "all"}
    with pytest.raises(CrossStitchError, match="features is all there, last in the checkpoint"):
        check_compatible(config, model, "m.onnx")
    config = {**model.config, "output_stride": 16}
    with pytest.raises(CrossStitchError, match="output_stride is 16 there"):
        check_compatible(config, model, "m.onnx")


def test_build_summary_shows_output_stride_and_outputs(cli):
    args = ["build", "resnet18", "-t", "seg,depth", "--input-size", "64", "--output-stride", "8"]
    code, out, err = cli(*args, "--features", "all", "--head", "seg=3")
    assert code == 0, err
    assert "Outputs per image" in out and "seg.layer1" in out and "512×8×8" in out
    assert "features=all, output stride 8" in out
    code, out, err = cli(*args, "--features", "all", "--json", "-o", "j.pt")
    assert code == 0, err
    result = json.loads(out)
    assert (result["config"]["output_stride"], result["config"]["features"]) == (8, "all")
    summary = result["summary"]
    assert [s["reduction"] for s in summary["stages"]] == [4, 8, 8, 8]
    assert [o["name"] for o in summary["outputs"]] == [
        f"{t}.{s}" for t in ["seg", "depth"] for s in STAGES
    ]
    assert summary["outputs"][3]["shape"] == [512, 8, 8]


def test_all_features_export_to_every_format_and_verify(cli, tmp_path):
    names = [f"{t}.{s}" for t in ["seg", "depth"] for s in STAGES]
    code, _, err = cli("build", "resnet18", "-t", "seg,depth", "--features", "all", "-o", "m.pt")
    assert code == 0, err
    code, out, err = cli(
        "export", "--model", "m.pt", "--format", "all", "--input-size", str(SMALL), "--json"
    )
    assert code == 0, err
    artifacts = json.loads(out)["artifacts"]
    assert [a["format"] for a in artifacts] == ["onnx", "torchscript", "pt2"]
    for artifact in artifacts:
        assert artifact["written"], artifact
        outputs = artifact["comparison"]["outputs"]
        assert [o["name"] for o in outputs] == names
        assert all(o["passed"] for o in outputs)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.name for o in proto.graph.output] == names
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["crossstitch.outputs"] == ",".join(names)
    assert json.loads(props["crossstitch.config"])["features"] == "all"
    for path in ("m.onnx", "m.torchscript.pt", "m.pt2"):
        code, out, err = cli("verify", path, "--against", "m.pt", "--json")
        assert code == 0, err
        assert [o["name"] for o in json.loads(out)["comparison"]["outputs"]] == names
    code, out, err = cli("verify", "m.pt", "--json")
    assert code == 0, err
    assert [o["task"] for o in json.loads(out)["outputs"]] == names
