"""Every torchvision family: stages as the catalogue states them, bit-exact parity, the layouts."""

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
import torchvision

import crossstitch
from crossstitch.backbone import CrossStitchBackbone, torchvision_config
from crossstitch.backbone import build as build_model
from crossstitch.config import CrossStitchConfig
from crossstitch.errors import CrossStitchError
from crossstitch.exporters.common import Artifact, ExportInput, ExportOptions
from crossstitch.exporters.pipeline import check_artifact_size, export_verified
from crossstitch.families import FAMILIES, InputTransform
from crossstitch.reference import check_parity
from crossstitch.stages import architectures
from crossstitch.weights import network_kwargs
from helpers import build, image, randomize_units

# The smallest architecture of each family: the default suite builds each one.
ONE_PER_FAMILY = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "maxvit": "maxvit_t",
    "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3_small",
    "regnet": "regnet_x_400mf",
    "resnet": "resnet18",
    "shufflenet": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "swin": "swin_t",
    "vgg": "vgg11",
    "vit": "vit_b_32",
}


def test_every_torchvision_classifier_is_supported():
    assert set(architectures()) == set(torchvision.models.list_models(module=torchvision.models))
    assert set(ONE_PER_FAMILY) == set(FAMILIES)
    assert {spec.family for spec in architectures().values()} == set(FAMILIES)


@pytest.mark.parametrize("arch", list(ONE_PER_FAMILY.values()))
def test_family_builds_and_matches_the_reference_at_its_smallest_input(arch):
    spec = architectures()[arch]
    model = build(arch).eval()
    randomize_units(model)
    assert tuple(model.stages) == spec.stages
    size = spec.input_size or spec.min_size
    results = check_parity(model, image(size=size))
    assert all(r.identical for r in results), results
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "size"), [("googlenet", 64), ("inception_v3", 96), ("vit_b_32", 224), ("swin_t", 224)]
)
def test_no_classifier_or_auxiliary_parameters_are_kept(arch, size):
    model = build(arch, tasks=["a", "b"])
    names = [n for n, _ in model.named_parameters()]
    for dropped in ("aux", "AuxLogits", ".fc.", ".head.", ".heads.", "classifier"):
        assert not any(dropped in n for n in names), (arch, dropped)
    loss = sum(o.float().sum() for o in model(image(size=size)).values())
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == [], unused


def test_swin_units_act_on_the_channel_last_axis():
    model = build("swin_t").eval()
    with torch.no_grad():
        for unit in model.cross_stitch.values():
            unit.weight.zero_()
            unit.weight[1, 1] = 1.0  # depth keeps its features
            unit.weight[0, 1, 0] = 1.0  # seg's channel 0 takes depth's channel 0, nothing else
    out = model(image(size=224))
    seg = out["seg"]
    assert seg.shape == (2, 7, 7, 768)
    assert seg[..., 1:].abs().max() == 0 and seg[..., 0].abs().max() > 0


def test_vit_returns_tokens_with_the_class_token_first():
    model = build("vit_b_32").eval()
    out = model(image(size=224))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (2, 50, 768),
        "depth": (2, 50, 768),
    }
    assert [(s.name, s.channels, s.reduction) for s in model.stages] == [
        (f"stage{i}", 768, 32) for i in range(1, 5)
    ]


def test_googlenet_keeps_the_input_transform_of_its_pretrained_weights():
    classifier = torchvision.models.googlenet(aux_logits=False, transform_input=True).eval()
    model = CrossStitchBackbone(
        {"a": classifier, "b": copy.deepcopy(classifier)}, alpha=1.0, beta=0.0
    ).eval()
    x = image(size=64)
    with torch.no_grad():
        expected = classifier._transform_input(x)
        for name in GOOGLENET_TRUNK.split():
            expected = getattr(classifier, name)(expected)
        assert torch.equal(model(x)["a"], expected)


GOOGLENET_TRUNK = (
    "conv1 maxpool1 conv2 conv3 maxpool2 inception3a inception3b maxpool3 inception4a "
    "inception4b inception4c inception4d inception4e maxpool4 inception5a inception5b"
)


