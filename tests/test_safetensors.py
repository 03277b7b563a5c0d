"""safetensors checkpoints: the default, read by every command, hostile headers refused."""

import json
import re
import shutil
import struct

import pytest
import safetensors
import safetensors.torch
import torch
import torchvision

import crossstitch
from crossstitch import CrossStitchError
from crossstitch.tensorfile import MAX_HEADER_BYTES
from helpers import build, image, randomize_units

UNIT_KEYS = {f"cross_stitch.layer{i}.weight" for i in range(1, 5)}


def test_build_writes_a_safetensors_checkpoint_by_default(cli, tmp_path):
    code, out, err = cli("build", "resnet18", "--tasks", "seg", "depth", "--input-size", "32")
    assert code == 0, err
    assert "wrote       crossstitch.safetensors" in out
    path = tmp_path / "crossstitch.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    again = (
        "build",
        "resnet18",
        "--tasks",
        "seg",
        "depth",
        "--input-size",
        "32",
        "-o",
        "b.safetensors",
    )
    assert cli(*again)[0] == 0
    assert (tmp_path / "b.safetensors").read_bytes() == path.read_bytes()
    with safetensors.safe_open(path, framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["format"] == "crossstitch" and metadata["version"] == "1"
    config = json.loads(metadata["config"])
    assert config["arch"] == "resnet18" and config["tasks"] == ["seg", "depth"]
    assert config["seed"] == 0
    assert set(config["versions"]) == {"crossstitch", "torch", "torchvision"}
    assert keys == set(crossstitch.load(path).state_dict())


def test_round_trip_is_bit_exact_and_the_same_model_gives_the_same_bytes(tmp_path):
    model = build(granularity="layer", stages=["layer2", "layer4"], heads={"seg": 3})
    randomize_units(model)
    saved = [crossstitch.save(model, tmp_path / f"{i}.safetensors") for i in range(3)]
    first = saved[0]
    assert all(path.read_bytes() == first.read_bytes() for path in saved)
    loaded = crossstitch.load(first)
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    x = image()
    outputs, again = model.eval()(x), loaded.eval()(x)
    assert all(torch.equal(outputs[t], again[t]) for t in model.tasks)


def test_tied_weights_are_saved_and_loaded(tmp_path):
    model = build()
    seg, depth = model.backbones["seg"], model.backbones["depth"]
    depth.stem.conv1.weight = seg.stem.conv1.weight
    with torch.no_grad():
        seg.stem.conv1.weight.mul_(3)
    loaded = crossstitch.load(crossstitch.save(model, tmp_path / "m.safetensors"))
    want = seg.stem.conv1.weight
    assert torch.equal(loaded.backbones["seg"].stem.conv1.weight, want)
    assert torch.equal(loaded.backbones["depth"].stem.conv1.weight, want)


def test_other_names_are_refused_before_anything_is_written(cli, tmp_path):
    with pytest.raises(CrossStitchError, match=r"\*\.safetensors .* or \*\.pt"):
        crossstitch.save(build(), tmp_path / "m.ckpt")
    code, out, err = cli("build", "resnet18", "--tasks", "a", "b", "-o", "m.bin")
    assert code == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "'.bin'" in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["crossstitch.safetensors", "old.pt"])
def test_export_verify_and_inspect_read_new_and_old_checkpoints(cli, tmp_path, name):
    model = build()
    randomize_units(model)
    crossstitch.save(model, tmp_path / name)
    default = name == "crossstitch.safetensors"
    model_args = [] if default else ["--model", name]
    code, out, err = cli("export", "--format", "onnx", "--input-size", "32", *model_args, "--json")
    assert code == 0, err
    artifact = tmp_path / name.replace(".safetensors", ".onnx").replace(".pt", ".onnx")
    assert json.loads(out)["artifacts"][0]["path"] == artifact.name and artifact.is_file()
    against = [] if default else ["--against", name]
    code, out, err = cli("verify", artifact.name, *against, "--input-size", "32", "--json")
    assert code == 0 and json.loads(out)["against"] == name, err
    code, out, err = cli("verify", *([] if default else [name]), "--input-size", "32", "--json")
    assert code == 0 and json.loads(out)["passed"], err
    code, out, err = cli("inspect", *([] if default else [name]), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "checkpoint" and set(report["stages"]) == {
        key.split(".")[1] for key in UNIT_KEYS
    }
    unit = model.cross_stitch["layer3"].weight.detach()
    assert report["stages"]["layer3"]["max"][0][1] == unit[0, 1].max().item()


class _Spy:
    """A ``safe_open`` handle that records the tensors read through it."""

    def __init__(self, handle, read):
        self._handle, self._read = handle, read

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, key):
        self._read.append(key)
        return self._handle.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_inspect_reads_only_the_unit_tensors(cli, tmp_path, monkeypatch):
    crossstitch.save(build(), tmp_path / "crossstitch.safetensors")
    read: list[str] = []
    opened = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _Spy(opened(*a, **k), read))
    code, _, err = cli("inspect", "--json")
    assert code == 0, err
    assert sorted(read) == sorted(UNIT_KEYS)
    read.clear()
    model = crossstitch.load(tmp_path / "crossstitch.safetensors")
    assert sorted(read) == sorted(model.state_dict())


