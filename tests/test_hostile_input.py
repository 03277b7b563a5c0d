"""Hostile and broken input through the CLI: nothing lost, nothing rendered, nothing passed.

Each test names the class of input it stands for (docs/design.md §6, §7, §9).
"""

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import crossstitch
from crossstitch import CrossStitchError
from crossstitch.checkpoint import read
from helpers import EXE, build, image
from hostile import (
    call_pickle,
    hostile_expression,
    hostile_sample_inputs,
    member_named,
    rezip,
    zip_bomb,
)

# ---- no code from any file, in any command ---------------------------------------------------


def _hostile_checkpoint(path: Path) -> None:
    crossstitch.save(build(), path)
    data = path.read_bytes()
    path.write_bytes(
        rezip(data, {member_named(data, "data.pkl"): call_pickle("builtins", "open", "PWNED", "w")})
    )


@pytest.mark.parametrize("make", [hostile_sample_inputs, hostile_expression])
def test_a_hostile_pt2_runs_no_code_in_verify_or_bench(cli, exported, tmp_path, make):
    folder, _ = exported
    crossstitch.save(
        crossstitch.load(folder / "crossstitch.safetensors"), tmp_path / "crossstitch.safetensors"
    )
    (tmp_path / "crossstitch.pt2").write_bytes(make((folder / "crossstitch.pt2").read_bytes()))
    for args in (
        ["verify", "crossstitch.pt2"],
        ["bench", "--batch", "1", "--input-size", "64", "--runs", "1", "--no-training"],
    ):
        code, out, err = cli(*args)
        assert code == 2, (args, out, err)
        assert "it was refused" in err.splitlines()[0] and "weights_only" not in err
    assert not list(tmp_path.glob("MARKER*"))


def test_a_hostile_torchscript_file_runs_no_code(cli, exported, tmp_path):
    folder, _ = exported
    data = (folder / "crossstitch.torchscript.pt").read_bytes()
    hostile = rezip(
        data, {member_named(data, "/constants.pkl"): call_pickle("os", "system", "touch PWNED")}
    )
    (tmp_path / "m.torchscript.pt").write_bytes(hostile)
    code, _, err = cli(
        "verify", "m.torchscript.pt", "--against", str(folder / "crossstitch.safetensors")
    )
    assert code == 2 and "would import os.system" in err.splitlines()[0], err
    assert not (tmp_path / "PWNED").exists()


def test_hostile_checkpoints_and_weight_files_run_no_code_in_any_command(cli, exported, tmp_path):
    folder, _ = exported
    _hostile_checkpoint(tmp_path / "evil.pt")
    for args in (
        ["verify", "evil.pt"],
        ["inspect", "evil.pt"],
        ["export", "--format", "onnx", "--model", "evil.pt"],
        ["bench", "--model", "evil.pt"],
        ["verify", str(folder / "crossstitch.onnx"), "--against", "evil.pt"],
        ["build", "resnet18", "-t", "a,b", "--weights-file", "evil.pt"],
        ["build", "resnet18", "-t", "a,b", "--task-weights", "a=evil.pt"],
    ):
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        assert "would import builtins.open" in err.splitlines()[0], (args, err)
        assert "weights_only" not in err
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_a_zip_bomb_is_refused_at_once(cli, tmp_path):
    zip_bomb(tmp_path / "bomb.pt", 2**31)
    for args in (["verify", "bomb.pt"], ["inspect", "bomb.pt"]):
        code, _, err = cli(*args)
        assert code == 2 and "zip bomb" in err.splitlines()[0], err


# ---- nothing lost: outputs that name an input, existing checkpoints, full disks --------------


