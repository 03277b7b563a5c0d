"""The input transform travels with the model: config, checkpoints, artifacts and `inspect`."""

import dataclasses
import json
import zipfile

import onnx
import pytest
import torch
import torchvision

import crossstitch
from crossstitch.backbone import build as build_model
from crossstitch.backbone import torchvision_config
from crossstitch.cli import render
from crossstitch.config import CrossStitchConfig, Preprocess
from crossstitch.errors import CrossStitchError
from crossstitch.exporters import onnx as onnx_format
from crossstitch.exporters import pt2, torchscript
from crossstitch.exporters.common import CONFIG_FILE, ExportOptions
from crossstitch.exporters.onnx_info import describe_proto, input_doc, model_version, value_range
from crossstitch.stages import architectures
from crossstitch.weights import MODULES_SOURCE, WEIGHTS_FILE_SOURCE, weights_preprocess
from helpers import build, image

RANDOM_INIT = "ImageNet defaults (random init)"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# A transform unlike the defaults, so a round trip cannot pass by falling back to them.
CUSTOM = Preprocess(
    resize=146,
    crop=128,
    mean=(0.5, 0.25, 0.125),
    std=(0.5, 0.75, 2.0),
    interpolation="bicubic",
    source="torchvision ResNet50_Weights.IMAGENET1K_V2",
)


@pytest.mark.parametrize(
    ("arch", "weights", "resize", "crop", "interpolation"),
    [
        ("resnet50", "IMAGENET1K_V2", 232, 224, "bilinear"),
        ("resnet50", "IMAGENET1K_V1", 256, 224, "bilinear"),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 384, 384, "bicubic"),
        ("inception_v3", "IMAGENET1K_V1", 342, 299, "bilinear"),
        ("efficientnet_b3", "IMAGENET1K_V1", 320, 300, "bicubic"),
    ],
)
def test_named_weights_record_their_torchvision_transform(
    arch, weights, resize, crop, interpolation
):
    config = torchvision_config(arch, tasks=["a", "b"], weights=weights)
    enum = torchvision.models.get_model_weights(arch).__name__
    assert config.preprocess == Preprocess(
        resize, crop, *IMAGENET, interpolation, f"torchvision {enum}.{weights}"
    )


def test_default_weights_record_the_transform_of_the_weights_they_resolve_to():
    config = torchvision_config("resnet50", tasks=["a", "b"], weights="DEFAULT")
    assert config.weights == "IMAGENET1K_V2"
    assert config.preprocess.source == "torchvision ResNet50_Weights.IMAGENET1K_V2"


def test_every_weights_in_the_catalogue_define_a_transform():
    for arch in architectures():
        for entry in torchvision.models.get_model_weights(arch):
            preprocess = torchvision_config(arch, tasks=["a", "b"], weights=entry.name).preprocess
            assert preprocess.crop <= preprocess.resize, (arch, entry.name)
            assert preprocess.source.endswith(f".{entry.name}")


def test_a_build_without_loading_keeps_the_transform_of_its_weights():
    config = torchvision_config("resnet18", tasks=["a", "b"], weights="IMAGENET1K_V1")
    model = build_model(config, load_weights=False)
    assert model.config.preprocess == config.preprocess
    assert model.config.preprocess.source == "torchvision ResNet18_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16"])
def test_random_init_records_the_imagenet_defaults_and_says_so(arch):
    preprocess = torchvision_config(arch, tasks=["a", "b"]).preprocess
    assert preprocess == Preprocess(256, 224, *IMAGENET, "bilinear", RANDOM_INIT)


def test_a_weights_file_records_the_defaults_and_says_its_transform_is_unknown(tmp_path):
    path = tmp_path / "classifier.pt"
    path.write_bytes(b"")
    preprocess = torchvision_config("resnet18", tasks=["a", "b"], weights=path).preprocess
    assert (preprocess.resize, preprocess.crop, preprocess.mean) == (256, 224, IMAGENET[0])
    assert preprocess.source == WEIGHTS_FILE_SOURCE


def test_own_modules_record_the_defaults_and_say_where_they_come_from():
    models = {t: torchvision.models.resnet18() for t in ("a", "b")}
    model = crossstitch.CrossStitchBackbone(models)
    assert model.config.preprocess.source == MODULES_SOURCE


