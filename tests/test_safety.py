"""Writes stay whole under interruption and concurrency; requests too large are refused early."""

import json
import signal
import subprocess

import pytest
import torch

import crossstitch
from crossstitch import CrossStitchError
from crossstitch.backbone import torchvision_config
from crossstitch.memory import available_bytes, check_build, classifier_bytes
from helpers import EXE, interrupt_when_staged


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_build_interrupted_while_saving_keeps_the_previous_file(tmp_path, sig):
    previous = tmp_path / "crossstitch.safetensors"
    previous.write_bytes(b"previous good checkpoint")
    code, err = interrupt_when_staged(
        ["build", "resnet50", "--tasks", "a,b,c,d", "--force"],
        tmp_path,
        ".crossstitch.safetensors.*",
        sig,
    )
    assert code in (130, 128 + sig), err
    assert b"Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crossstitch.safetensors"]
    assert previous.read_bytes() == b"previous good checkpoint"


def test_two_builds_in_one_folder_do_not_interfere(tmp_path):
    runs = [
        subprocess.Popen(
            [EXE, "build", "resnet18", "--tasks", tasks, "-o", name, "--json"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for tasks, name in (("seg,depth", "a.pt"), ("x,y,z", "b.pt"))
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
    assert crossstitch.load(tmp_path / "a.pt").tasks == ["seg", "depth"]
    assert crossstitch.load(tmp_path / "b.pt").tasks == ["x", "y", "z"]


def test_sixteen_tasks_build_and_report_their_memory(cli):
    tasks = ",".join(f"task{i}" for i in range(16))
    code, out, err = cli("build", "resnet18", "--tasks", tasks, "--input-size", "64", "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert len(summary["config"]["tasks"]) == 16
    assert summary["float32_mb"] == pytest.approx(summary["total_params"] * 4 / 1e6)
    assert summary["training_mb_per_image"] > 0


def test_a_build_too_large_for_this_machine_is_refused_before_allocating():
    tasks = [f"t{i}" for i in range(available_bytes() // classifier_bytes("vgg19") + 2)]
    with pytest.raises(CrossStitchError, match=r"needs about .* GB of memory, but .* available"):
        check_build(torchvision_config("vgg19", tasks=tasks))


def test_absurd_heads_are_refused_by_the_estimate_in_every_command(cli, tmp_path):
    code, _, err = cli("build", "resnet18", "--tasks", "a", "b", "--head", "a=1000000000")
    assert code == 2 and "GB of memory" in err.splitlines()[0], err
    model = crossstitch.CrossStitchBackbone.from_torchvision("resnet18", tasks=["a", "b"])
    path = tmp_path / "crossstitch.pt"
    crossstitch.save(model, path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["heads"] = {"a": 2**31 - 1}
    torch.save(payload, path)
    for args in (
        ["verify", "crossstitch.pt"],
        ["export", "--format", "pt2", "-m", "crossstitch.pt"],
        ["bench", "--model", "crossstitch.pt", "--runs", "1"],
    ):
        code, _, err = cli(*args)
        assert code == 2 and "GB of memory" in err.splitlines()[0], (args, err)


def test_oversized_verification_and_benchmark_are_refused(cli, exported):
    folder, _ = exported
    checkpoint = str(folder / "crossstitch.safetensors")
    for args in (
        ["verify", checkpoint, "--batch", "100000"],
        ["verify", str(folder / "crossstitch.onnx"), "--against", checkpoint, "--batch", "100000"],
        ["bench", "--model", checkpoint, "--batch", "100000"],
    ):
        code, _, err = cli(*args)
        assert code == 2 and "GB of memory" in err.splitlines()[0], err
