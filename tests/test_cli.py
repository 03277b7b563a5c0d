import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import crossstitch
from crossstitch.cli.app import app


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
        "crossstitch.safetensors",
    ]:
        assert text in out
    assert crossstitch.load(tmp_path / "crossstitch.safetensors").tasks == ["seg", "depth"]


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
    assert summary["feature_sizes"]["block5"] == [2, 3]
    assert summary["unit_params"] == {"block2": 4, "block5": 4}
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
    assert "layer4" in result.stdout
    assert result.stderr == "Building resnet18 ...\n"
    assert (tmp_path / "crossstitch.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["crossstitch.safetensors"]


BAD_INPUT = {
    "misspelt architecture": (["build", "resnet-18", "--tasks", "a", "b"], "did you mean resnet18"),
    "unknown architecture": (["build", "transformer9000", "--tasks", "a", "b"], "crossstitch list"),
    "one task": (
        ["build", "resnet18", "--tasks", "seg"],
        "--tasks: a cross-stitch network needs two",
    ),
    "no tasks": (["build", "resnet18"], "Missing option '--tasks'"),
    "duplicate tasks": (["build", "resnet18", "--tasks", "seg", "seg"], "repeated: seg"),
    "task starting with digit": (["build", "resnet18", "--tasks", "2d", "depth"], "'2d'"),
    "task with a dot": (["build", "resnet18", "--tasks", "seg.x", "depth"], "'seg.x'"),
    "task with a space": (["build", "resnet18", "--tasks", "se g,depth"], "'se g'"),
    "nan alpha": (
        ["build", "resnet18", "--tasks", "a", "b", "--alpha", "nan"],
        "--alpha: must be a finite",
    ),
    "inf beta": (
        ["build", "resnet18", "--tasks", "a", "b", "--beta", "inf"],
        "--beta: must be a finite",
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
        "from 1 to 2147483647, got '0'",
    ),
    "head channels not a number": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "a=many"],
        "'many'",
    ),
    "head for unknown task": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "c=2"],
        "--head: given for unknown task 'c'",
    ),
    "head given twice": (
        ["build", "resnet18", "--tasks", "a", "b", "--head", "a=2", "--head", "a=3"],
        "task 'a' twice",
    ),
    "output stride 4": (
        ["build", "resnet18", "--tasks", "a", "b", "--output-stride", "4"],
        "'4' is not one of '32', '16', '8'",
    ),
    "output stride 64": (
        ["build", "resnet50", "--tasks", "a", "b", "--output-stride", "64"],
        "'64' is not one of '32', '16', '8'",
    ),
    "output stride on vgg": (
        ["build", "vgg11", "--tasks", "a", "b", "--output-stride", "16"],
        "--output-stride: 16 needs dilated convolutions, which only the resnet family supports",
    ),
    "unknown features": (
        ["build", "resnet18", "--tasks", "a", "b", "--features", "some"],
        "'some' is not one of 'last', 'all'",
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
        "--tasks took 'resnet18' as a task name",
    ),
    "empty task list": (["build", "resnet18", "--tasks", ","], "needs two or more, got []"),
    "unknown command": (["bild", "resnet18"], "No such command 'bild'"),
    "unknown option": (["build", "resnet18", "--tasks", "a", "b", "--colour"], "--colour"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_with_exit_2(cli, tmp_path, case):
    args, expected = BAD_INPUT[case]
    previous = tmp_path / "previous.pt"
    previous.write_bytes(b"previous good file")
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2, err
    assert expected in lines[0]
    assert "Traceback" not in err and out == ""
    assert previous.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous.pt"]


def test_garbage_weights_file_is_refused(cli, tmp_path):
    Path(tmp_path / "junk.pth").write_bytes(b"\x00junk" * 100)
    code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "--weights-file", "junk.pth")
    assert code == 2 and err.startswith("Error: state_dict file junk.pth is not a readable zip")


def test_debug_shows_the_traceback(cli):
    code, _, err = cli("build", "resnet18", "--tasks", "seg", "--debug")
    assert code == 2
    assert "Traceback" in err and "Error: --tasks: a cross-stitch network needs two or more" in err


def run_without_torch(body: str, env: dict[str, str] | None = None):
    """Run ``body`` in a fresh interpreter with ``app`` imported; it must succeed without torch."""
    script = (
        "import sys\n"
        "from crossstitch.cli.app import app\n"
        f"{body}"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result


def test_help_list_and_usage_errors_do_not_import_torch():
    result = run_without_torch(
        "codes = []\n"
        "for args in (['--help'], ['list'], ['build', '--help'], ['build'],\n"
        "             ['build', 'resnt18', '--tasks', 'a', 'b'], ['export', '--format', 'x']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "print(codes)\n"
    )
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 0, 2, 2, 2]"


def test_long_steps_say_what_runs_when_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["build", "resnet18", "-t", "a,b", "--input-size", "32"])
    assert result.exit_code == 0 and result.stderr == "Building resnet18 ...\n"
    result = CliRunner().invoke(app, ["build", "resnet18", "-t", "a,b", "--json", "-o", "j.pt"])
    assert result.exit_code == 0 and result.stderr == ""


def test_tiny_inputs_still_summarise(cli):
    code, out, err = cli("build", "resnet18", "--tasks", "a", "b", "--input-size", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["feature_sizes"]["layer4"] == [1, 1]


def test_typer_usage_errors_keep_the_interface_the_cli_relies_on():
    """cli/typer_adapter.py reads Typer's usage errors by their interface; an upgrade of Typer
    that changes it fails here first."""
    from typer.core import TyperGroup
    from typer.main import get_command

    from crossstitch.cli.typer_adapter import usage_error

    command = get_command(app)
    for args, expected in (
        (["build", "resnet18", "-t", "a", "--colour"], "--colour"),
        (["build"], "Missing argument 'ARCH'"),
        (["verify", "--seed", "x"], "'x'"),
    ):
        with pytest.raises(Exception) as caught:
            TyperGroup.main(command, args, prog_name="crossstitch", standalone_mode=False)
        problem = usage_error(caught.value)
        assert problem is not None and problem.exit_code == 2, caught.value
        assert expected in problem.message
        assert problem.hint == f"Try 'crossstitch {args[0]} --help' for help."
    assert usage_error(ValueError("not a usage error")) is None


def test_help_shows_every_default_and_choice():
    def show(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "240"})
        assert result.exit_code == 0
        return " ".join(result.stdout.replace("│", " ").split())

    text = show("build")
    for shown in (
        "[default: 0.9]",
        "(1-alpha)/(T-1)",
        "<channel|layer>",
        "<32|16|8>",
        "<last|all>",
        "[default: crossstitch.safetensors]",
    ):
        assert shown in text, shown
    text = show("export")
    assert "onnx, torchscript, pt2, or all" in text and "per format" in text


def test_python_dash_m_and_completion_work_without_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "crossstitch", "--version"], capture_output=True, text=True
    )
    assert (
        result.returncode == 0 and result.stdout.strip() == f"crossstitch {crossstitch.__version__}"
    )
    result = run_without_torch(
        "try:\n    app(prog_name='crossstitch')\nexcept SystemExit:\n    pass\n",
        env={
            "_CROSSSTITCH_COMPLETE": "complete_bash",
            "COMP_WORDS": "crossstitch bu",
            "COMP_CWORD": "1",
        },
    )
    assert "build" in result.stdout.split()
