"""timm backbones: the identity contract, weights, refusals, checkpoints and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import crossstitch
from crossstitch import CrossStitchBackbone, CrossStitchError
from crossstitch.backbone import probe_shapes
from crossstitch.exporters.common import ExportOptions, dynamic_shapes
from crossstitch.exporters.formats import FORMATS
from crossstitch.exporters.pipeline import check_artifact_size, export_verified
from crossstitch.families import resolution
from crossstitch.reference import check_parity
from crossstitch.summary import probe_or_refuse
from crossstitch.timm_backbones import timm_config
from helpers import image, load_script, randomize_units

SMALL_MODELS = ["resnet10t", "mobilenetv3_small_050", "convnext_atto"]
TASKS = ["seg", "depth"]


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def from_timm(name: str, **kwargs) -> CrossStitchBackbone:
    torch.manual_seed(0)
    return CrossStitchBackbone.from_timm(name, tasks=TASKS, **kwargs).eval()


def features_only_outputs(timm, name: str, model: CrossStitchBackbone, task: str, x):
    """``timm.create_model(name, features_only=True)`` holding ``task``'s weights, run on ``x``."""
    reference = timm.create_model(name, features_only=True).eval()
    state = model.backbones[task].state_dict()
    keys = list(reference.state_dict())
    assert len(keys) == len(state)
    reference.load_state_dict(dict(zip(keys, state.values(), strict=True)))
    with torch.no_grad():
        return reference(x)


def assert_identity(timm, name: str, model: CrossStitchBackbone, x) -> None:
    with torch.no_grad():
        out = model(x)
    for task in model.tasks:
        expected = features_only_outputs(timm, name, model, task, x)
        got = [out[f"{task}.{stage}"] for stage in model.cross_stitch]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_identity_units_give_timm_features_bit_for_bit(timm, name):
    model = from_timm(name, alpha=1.0, beta=0.0, features="all")
    with torch.no_grad():  # the tasks start alike: make them differ so a swap would show
        for p in model.backbones["depth"].parameters():
            p.add_(0.01)
    reference = timm.create_model(name, features_only=True)
    assert [s.channels for s in model.stages] == reference.feature_info.channels()
    assert [s.reduction for s in model.stages] == reference.feature_info.reduction()
    assert model.output_names == [f"{t}.{s.name}" for t in TASKS for s in model.stages]
    assert_identity(timm, name, model, image(size=64))


def test_channel_last_swin_keeps_the_contract_and_its_one_size(timm):
    name = "swin_tiny_patch4_window7_224"
    model = from_timm(name, alpha=1.0, beta=0.0, features="all")
    assert model.layout == "nhwc" and model.input_size == 224
    assert model.stages[-1].channels == 768
    with pytest.raises(CrossStitchError, match="224x224"):
        model.check_input_size((64, 64))
    assert_identity(timm, name, model, image(batch=1, size=224))


def test_a_fixed_size_model_records_a_crop_of_its_one_size(timm):
    config = timm_config("maxvit_pico_rw_256", tasks=TASKS)
    assert (config.input_size, config.preprocess.crop, config.preprocess.resize) == (256, 256, 292)


def test_parity_with_the_reference_stays_bit_exact(timm):
    model = from_timm("mobilenetv3_small_050", features="all", heads={"seg": 3})
    randomize_units(model)
    results = check_parity(model, image(size=64))
    assert results and all(r.passed for r in results)


def test_stage_names_and_selection(timm):
    model = from_timm("convnext_atto", stages=["stages_1", "stages_3"])
    assert [s.name for s in model.stages] == ["stages_0", "stages_1", "stages_2", "stages_3"]
    assert list(model.cross_stitch) == ["stages_1", "stages_3"]
    with pytest.raises(CrossStitchError, match="unknown stage 'layer1'"):
        from_timm("convnext_atto", stages=["layer1"])