def test_export_refuses_an_output_that_names_its_input(cli, tmp_path):
    crossstitch.save(build(), tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    for args in (["-o", "m.pt"], ["-o", str(tmp_path / "m.pt")], ["-o", "./m.pt"]):
        code, _, err = cli("export", "--model", "m.pt", "--format", "pt2", *args)
        assert code == 2 and "which this command reads" in err.splitlines()[0], err
    assert (tmp_path / "m.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_build_refuses_an_output_that_names_its_weights_file(cli, tmp_path):
    torch.save(build().backbones["seg"].state_dict(), tmp_path / "w.pth")
    before = (tmp_path / "w.pth").read_bytes()
    code, _, err = cli("build", "resnet18", "-t", "a,b", "--task-weights", "a=w.pth", "-o", "w.pth")
    assert code == 2 and "which this command reads" in err, err
    assert (tmp_path / "w.pth").read_bytes() == before


def test_build_keeps_an_existing_checkpoint_unless_forced(cli, tmp_path):
    previous = tmp_path / "crossstitch.safetensors"
    previous.write_bytes(b"previous checkpoint")
    code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "--input-size", "32")
    assert code == 2 and "--force" in err.splitlines()[0], err
    assert previous.read_bytes() == b"previous checkpoint"
    code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "--input-size", "32", "--force")
    assert code == 0, err
    assert crossstitch.load(previous).tasks == ["a", "b"]


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int, read_only: bool = False):
    """A tmpfs of ``megabytes`` at ``folder``, where this machine lets the tests mount one."""
    folder.mkdir()
    options = f"size={megabytes}m" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_disk_too_small_is_refused_before_writing(cli, tmp_path):
    with small_disk(tmp_path / "disk", 20) as disk:
        code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "-o", str(disk / "m.pt"))
        assert code == 2 and "MB free; nothing was written" in err.splitlines()[0], err
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("command", ["build", "onnx", "torchscript", "pt2"])
def test_a_disk_that_fills_up_while_writing_loses_nothing(cli, tmp_path, monkeypatch, command):
    crossstitch.save(build(), tmp_path / "crossstitch.safetensors")
    monkeypatch.setattr(
        "crossstitch.files.shutil.disk_usage",
        lambda path: type("Usage", (), {"free": 10**12})(),
    )
    with small_disk(tmp_path / "disk", 40) as disk:
        old = disk / ("m.pt" if command == "build" else "m.out")
        old.write_bytes(b"previous file")
        if command == "build":
            args = ["build", "resnet18", "-t", "a,b", "-o", str(old), "--force"]
        else:
            args = ["export", "--format", command, "-o", str(old), "--input-size", "64"]
        code, out, err = cli(*args)
        assert code == 1, (out, err)
        lines = err.strip().splitlines()
        assert lines[0].startswith("Error: writing failed") and len(lines) == 1, err
        assert "No space left on device" in lines[0]
        assert old.read_bytes() == b"previous file"
        assert sorted(p.name for p in disk.iterdir()) == [old.name]


def test_an_unwritable_output_folder_is_refused_before_building(cli, tmp_path):
    with small_disk(tmp_path / "ro", 1, read_only=True) as folder:
        code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "-o", str(folder / "m.pt"))
        assert code == 2 and "is not writable" in err.splitlines()[0], err


# ---- text from users and files is data -------------------------------------------------------

MARKUP = "[bold]x[link=file:z]y[red]"
TERMINAL = "a\x1b]0;title\x07b\x1b[31mc"


def test_paths_with_markup_and_escapes_are_printed_as_data(cli, tmp_path):
    for name in (f"{MARKUP}.pt", f"{TERMINAL}.pt"):
        code, out, err = cli("build", "resnet18", "-t", "a,b", "--input-size", "32", "-o", name)
        assert code == 0, err
        code, out2, err = cli("inspect", name)
        assert code == 0, err
        for text in (out, out2):
            assert "\x1b" not in text and "\x07" not in text
        shown = name.replace("\x1b", "\\x1b").replace("\x07", "\\x07")
        assert shown in out.replace("\n", "") and shown in out2.replace("\n", "")


