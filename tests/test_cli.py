import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import crossstitch


def test_build_prints_the_stage_table_and_writes_the_checkpoint(cli, tmp_path):
    code, out, err = cli("build", "resnet18", "--tasks", "seg", "depth", "--input-size", "64")
    assert code == 0, err
    for text in [
        "layer1",
        "layer4",
        "16×16",
        "2×2",
        "seg, depth",
        "alpha=0.9, beta=0.1",
        "crossstitch.pt",
    ]:
        assert text in out
    assert crossstitch.load(tmp_path / "crossstitch.pt").tasks == ["seg", "depth"]


@pytest.mark.parametrize(
    "task_args",
    [
        ["--tasks", "seg", "depth", "normals"],
        ["--tasks", "seg,depth,normals"],
        ["--tasks", "seg", "--tasks", "depth", "-t", "normals"],
        ["--tasks=seg", "depth,normals"],
    ],
)
def test_all_task_forms_mean_the_same(cli, task_args):
    code, out, err = cli("build", "resnet18", *task_args, "--json", "-o", "m.pt")
    assert code == 0, err
    assert json.loads(out)["config"]["tasks"] == ["seg", "depth", "normals"]


def test_json_result_carries_config_and_summary(cli):
    code, out, _ = cli(
        "build",
        "vgg11_bn",
        "--tasks",
        "a,b",
        "--granularity",
        "layer",
        "--stages",
        "block2",
        "block5",
        "--alpha",
        "0.7",
        "--input-size",
        "64",
        "96",
        "--seed",
        "3",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["config"]["stages"] == ["block2", "block5"]
    assert result["config"]["seed"] == 3
    assert result["config"]["beta"] == pytest.approx(0.3)
    summary = result["summary"]
    assert summary["input_size"] == [64, 96]
    assert summary["stages"][4]["feature_size"] == [2, 3]
    assert [s["stitch_params"] for s in summary["stages"]] == [0, 4, 0, 0, 4]
    assert summary["total_params"] == 2 * summary["params_per_task"] + summary["stitch_params"]


def test_seed_makes_builds_reproducible_to_the_byte(cli, tmp_path):
    for name in ("x.pt", "y.pt", "z.pt"):
        seed = "5" if name == "z.pt" else "4"
        assert cli("build", "resnet18", "--tasks", "a", "b", "--seed", seed, "-o", name)[0] == 0
    x, y, z = ((tmp_path / n).read_bytes() for n in ("x.pt", "y.pt", "z.pt"))
    assert x == y
    assert x != z


def test_list_shows_architectures_stages_and_weights(cli):
    code, out, _ = cli("list", "--json")
    assert code == 0
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["resnet50"]["family"] == "resnet"
    assert entries["resnet50"]["stages"][3] == {"name": "layer4", "channels": 2048, "reduction": 32}
    assert "IMAGENET1K_V2" in entries["resnet50"]["weights"]
    code, out, _ = cli("list")
    assert code == 0 and "wide_resnet50_2" in out and "block1-5" in out


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"crossstitch {crossstitch.__version__}"


def test_entry_point_runs_the_readme_command_in_an_empty_folder(tmp_path):
    exe = shutil.which("crossstitch", path=os.path.dirname(sys.executable)) or shutil.which(
        "crossstitch"
    )
    assert exe, "the crossstitch console script is not installed"
    result = subprocess.run(
        [exe, "build", "resnet18", "--tasks", "seg", "depth"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "layer4" in result.stdout and result.stderr == ""
    assert (tmp_path / "crossstitch.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["crossstitch.pt"]


BAD_INPUT = {
    "misspelt architecture": (["build", "resnet-18", "--tasks", "a", "b"], "did you mean resnet18"),
    "unknown architecture": (["build", "transformer9000", "--tasks", "a", "b"], "crossstitch list"),
    "one task": (["build", "resnet18", "--tasks", "seg"], "at least two tasks"),
    "no tasks": (["build", "resnet18"], "Missing option '--tasks'"),
    "duplicate tasks": (["build", "resnet18", "--tasks", "seg", "seg"], "repeated: seg"),
    "task starting with digit": (["build", "resnet18", "--tasks", "2d", "depth"], "'2d'"),
    "task with a dot": (["build", "resnet18", "--tasks", "seg.x", "depth"], "'seg.x'"),
    "task with a space": (["build", "resnet18", "--tasks", "se g,depth"], "'se g'"),
    "nan alpha": (
        ["build", "resnet18", "--tasks", "a", "b", "--alpha", "nan"],
        "alpha must be a finite",
    ),
    "inf beta": (
        ["build", "resnet18", "--tasks", "a", "b", "--beta", "inf"],
        "beta must be a finite",
    ),
    "alpha not a number": (
        ["build", "resnet18", "--tasks", "a", "b", "--alpha", "lots"],
        "(got 'lots')",
    ),
    "unknown stage": (["build", "resnet18", "--tasks", "a", "b", "--stages", "layer5"], "'layer5'"),
    "vgg stage on resnet": (
        ["build", "resnet18", "--tasks", "a", "b", "--stages", "block1"],
        "layer1",
    ),
    "unknown granularity": (
        ["build", "resnet18", "--tasks", "a", "b", "--granularity", "pixel"],
        "pixel",
    ),
    "unknown weights": (
        ["build", "resnet18", "--tasks", "a", "b", "--weights", "IMAGENET"],
        "IMAGENET1K_V1",
    ),
    "weights of another model": (
        ["build", "resnet18", "--tasks", "a", "b", "--weights", "IMAGENET1K_V2"],
        "available",
    ),
    "missing weights file": (
        ["build", "resnet18", "--tasks", "a", "b", "--weights-file", "no.pth"],
        "no.pth",
    ),
    "task weights without =": (
        ["build", "resnet18", "--tasks", "a", "b", "--task-weights", "a"],
        "TASK=PATH",
    ),
    "task weights unknown task": (
        ["build", "resnet18", "--tasks", "a", "b", "--task-weights", "c=x.pt"],
        "unknown task c",
    ),
    "head without =": (["build", "resnet18", "--tasks", "a", "b", "--head", "a"], "TASK=CHANNELS"),
    "head of zero channels": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "a=0"],
        "positive integer, got '0'",
    ),
    "head channels not a number": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "a=many"],
        "'many'",
    ),
    "head for unknown task": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "c=2"],
        "heads given for unknown task c",
    ),
    "head given twice": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "a=2", "--head", "a=3"],
        "task 'a' twice",
    ),
    "output stride 4": (
        ["build", "resnet18", "--tasks", "a", "b", "--output-stride", "4"],
        "unknown output stride 4; use one of: 8, 16, 32",
    ),
    "output stride 64": (
        ["build", "resnet50", "--tasks", "a", "b", "--output-stride", "64"],
        "unknown output stride 64; use one of: 8, 16, 32",
    ),
    "output stride on vgg": (
        ["build", "vgg11", "--tasks", "a", "b", "--output-stride", "16"],
        "output stride 16 needs dilated convolutions, which only the resnet family supports",
    ),
    "unknown features": (
        ["build", "resnet18", "--tasks", "a", "b", "--features", "some"],
        "unknown features 'some'; use one of: last, all",
    ),
    "output folder missing": (
        ["build", "resnet18", "--tasks", "a", "b", "-o", "nowhere/m.pt"],
        "does not exist",
    ),
    "output is a folder": (["build", "resnet18", "--tasks", "a", "b", "-o", "."], "is a folder"),
    "zero input size": (
        ["build", "resnet18", "--tasks", "a", "b", "--input-size", "0"],
        "--input-size",
    ),
    "three input sizes": (
        ["build", "resnet18", "--tasks", "a", "b", "--input-size", "1", "2", "3"],
        "one or two",
    ),
    "input too small": (["build", "vgg11", "--tasks", "a", "b", "--input-size", "16"], "too small"),
    "negative seed": (["build", "resnet18", "--tasks", "a", "b", "--seed", "-1"], "--seed"),
    "huge seed": (["build", "resnet18", "--tasks", "a", "b", "--seed", "9" * 30], "--seed"),
    "input size not a number": (
        ["build", "resnet18", "-t", "a,b", "--input-size", "224x224"],
        "224x224",
    ),
    "tasks in the arch slot": (
        ["build", "--tasks", "seg", "depth", "resnet18"],
        "Missing argument",
    ),
    "empty task list": (["build", "resnet18", "--tasks", ","], "at least two tasks"),
    "unknown command": (["bild", "resnet18"], "No such command 'bild'"),
    "unknown option": (["build", "resnet18", "--tasks", "a", "b", "--colour"], "--colour"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_with_exit_2(cli, tmp_path, case):
    args, expected = BAD_INPUT[case]
    previous = tmp_path / "crossstitch.pt"
    previous.write_bytes(b"previous good file")
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2, err
    assert expected in lines[0]
    assert "Traceback" not in err and out == ""
    assert previous.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crossstitch.pt"]


def test_garbage_weights_file_is_refused(cli, tmp_path):
    Path(tmp_path / "junk.pth").write_bytes(b"\x00junk" * 100)
    code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "--weights-file", "junk.pth")
    assert code == 2 and err.startswith("Error: junk.pth is not a readable state_dict file")


def test_debug_shows_the_traceback(cli):
    code, _, err = cli("build", "resnet18", "--tasks", "seg", "--debug")
    assert code == 2
    assert "Traceback" in err and "Error: a cross-stitch network needs at least two tasks" in err


def test_help_list_and_usage_errors_do_not_import_torch():
    script = (
        "import sys\n"
        "from crossstitch.cli.app import app\n"
        "codes = []\n"
        "for args in (['--help'], ['list'], ['build', '--help'], ['build'],\n"
        "             ['build', 'resnt18', '--tasks', 'a', 'b'], ['export', '--format', 'x']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(codes)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 0, 2, 2, 2]"


def test_tiny_inputs_still_summarise(cli):
    code, out, err = cli("build", "resnet18", "--tasks", "a", "b", "--input-size", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["stages"][3]["feature_size"] == [1, 1]