# ---- hostile and damaged files ---------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _by_offset(header: dict) -> list[str]:
    keys = [k for k in header if k != "__metadata__"]
    return sorted(keys, key=lambda k: header[k]["data_offsets"])


def _metadata(**changes):
    def change(header, body):
        header["__metadata__"].update(changes)
        return _join(header, body)

    return change


def _tensor(key_index, **changes):
    def change(header, body):
        header[_by_offset(header)[key_index]].update(changes)
        return _join(header, body)

    return change


def _overlap(header, body):
    first, second = _by_offset(header)[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    return _join(header, body)


def _past_the_end(header, body):
    last = _by_offset(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4096, end + 4096]
    return _join(header, body)


def _float16(header, body):
    key = next(k for k in _by_offset(header) if header[k]["dtype"] == "F32")
    header[key]["dtype"] = "F16"
    return _join(header, body)


def _bad_alpha(header, body):
    config = json.loads(header["__metadata__"]["config"])
    header["__metadata__"]["config"] = json.dumps({**config, "alpha": "x"})
    return _join(header, body)


def _no_metadata(header, body):
    del header["__metadata__"]
    return _join(header, body)


def _not_json(header, body):
    raw = json.dumps(header).encode()
    return _join(b"{not json" + b" " * (len(raw) - 9), body)


HOSTILE = {
    "truncated tensors": (lambda h, b: _join(h, b)[:-1000], "not fully covered"),
    "truncated header": (lambda h, b: _join(h, b)[:4000], "is truncated: its header needs"),
    "oversized header length": (
        lambda h, b: struct.pack("<Q", 2**40) + _join(h, b)[8:],
        f"more than the {MAX_HEADER_BYTES:,} accepted",
    ),
    "offsets past the end": (_past_the_end, "invalid offset"),
    "overlapping offsets": (_overlap, "invalid offset"),
    "shape longer than its bytes": (_tensor(0, shape=[10**6]), "invalid shape"),
    "dtype shorter than its bytes": (_float16, "invalid shape, data type"),
    "unknown dtype": (_tensor(0, dtype="X9"), "not a valid safetensors file"),
    "header not JSON": (_not_json, "not a valid safetensors file"),
    "no metadata": (_no_metadata, "not a crossstitch checkpoint (it looks like a plain"),
    "wrong format": (_metadata(format="other"), "names the format 'other'"),
    "newer version": (_metadata(version="2"), "newer crossstitch (format version 2"),
    "damaged version": (_metadata(version="v1"), "no valid format version"),
    "config not JSON": (_metadata(config="{oops"), "damaged config (not JSON)"),
    "config field of the wrong type": (_bad_alpha, "config field 'alpha'"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint's header and tensor bytes, to be damaged case by case."""
    path = tmp_path_factory.mktemp("saved") / "m.safetensors"
    crossstitch.save(build(), path)
    return _split(path.read_bytes())


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_one_error_line_in_every_command(cli, tmp_path, saved, case):
    make, expected = HOSTILE[case]
    header, body = saved
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(json.loads(json.dumps(header)), body))
    with pytest.raises(CrossStitchError, match=re.escape(expected)):
        crossstitch.load(path)
    for args in (
        ["inspect", path.name],
        ["verify", path.name],
        ["export", "--format", "onnx", "--model", path.name],
        ["build", "resnet18", "-t", "a,b", "--weights-file", path.name, "-o", "m.safetensors"],
    ):
        code, out, err = cli(*args)
        assert code == 2 and out == "", (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, err)
        if args[0] != "build":
            assert expected in lines[0], (args, err)
        assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ---- state_dict files ----------------------------------------------------------------------


def test_safetensors_weight_files_give_the_same_model_as_torch_save_files(cli, tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "w.pth")
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        args = ["build", "resnet18", "-t", "a,b", "--input-size", "32", "--weights-file", name]
        code, _, err = cli(*args, "--task-weights", f"b={name}", "-o", f"{name}.safetensors")
        assert code == 0, err
    old = crossstitch.load(tmp_path / "w.pth.safetensors").state_dict()
    new = crossstitch.load(tmp_path / "w.safetensors.safetensors").state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert torch.equal(new["backbones.b.stem.conv1.weight"], state["conv1.weight"])


def test_a_safetensors_file_in_place_of_a_checkpoint_is_named_a_plain_state_dict(cli, tmp_path):
    shutil.copyfile(__file__, tmp_path / "not-tensors.safetensors")
    safetensors.torch.save_file(build().state_dict(), tmp_path / "sd.safetensors")
    code, _, err = cli("inspect", "sd.safetensors")
    assert code == 2 and "it looks like a plain state_dict" in err, err
    code, _, err = cli("inspect", "not-tensors.safetensors")
    assert code == 2 and "neither a crossstitch checkpoint" in err, err