def test_a_checkpoint_rebuilds_the_network_its_named_weights_imply(tmp_path):
    config = torchvision_config("googlenet", tasks=["seg", "depth"], weights="IMAGENET1K_V1")
    torch.manual_seed(0)
    model = build_model(config, load_weights=False).eval()
    randomize_units(model)
    assert isinstance(model.backbones["seg"].stem, InputTransform)
    crossstitch.save(model, tmp_path / "g.pt")
    loaded = crossstitch.load(tmp_path / "g.pt").eval()
    assert isinstance(loaded.backbones["seg"].stem, InputTransform)
    x = image(size=64)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert all(torch.equal(expected[task], got[task]) for task in model.tasks)


def test_vit_weights_for_larger_images_set_the_input_size():
    assert network_kwargs("vit_b_16", "IMAGENET1K_SWAG_E2E_V1") == {"image_size": 384}
    assert network_kwargs("vit_h_14", "IMAGENET1K_SWAG_E2E_V1") == {"image_size": 518}
    assert network_kwargs("vit_b_16", "IMAGENET1K_V1") == {"image_size": 224}
    assert network_kwargs("resnet50", "IMAGENET1K_V2") == {}
    assert network_kwargs("inception_v3", None) == {}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["build", "vit_b_32", "--tasks", "a", "b", "--input-size", "256"], "224x224 images only"),
        (["build", "maxvit_t", "--tasks", "a", "b", "--input-size", "224", "192"], "224x192"),
        (["bench", "vit_b_32", "--tasks", "a", "b", "--input-size", "128"], "224x224 images only"),
        (["build", "swin_t", "--tasks", "a", "b", "--head", "a=3"], "channel-last"),
        (["build", "vit_b_32", "--tasks", "a", "b", "--head", "b=1"], "tokens"),
    ],
)
def test_sizes_and_heads_a_family_cannot_take_are_refused(cli, tmp_path, args, expected):
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_list_says_which_models_take_one_input_size(cli):
    code, out, _ = cli("list", "--json")
    assert code == 0
    specs = {spec["name"]: spec for spec in json.loads(out)}
    assert specs["vit_b_16"]["input_size"] == 224 and specs["maxvit_t"]["input_size"] == 224
    assert specs["resnet18"]["input_size"] is None and specs["swin_t"]["layout"] == "nhwc"


def test_vit_artifacts_take_any_batch_at_its_one_size(tmp_path):
    model = build("vit_b_32").eval()
    randomize_units(model)
    with pytest.raises(CrossStitchError, match="224x224 images only"):
        export_verified(model, "onnx", tmp_path / "m.onnx", (256, 256), ExportOptions())
    for fmt in ("onnx", "pt2"):
        result = export_verified(model, fmt, tmp_path / f"m.{fmt}", (224, 224), ExportOptions())
        assert result.passed, result.comparison
        assert (result.inputs.batch, result.inputs.height, result.inputs.width) == (3, 224, 224)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    (opset,) = [o.version for o in proto.opset_import if o.domain == ""]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["crossstitch.opset"] == str(opset) and opset >= 18
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [50, 768]


@pytest.mark.parametrize(
    ("config", "size", "expected"),
    [
        ({"dynamic": True, "family": "swin", "arch": "swin_t"}, (256, 256), "window padding"),
        ({"dynamic": True, "family": "vit", "arch": "vit_b_16"}, (64, 64), "vit_b_16 takes one"),
        ({"dynamic": False, "family": "resnet", "arch": "resnet18"}, (64, 96), "--static"),
    ],
)
def test_artifacts_with_a_fixed_size_refuse_other_sizes(config, size, expected):
    artifact = Artifact(
        CrossStitchConfig(arch=config["arch"], family=config["family"], tasks=("a", "b")),
        ExportInput((2, 3, 224, 224), config["dynamic"], spatial_free=False),
        run=print,
    )
    with pytest.raises(CrossStitchError, match=expected):
        check_artifact_size(artifact, Path("m.onnx"), size)
    check_artifact_size(artifact, Path("m.onnx"), (224, 224))
