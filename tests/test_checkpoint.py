import pickle

import pytest
import torch

import crossstitch
from crossstitch import CrossStitchError
from crossstitch.checkpoint import read
from helpers import build, image, randomize_units


def test_round_trip_gives_identical_outputs(tmp_path):
    model = build("resnet18", ["seg", "depth", "normals"], granularity="layer", stages=["layer3"])
    randomize_units(model)
    path = crossstitch.save(model, tmp_path / "m.pt")
    loaded = crossstitch.load(path)
    assert loaded.tasks == model.tasks
    assert list(loaded.cross_stitch) == ["layer3"]
    assert loaded.config.granularity == "layer"
    x = image()
    want, got = model.eval()(x), loaded.eval()(x)
    assert all(torch.equal(want[t], got[t]) for t in model.tasks)


def test_file_holds_format_version_config_and_state_dict(tmp_path):
    crossstitch.save(build(alpha=0.8), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "crossstitch" and payload["version"] == 1
    config = payload["config"]
    assert config["arch"] == "resnet18" and config["tasks"] == ["seg", "depth"]
    assert config["alpha"] == 0.8 and config["beta"] == pytest.approx(0.2)
    assert config["stages"] == ["layer1", "layer2", "layer3", "layer4"]
    assert set(config["versions"]) == {"crossstitch", "torch", "torchvision"}


def test_models_from_own_modules_cannot_be_saved_as_checkpoints(tmp_path):
    import torchvision

    model = crossstitch.CrossStitchBackbone(
        {"a": torchvision.models.resnet18(), "b": torchvision.models.resnet18()}
    )
    with pytest.raises(CrossStitchError, match="state_dict"):
        crossstitch.save(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def _write(path, kind):
    if kind == "plain state_dict":
        torch.save(build().state_dict(), path)
    elif kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "truncated":
        crossstitch.save(build(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "code in a pickle":
        torch.save({"format": "crossstitch", "evil": RunsCode()}, path)
    elif kind == "raw pickle":
        path.write_bytes(pickle.dumps(RunsCode()))
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "kind",
    ["plain state_dict", "random bytes", "truncated", "code in a pickle", "raw pickle", "empty"],
)
def test_foreign_and_hostile_files_are_refused(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.pt"
    _write(path, kind)
    refused = "not a crossstitch checkpoint|not a readable zip archive|without running anything"
    with pytest.raises(CrossStitchError, match=refused):
        crossstitch.load(path)
    assert not (tmp_path / "PWNED").exists()


def _resave(path, mutate):
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.update(version=2), "newer crossstitch"),
        (lambda p: p.update(version="1"), "format version"),
        (lambda p: p.update(config=[]), "no config"),
        (lambda p: p["config"].update(alpha="0.9"), "'alpha'"),
        (lambda p: p["config"].update(beta=float("nan")), "'beta' must be a finite"),
        (lambda p: p["config"].update(tasks=[1, 2]), "'tasks' task names must be strings"),
        (lambda p: p["config"].update(arch="resnet99"), "unknown architecture"),
        (lambda p: p.update(state_dict={"x": 1}), "no valid state_dict"),
        (lambda p: p["state_dict"].pop("cross_stitch.layer1.weight"), "do not fit"),
    ],
)
def test_damaged_checkpoints_are_refused_with_the_reason(tmp_path, mutate, message):
    path = tmp_path / "m.pt"
    crossstitch.save(build(), path)
    _resave(path, mutate)
    with pytest.raises(CrossStitchError, match=message):
        crossstitch.load(path)


def test_read_does_not_need_the_model(tmp_path):
    crossstitch.save(build(), tmp_path / "m.pt")
    assert read(tmp_path / "m.pt").config.tasks == ("seg", "depth")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    crossstitch.save(build(), path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        crossstitch.save(build(alpha=0.5), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