def test_save_and_load_rebuild_offline_from_the_config(timm, tmp_path):
    model = from_timm("resnet10t", heads={"seg": 2})
    randomize_units(model)
    path = crossstitch.save(model, tmp_path / "m.safetensors")
    loaded = crossstitch.load(path)
    assert loaded.config == model.config
    assert loaded.config.source == "timm" and loaded.config.library_version == timm.__version__
    x = image(size=64)
    with torch.no_grad():
        want, got = model(x), loaded.eval()(x)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_memory_estimate_counts_what_a_timm_build_holds(timm):
    from crossstitch.memory import build_bytes, weights_bytes

    model = from_timm("resnet10t")
    units = sum(u.weight.numel() * 4 for u in model.cross_stitch.values())
    assert build_bytes(model.config) == weights_bytes(model) - units


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_is_loaded_the_way_timm_loads_its_files(timm, tmp_path, suffix):
    torch.manual_seed(123)
    classifier = timm.create_model("resnet10t")
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".pth":
        torch.save(classifier.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(classifier.state_dict(), str(path))
    model = from_timm("resnet10t", weights_file=path)
    cfg = timm.create_model("resnet10t").pretrained_cfg
    assert model.config.preprocess.crop == cfg["input_size"][-1]
    assert model.config.preprocess.resize == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
    expected = classifier.state_dict()
    for task in TASKS:
        weights = model.backbones[task].state_dict()
        assert torch.equal(
            weights["stages.layer4.layer4.0.conv1.weight"], expected["layer4.0.conv1.weight"]
        )
        assert torch.equal(weights["stages.act1.conv1.0.weight"], expected["conv1.0.weight"])


def test_a_weights_file_of_another_model_is_refused_with_its_name(timm, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18d").state_dict(), path)
    with pytest.raises(CrossStitchError, match=r"other\.pth does not fit timm model resnet10t"):
        from_timm("resnet10t", weights_file=path)


def test_a_pickle_with_code_never_reaches_timm(timm, tmp_path, monkeypatch):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "f": print}, path)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was called"))
    with pytest.raises(CrossStitchError):
        from crossstitch.timm_backbones import read_state

        read_state(str(path))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("hrnet_w18_small", "multi-branch"),
        ("vit_tiny_patch16_224", "getter"),
        ("levit_128s", "getter"),
    ],
)
def test_models_off_one_path_are_refused_before_building(timm, monkeypatch, name, reason):
    from crossstitch import timm_backbones

    monkeypatch.setattr(timm_backbones, "build_timm", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(CrossStitchError, match=reason):
        CrossStitchBackbone.from_timm(name, tasks=TASKS)


def test_sizes_a_layer_refuses_are_an_error_and_skipped_by_the_smallest_size(timm):
    model = from_timm("inception_v3")
    with pytest.raises(CrossStitchError, match=r"64x64 is too small for inception_v3 \(.*Kernel"):
        probe_or_refuse(model, (64, 64))
    size = model.smallest_export_size(64)
    shapes = probe_shapes(model.backbones["seg"], (size, size)).values()
    assert size > 64 and min(resolution(s, model.layout) for s in shapes) >= 2
    probe_or_refuse(model, (size, size))


def test_tensorflow_padding_keeps_the_export_size_and_says_why(timm, tmp_path):
    model = from_timm("tf_mobilenetv3_small_minimal_100")
    assert list(dynamic_shapes(model, dynamic=True)["x"]) == [0]
    result = export_verified(model, "pt2", tmp_path / "m.pt2", (64, 64), ExportOptions())
    assert result.passed and (result.inputs.batch, result.inputs.height) == (3, 64)
    artifact = FORMATS["pt2"].load(tmp_path / "m.pt2")
    with pytest.raises(CrossStitchError, match="TensorFlow-style 'same' padding"):
        check_artifact_size(artifact, tmp_path / "m.pt2", (96, 96))
    assert list(dynamic_shapes(from_timm("mobilenetv3_small_050"), dynamic=True)["x"]) == [0, 2, 3]


def test_cli_builds_exports_and_verifies_a_timm_model(timm, cli):
    code, out, err = cli(
        "build", "timm/resnet10t", "--tasks", "seg", "depth", "--input-size", "64", "--json"
    )
    assert code == 0, err
    built = json.loads(out)
    assert built["config"]["source"] == "timm" and built["config"]["arch"] == "resnet10t"
    assert [s["name"] for s in built["summary"]["stages"]][:2] == ["act1", "layer1"]
    code, out, err = cli("export", "-f", "onnx", "-m", built["output"], "--input-size", "64")
    assert code == 0, err
    code, out, err = cli("verify", "crossstitch.onnx", "--against", built["output"])
    assert code == 0 and "PASS" in out, err
    code, out, err = cli("inspect", built["output"])
    assert code == 0 and "timm/resnet10t" in out, err


def test_cli_refuses_what_does_not_apply_to_timm(timm, cli):
    code, _, err = cli("build", "timm/resnet10t", "--tasks", "a", "b", "--output-stride", "8")
    assert code == 2 and "--output-stride" in err
    code, _, err = cli("build", "timm/resnet10t", "--tasks", "a", "b", "--weights", "DEFAULT")
    assert code == 2 and "pretrained or none" in err


def test_unknown_timm_names_get_a_did_you_mean(timm, cli):
    code, _, err = cli("build", "timm/resnet10x", "--tasks", "a", "b")
    assert code == 2
    assert err.startswith("Error: ARCH: unknown timm model 'resnet10x'; did you mean")
    assert "timm/resnet10t" in err


def test_list_timm_shows_stages_and_refusals(timm, cli):
    code, out, err = cli("list", "--timm", "convnext_atto", "--json")
    assert code == 0, err
    (entry,) = json.loads(out)["models"]
    assert [s["name"] for s in entry["stages"]] == [f"stages_{i}" for i in range(4)]
    assert [s["channels"] for s in entry["stages"]] == [40, 80, 160, 320]
    code, out, err = cli("list", "--timm", "hrnet_w18_s*", "--limit", "1")
    assert code == 0, err
    assert "refused" in out and "Showing 1 of" in out


def test_without_timm_one_error_says_how_to_install_it(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    code, out, err = cli("build", "timm/resnet10t", "--tasks", "a", "b")
    assert code == 2 and out == ""
    assert err == 'Error: timm is not installed; pip install "crossstitch[timm]"\n'


def test_the_cli_imports_no_timm_for_help():
    code = "import sys, crossstitch.cli.app; print('timm' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"]


coverage = load_script("coverage_timm")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [n for names in coverage.SAMPLE.values() for n in names if not n.startswith(("hrnet", "vit"))],
)
def test_identity_contract_over_the_sample(timm, name):
    try:
        model = from_timm(name, features="all")
    except CrossStitchError as exc:
        pytest.skip(f"refused: {exc.detail}")
    assert coverage.identity_check(name, model, model.smallest_export_size(64))