def test_a_crop_share_gives_the_resize():
    assert Preprocess.from_crop(224, source="x") == Preprocess(256, 224, *IMAGENET, "bilinear", "x")
    assert Preprocess.from_crop(384, source="x", crop_pct=1.0).resize == 384
    assert Preprocess.from_crop(288, source="x", crop_pct=0.95).resize == 303
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(CrossStitchError, match="crop_pct"):
            Preprocess.from_crop(224, source="x", crop_pct=bad)


def _old(config: CrossStitchConfig, **changes) -> dict:
    """``config`` as a file written before the transform was recorded."""
    raw = {**config.to_dict(), **changes}
    del raw["preprocess"]
    return raw


def test_old_configs_without_a_transform_read_as_their_build_would_record_it():
    config = torchvision_config("resnet50", tasks=["a", "b"])
    assert CrossStitchConfig.from_dict(_old(config), "old.pt").preprocess == Preprocess()
    named = CrossStitchConfig.from_dict(_old(config, weights="IMAGENET1K_V2"), "old.pt")
    assert (named.preprocess.resize, named.preprocess.crop) == (232, 224)
    assert named.preprocess.source == "torchvision ResNet50_Weights.IMAGENET1K_V2"
    from_file = CrossStitchConfig.from_dict(_old(config, weights_file="c.pt"), "old.pt")
    assert from_file.preprocess.source == WEIGHTS_FILE_SOURCE


def test_stored_transforms_are_checked_and_refused_with_the_field_named():
    raw = build().config.to_dict()
    raw["preprocess"]["mean"] = [0.5, 0.5]
    with pytest.raises(CrossStitchError, match=r"m\.pt: config field 'preprocess\.mean'"):
        CrossStitchConfig.from_dict(raw, "m.pt")
    config = torchvision_config("resnet18", tasks=["a", "b"])
    with pytest.raises(CrossStitchError, match=r"old\.pt: config field 'weights' unknown"):
        CrossStitchConfig.from_dict(_old(config, weights="IMAGENET9K_V9"), "old.pt")
    with pytest.raises(CrossStitchError, match="no torchvision weights") as caught:
        weights_preprocess("not_a_torchvision_model", "DEFAULT")
    assert caught.value.param == "weights"


def _with(model: crossstitch.CrossStitchBackbone, preprocess: Preprocess):
    model.config = dataclasses.replace(model.config, preprocess=preprocess)
    return model


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_checkpoints_keep_the_transform(tmp_path, name):
    crossstitch.save(_with(build(), CUSTOM), tmp_path / name)
    assert crossstitch.load(tmp_path / name).config.preprocess == CUSTOM


@pytest.mark.parametrize("fmt", [torchscript, pt2], ids=["torchscript", "pt2"])
def test_torch_artifacts_keep_the_transform_in_their_extra_file(tmp_path, fmt):
    path = tmp_path / f"m{fmt.SUFFIX}"
    fmt.export(_with(build().eval(), CUSTOM), path, image(), ExportOptions(dynamic=False))
    assert fmt.load(path).config.preprocess == CUSTOM
    with zipfile.ZipFile(path) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(f"/extra/{CONFIG_FILE}")]
        assert json.loads(archive.read(member))["preprocess"] == CUSTOM.to_dict()


def test_exported_artifacts_carry_the_transform_of_their_checkpoint(exported):
    folder, _ = exported
    for fmt, name in [
        (onnx_format, "crossstitch.onnx"),
        (torchscript, "crossstitch.torchscript.pt"),
        (pt2, "crossstitch.pt2"),
    ]:
        assert fmt.load(folder / name).config.preprocess == Preprocess(), name


def test_onnx_metadata_names_the_transform_field_by_field():
    model = _with(build(), CUSTOM)
    props = onnx_format.metadata(model, image(), ExportOptions(), 18)
    assert {k: v for k, v in props.items() if k.startswith("crossstitch.preprocess.")} == {
        "crossstitch.preprocess.resize": "146",
        "crossstitch.preprocess.crop": "128",
        "crossstitch.preprocess.mean": "0.5,0.25,0.125",
        "crossstitch.preprocess.std": "0.5,0.75,2.0",
        "crossstitch.preprocess.interpolation": "bicubic",
        "crossstitch.preprocess.source": CUSTOM.source,
    }
    assert json.loads(props["crossstitch.config"])["preprocess"] == CUSTOM.to_dict()