@pytest.mark.parametrize("tasks", [[MARKUP, "b"], [TERMINAL, "b"], ["[/]", "b"]])
def test_names_with_markup_or_control_characters_in_a_file_are_refused(cli, tmp_path, tasks):
    crossstitch.save(build(), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["config"]["tasks"] = tasks
    torch.save(payload, tmp_path / "m.pt")
    for command in ("inspect", "verify"):
        code, out, err = cli(command, "m.pt")
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert lines[0].startswith("Error: ") and len(lines) == 1 and "'tasks'" in lines[0]
        assert "\x1b" not in err and "Traceback" not in err


def test_error_messages_quoting_markup_do_not_crash(cli):
    code, _, err = cli("build", "[/]", "--tasks", "a", "b")
    assert code == 2 and "'[/]'" in err and "Traceback" not in err, err
    code, _, err = cli("build", "resnet18", "--tasks", "[bold]a", "b")
    assert code == 2 and "'[bold]a'" in err, err


# ---- verify never passes a broken model ------------------------------------------------------


def _checkpoint_with(tmp_path: Path, **changes) -> Path:
    model = build()
    with torch.no_grad():
        for stage, value in changes.items():
            model.cross_stitch[stage].weight.fill_(value)
    path = tmp_path / "crossstitch.safetensors"
    crossstitch.save(model, path)
    return path


def test_nan_unit_weights_fail_verification_with_the_reason(cli, tmp_path):
    _checkpoint_with(tmp_path, layer3=float("nan"))
    code, out, err = cli("verify", "--against", "reference", "--input-size", "64")
    assert code == 1, (out, err)
    assert "FAIL" in out and "unit weights after layer3 are not finite" in out


def test_infinite_outputs_fail_even_where_model_and_reference_agree(cli, tmp_path):
    _checkpoint_with(tmp_path, layer4=3e38)
    code, out, err = cli("verify", "--input-size", "64", "--json")
    assert code == 1, err
    result = json.loads(out)
    assert not result["passed"]
    assert all("non-finite" in o["problem"] for o in result["outputs"])
    assert all(not o["identical"] for o in result["outputs"])


def test_artifact_verification_flags_non_finite_outputs(cli, tmp_path):
    _checkpoint_with(tmp_path, layer4=float("nan"))
    code, out, err = cli("export", "--format", "pt2", "--input-size", "64", "--json")
    assert code == 1, err
    (artifact,) = json.loads(out)["artifacts"]
    assert not artifact["written"]
    assert all(o["problem"] == "non-finite values" for o in artifact["comparison"]["outputs"])


# ---- names that collide with the graph, numbers that overflow, bad sizes ---------------------

BAD_VALUES = {
    "task named image": (["build", "resnet18", "-t", "image,depth"], "'image' is reserved"),
    "alpha beyond float32": (["build", "resnet18", "-t", "a,b", "--alpha", "1e308"], "--alpha"),
    "beta beyond float32": (["build", "resnet18", "-t", "a,b", "--beta", "-1e39"], "--beta"),
    "huge input size": (
        ["build", "resnet18", "-t", "a,b", "--input-size", "99999999999999999999"],
        "--input-size",
    ),
    "huge head": (["build", "resnet18", "-t", "a,b", "--head", "a=99999999999"], "--head"),
    "absurd head": (["build", "resnet18", "-t", "a,b", "--head", "a=1000000000"], "GB of memory"),
    "missing output folder": (["build", "resnet18", "-t", "a,b", "-o", "no/m.pt"], "not exist"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_one_error_line_with_exit_2(cli, tmp_path, case):
    args, expected = BAD_VALUES[case]
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2 and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("alpha", 1e308), ("heads", {"seg": 10**10}), ("tasks", ["image", "b"]), ("seed", -1)],
)
def test_bad_config_values_in_a_file_are_refused(cli, tmp_path, field, value):
    crossstitch.save(build(), tmp_path / "crossstitch.pt")
    payload = torch.load(tmp_path / "crossstitch.pt", weights_only=True)
    payload["config"][field] = value
    torch.save(payload, tmp_path / "crossstitch.pt")
    for command in (
        ["verify", "crossstitch.pt"],
        ["inspect", "crossstitch.pt"],
        ["export", "--format", "pt2", "-m", "crossstitch.pt"],
    ):
        code, _, err = cli(*command)
        assert code == 2 and f"config field '{field}'" in err.splitlines()[0], (command, err)


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_an_input_size_the_model_cannot_take_is_refused(cli, tmp_path, command):
    crossstitch.save(build("vgg11"), tmp_path / "crossstitch.safetensors")
    code, _, err = cli(command, "--input-size", "1")
    assert code == 2 and "--input-size: 1x1 is too small for vgg11" in err.splitlines()[0], err


def test_onnx_metadata_missing_fields_is_refused(cli, exported, tmp_path):
    import onnx

    folder, _ = exported
    proto = onnx.load(str(folder / "crossstitch.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "crossstitch.config":
            config = json.loads(prop.value)
            del config["export_input"], config["granularity"]
            prop.value = json.dumps(config)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    for command in ("verify", "inspect"):
        against = (
            ["--against", str(folder / "crossstitch.safetensors")] if command == "verify" else []
        )
        code, _, err = cli(command, "m.onnx", *against)
        assert code == 2 and "config field" in err.splitlines()[0], err


# ---- output encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "LANG": "C"}])
def test_every_command_works_with_an_ascii_terminal(tmp_path, env):
    environ = {k: v for k, v in os.environ.items() if k not in ("LANG", "LC_ALL")} | env
    if "PYTHONIOENCODING" not in env:
        environ.pop("PYTHONIOENCODING", None)
        environ["PYTHONUTF8"] = "0"
    for args in (
        ["build", "resnet18", "-t", "seg,depth", "--head", "seg=2", "--input-size", "64"],
        ["inspect"],
        ["verify", "--input-size", "64"],
        ["list"],
        ["build", "resnet18", "-t", "x"],
    ):
        result = subprocess.run([EXE, *args], cwd=tmp_path, env=environ, capture_output=True)
        expected = 2 if args[-1] == "x" else 0
        assert result.returncode == expected, result.stderr
        result.stdout.decode("ascii")
        assert b"Traceback" not in result.stderr


# ---- the library checks types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tasks", "message"),
    [("seg", "the string 'seg'"), (["seg", 2], "must be strings"), ({"a", "b"}, "list of task")],
)
def test_the_library_refuses_task_lists_of_the_wrong_type(tasks, message):
    with pytest.raises(CrossStitchError, match=message) as caught:
        crossstitch.CrossStitchBackbone.from_torchvision("resnet18", tasks=tasks)
    assert caught.value.param == "tasks"


def test_builders_take_keyword_arguments_only():
    with pytest.raises(TypeError):
        crossstitch.CrossStitchBackbone.from_torchvision("resnet18", ["a", "b"])


def test_checkpoints_round_trip_their_typed_config(tmp_path):
    model = build(heads={"seg": 3}, output_stride=16)
    crossstitch.save(model, tmp_path / "m.pt")
    assert read(tmp_path / "m.pt").config == model.config
    loaded = crossstitch.load(tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(image())["seg"], model.eval()(image())["seg"])
