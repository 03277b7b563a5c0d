"""Dense prediction options: output stride by dilation, and every stitched stage's features."""

import dataclasses
import json

import onnx
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import crossstitch
from crossstitch import CrossStitchError, check_parity
from crossstitch.dilation import dilate_resnet
from crossstitch.exporters.common import Artifact, ExportInput
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


# DeepLab's rule, written out: in a layer whose grid becomes f times finer, the strided 3x3
# conv of its first block is dilated by f/2 and every later 3x3 conv by f.
FINER = {16: {"layer4": 2}, 8: {"layer3": 2, "layer4": 4}}


def _conv(conv: nn.Conv2d, x: torch.Tensor, dilation: int, stride: int) -> torch.Tensor:
    padding = dilation if conv.kernel_size == (3, 3) else 0
    return F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups)


def _block_by_hand(block: nn.Module, x: torch.Tensor, first: bool, f: int) -> torch.Tensor:
    """One residual block with DeepLab's dilations applied by hand (``f`` 1: undilated)."""
    basic = isinstance(block, torchvision.models.resnet.BasicBlock)
    strided = f // 2 if first and f > 1 else f
    stride = (block.conv1 if basic else block.conv2).stride[0] if f == 1 else 1
    if basic:
        out = block.relu(block.bn1(_conv(block.conv1, x, strided, stride)))
        out = block.bn2(_conv(block.conv2, out, f, 1))
    else:
        out = block.relu(block.bn1(_conv(block.conv1, x, 1, 1)))
        out = block.relu(block.bn2(_conv(block.conv2, out, strided, stride)))
        out = block.bn3(_conv(block.conv3, out, 1, 1))
    identity = x
    if block.downsample is not None:
        conv, bn = block.downsample
        identity = bn(_conv(conv, x, 1, stride))
    return block.relu(out + identity)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilation_follows_deeplabs_rule_bit_for_bit(arch, output_stride):
    torch.manual_seed(0)
    plain = torchvision.models.get_model(arch).eval()
    dilated = torchvision.models.get_model(arch).eval()
    dilated.load_state_dict(plain.state_dict())
    dilate_resnet(dilated, output_stride)
    x = image(batch=1)
    with torch.no_grad():
        want = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
        for name in STAGES:
            f = FINER[output_stride].get(name, 1)
            for index, block in enumerate(getattr(plain, name)):
                want = _block_by_hand(block, want, index == 0, f)
        got = _trunk(dilated)(x)
    assert got.shape[-1] == SMALL // output_stride
    assert torch.equal(got, want)


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
    assert list(summary.feature_sizes.values()) == [(s, s) for s in sizes]
    assert summary.config.output_stride == output_stride
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
    with pytest.raises(CrossStitchError, match="features: must be one of last, all, got 'some'"):
        build(features="some")
    with pytest.raises(CrossStitchError, match="output_stride: must be one of 8, 16, 32, got 4"):
        build(output_stride=4)
    with pytest.raises(CrossStitchError, match="only the resnet family supports"):
        build("vgg11", output_stride=8)
    with pytest.raises(CrossStitchError, match="features: must be one of"):
        crossstitch.CrossStitchBackbone(
            {"a": torchvision.models.resnet18(), "b": torchvision.models.resnet18()},
            features="first",
        )


def test_checkpoint_keeps_output_stride_and_features(tmp_path):
    model = build(output_stride=8, features="all", heads={"seg": 2})
    randomize_units(model)
    path = crossstitch.save(model, tmp_path / "m.pt")
    loaded = crossstitch.load(path)
    assert loaded.config.output_stride == 8 and loaded.config.features == "all"
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
    assert (loaded.config.output_stride, loaded.config.features) == (32, "last")
    assert list(loaded.eval()(image())) == ["seg", "depth"]
    payload["config"]["output_stride"] = 4
    torch.save(payload, path)
    with pytest.raises(CrossStitchError, match="'output_stride' must be one of 8, 16, 32"):
        crossstitch.load(path)


def test_an_artifact_of_other_outputs_is_not_compared():
    model = build()
    export = ExportInput((2, 3, 64, 64), dynamic=True, spatial_free=True)
    for change, message in (
        ({"features": "all"}, "features is all there, last in the checkpoint"),
        ({"output_stride": 16}, "output_stride is 16 there"),
    ):
        artifact = Artifact(dataclasses.replace(model.config, **change), export, model)
        with pytest.raises(CrossStitchError, match=message):
            check_compatible(artifact, model, "m.onnx")


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
