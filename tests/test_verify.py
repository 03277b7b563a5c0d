"""`crossstitch verify` and `crossstitch export` from the command line, good input and bad."""

import json
import pickle
import signal

import onnx
import pytest
import torch

import crossstitch
from helpers import build, interrupt_when_staged


@pytest.fixture
def folder(exported, tmp_path, monkeypatch):
    """A private view of the exported folder, as the current directory.

    The files are symbolic links, which keeps each test's folder small; a test that rewrites one of
    them in place must unlink it first, or it would change the shared original.
    """
    source, _ = exported
    for path in source.iterdir():
        (tmp_path / path.name).symlink_to(path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_checkpoint_matches_the_reference_bit_for_bit(cli, folder):
    code, out, err = cli("verify", "--against", "reference")
    assert code == 0, err
    assert "bit-exact" in out and "FAIL" not in out and out.strip().endswith("PASS")


@pytest.mark.parametrize(
    "name", ["crossstitch.onnx", "crossstitch.torchscript.pt", "crossstitch.pt2"]
)
def test_each_artifact_verifies_against_its_checkpoint(cli, folder, name):
    code, out, err = cli("verify", name, "--batch", "1", "--input-size", "72", "100", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["passed"] and result["against"] == "crossstitch.safetensors"
    assert result["inputs"] == {"batch": 1, "height": 72, "width": 100, "seed": 0}
    assert [o["shape"] for o in result["comparison"]["outputs"]] == [[1, 512, 3, 4]] * 2


def test_a_tampered_onnx_file_fails(cli, folder):
    path = folder / "crossstitch.onnx"
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    weight = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    path.unlink()
    onnx.save(proto, str(path))
    code, out, _ = cli("verify", "crossstitch.onnx")
    assert code == 1
    assert "FAIL" in out and out.strip().endswith("FAIL")


def test_verify_replays_with_the_reported_seed(cli, folder):
    first = json.loads(cli("verify", "crossstitch.onnx", "--seed", "5", "--json")[1])
    again = json.loads(cli("verify", "crossstitch.onnx", "--seed", "5", "--json")[1])
    assert first["inputs"]["seed"] == 5 and first == again


def test_artifact_from_another_checkpoint_is_reported(cli, folder):
    crossstitch.save(build(tasks=["seg", "normals"]), folder / "other.pt")
    code, _, err = cli("verify", "crossstitch.onnx", "--against", "other.pt")
    assert code == 2
    assert err.startswith("Error: crossstitch.onnx does not come from this checkpoint: tasks")


def _foreign_onnx(path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


BAD_FILES = {
    "missing": (lambda p: None, "does not exist"),
    "empty": (lambda p: p.write_bytes(b""), "neither"),
    "random bytes": (lambda p: p.write_bytes(bytes(range(256)) * 50), "neither"),
    "truncated onnx": (
        lambda p: p.write_bytes((p.parent / "crossstitch.onnx").read_bytes()[:4000]),
        "",
    ),
    "truncated checkpoint": (
        lambda p: p.write_bytes((p.parent / "crossstitch.safetensors").read_bytes()[:9000]),
        "",
    ),
    "plain state_dict": (lambda p: torch.save(build().state_dict(), p), "plain state_dict"),
    "onnx of something else": (_foreign_onnx, "not one exported by crossstitch"),
    "pickle running code": (lambda p: p.write_bytes(pickle.dumps(RunsCode())), "neither"),
    "torch.save running code": (
        lambda p: torch.save({"x": RunsCode()}, p),
        "refused without running anything",
    ),
    "a folder": (lambda p: p.mkdir(), "not a file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_without_running_anything(cli, folder, case):
    make, expected = BAD_FILES[case]
    path = folder / "suspect.bin"
    make(path)
    code, out, err = cli("verify", "suspect.bin")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2 and expected in lines[0]
    assert "Traceback" not in err
    assert not (folder / "PWNED").exists()


BAD_EXPORTS = {
    "unknown format": (["--format", "tflite"], "'tflite' is not one of 'onnx'"),
    "missing format": ([], "Missing option '--format'"),
    "missing model": (["--format", "onnx", "--model", "nope.pt"], "nope.pt does not exist"),
    "model is an artifact": (
        ["--format", "onnx", "--model", "crossstitch.onnx"],
        "not a crossstitch checkpoint",
    ),
    "opset too old": (["--format", "onnx", "--opset", "11"], "--opset 11"),
    "negative atol": (["--format", "onnx", "--atol", "-1"], "--atol"),
    "nan rtol": (["--format", "onnx", "--rtol", "nan"], "--rtol"),
    "zero input size": (["--format", "pt2", "--input-size", "0", "64"], "--input-size"),
    "output folder missing": (["--format", "pt2", "-o", "no/such/dir/m.pt2"], "does not exist"),
    "output is a folder": (["--format", "pt2", "-o", "."], "is a folder"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_bad_export_requests_are_refused_before_any_work(cli, folder, case):
    args, expected = BAD_EXPORTS[case]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = cli("export", *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2 and expected in lines[0], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["crossstitch.safetensors", "--against", "other.pt"], "verified against the reference"),
        (["crossstitch.onnx", "--against", "reference"], "against the checkpoint it came from"),
        (["crossstitch.onnx", "--against", "nothing.pt"], "nothing.pt does not exist"),
        (["crossstitch.safetensors", "--batch", "0"], "--batch"),
        (["crossstitch.safetensors", "--seed", "-2"], "--seed"),
        (["crossstitch.safetensors", "--atol", "-1"], "--atol"),
        (["crossstitch.onnx", "--input-size", "1", "2", "3"], "--input-size"),
        (["crossstitch.safetensors", "--input-size", "-3"], "--input-size"),
    ],
)
def test_bad_verify_requests_are_refused(cli, folder, args, expected):
    code, _, err = cli("verify", *args)
    assert code == 2
    assert err.startswith("Error: ") and expected in err.splitlines()[0]


def test_export_json_is_the_only_thing_on_stdout(cli, folder):
    code, out, err = cli("export", "--format", "torchscript", "-o", "ts.pt", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["artifacts"][0]["details"]["method"] in ("scripted", "traced")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_export_leaves_no_temporaries_and_keeps_the_old_file(folder, sig):
    previous = (folder / "crossstitch.onnx").read_bytes()
    code, err = interrupt_when_staged(
        ["export", "--format", "onnx"], folder, ".crossstitch.onnx.*", sig, settle=0.5
    )
    assert code in (130, 128 + sig), err
    assert b"Traceback" not in err
    assert not list(folder.glob(".*")), list(folder.glob(".*"))
    assert (folder / "crossstitch.onnx").read_bytes() == previous