def _check_described(proto: onnx.ModelProto) -> None:
    """The standard fields every crossstitch ONNX file fills, for the `build()` model."""
    assert proto.producer_name == "crossstitch"
    assert proto.producer_version == crossstitch.__version__
    assert proto.model_version == model_version(crossstitch.__version__) > 0
    assert "resnet18" in proto.doc_string and "seg, depth" in proto.doc_string
    (image_input,) = proto.graph.input
    doc = image_input.doc_string
    for part in ("NCHW", "R, G, B", "[0.485, 0.456, 0.406]", "[0.229, 0.224, 0.225]", "256"):
        assert part in doc, part
    assert "[-2.118, 2.640]" in doc and RANDOM_INIT in doc and "any height and width" in doc
    dims = image_input.type.tensor_type.shape.dim
    assert [d.denotation for d in dims] == ["DATA_BATCH", "DATA_CHANNEL"] + ["DATA_FEATURE"] * 2
    assert [o.doc_string.split(":")[0] for o in proto.graph.output] == ["task seg", "task depth"]


def test_onnx_files_describe_the_model_and_its_input_as_an_image(exported):
    folder, _ = exported
    path = folder / "crossstitch.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    _check_described(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["Image.BitmapPixelFormat"] == "Rgb8"
    assert props["Image.ColorSpaceGamma"] == "SRGB"
    assert "Image.NominalPixelRange" not in props
    assert props["crossstitch.preprocess.mean"] == "0.485,0.456,0.406"


def test_the_fallback_exporter_output_gets_the_same_description(exported):
    folder, _ = exported
    proto = onnx.load(str(folder / "crossstitch.onnx"))
    proto.producer_name, proto.doc_string, proto.model_version = "pytorch", "", 0
    for dim in proto.graph.input[0].type.tensor_type.shape.dim:
        dim.denotation = ""
    describe_proto(proto, build(), None)
    _check_described(proto)
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize(
    ("version", "number"),
    [("0.1.0", 1_000), ("1.2.3", 1_002_003), ("2.0", 2_000_000), ("1.2.3.dev4", 1_002_003)],
)
def test_model_version_encodes_major_minor_patch(version, number):
    assert model_version(version) == number


@pytest.mark.parametrize("width", [40, 80])
def test_inspect_shows_the_transform_whole(cli, tmp_path, monkeypatch, width):
    monkeypatch.setattr(render.stdout, "width", width)
    crossstitch.save(_with(build(), CUSTOM), tmp_path / "m.safetensors")
    code, out, err = cli("inspect", "m.safetensors")
    assert code == 0, err
    words = set(out.split())
    for value in ("146", "(bicubic),", "128", "0.5,", "0.25,", "0.125;", "2.0", "IMAGENET1K_V2"):
        assert any(value in w for w in words), value
    text = " ".join(out.split())
    assert "resize 146 (bicubic), center crop 128" in text
    assert "mean 0.5, 0.25, 0.125; std 0.5, 0.75, 2.0 (R, G, B)" in text
    assert f"from {CUSTOM.source}" in text
    code, out, err = cli("inspect", "m.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["preprocess"] == CUSTOM.to_dict()


def test_inspect_shows_the_transform_of_an_onnx_file(cli, exported):
    folder, _ = exported
    code, out, err = cli("inspect", str(folder / "crossstitch.onnx"))
    assert code == 0, err
    assert "resize 256 (bilinear), center crop 224" in out
    assert f"from {RANDOM_INIT}" in out


def test_the_doc_string_range_is_what_normalisation_gives():
    low, high = value_range(Preprocess())
    black_and_white = torch.stack([torch.zeros(3, 1, 1), torch.ones(3, 1, 1)])
    normalised = torchvision.transforms.functional.normalize(black_and_white, *IMAGENET)
    assert low == pytest.approx(normalised.min().item())
    assert high == pytest.approx(normalised.max().item())


def test_the_input_doc_says_which_sizes_the_file_takes():
    model = build()
    assert onnx_format.fixed_size(model, image(), ExportOptions()) is None
    assert onnx_format.fixed_size(model, image(size=96), ExportOptions(dynamic=False)) == (96, 96)
    assert "height x width 96x96 only" in input_doc(model, (96, 96))
    assert "any height and width" in input_doc(model, None)
