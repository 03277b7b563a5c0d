"""`crossstitch bench` on a tiny configuration: it runs and reports what scripts rely on."""

import json

import pytest
import torch

from crossstitch.exporters.bench import bare_forward, peak_tensor_mb
from helpers import build


def test_bench_json_carries_every_variant_and_statistic(cli):
    args = "bench resnet18 --tasks a b --batch 2 --input-size 32 --runs 2 --threads 1 --json"
    code, out, err = cli(*args.split())
    assert code == 0, err
    result = json.loads(out)
    assert result["arch"] == "resnet18" and result["tasks"] == ["a", "b"]
    assert (result["batch"], result["input_size"], result["threads"]) == (2, [32, 32], 1)
    variants = {(t["mode"], t["name"]) for t in result["timings"]}
    assert variants == {
        ("inference", "cross-stitch"),
        ("inference", "bare backbones"),
        ("training", "cross-stitch"),
        ("training", "bare backbones"),
    }
    for timing in result["timings"]:
        assert len(timing["seconds"]) == 2
        assert timing["min"] <= timing["median"] <= timing["max"]
        assert timing["ratio"] > 0 and timing["peak_mb"] >= 0
        if timing["name"] == "bare backbones":
            assert timing["ratio"] == 1.0


def test_bench_times_the_artifacts_beside_a_checkpoint(cli, tmp_path, exported):
    folder, _ = exported
    code, out, err = cli(
        "bench",
        "--model",
        str(folder / "crossstitch.safetensors"),
        "--batch",
        "1",
        "--input-size",
        "64",
        "--runs",
        "1",
        "--no-training",
    )
    assert code == 0, err
    for variant in ("cross-stitch", "bare backbones", "onnx", "torchscript", "pt2"):
        assert variant in out
    assert "training" not in out.split("\n", 1)[1].split("vs bare")[0]


def test_bare_forward_matches_unstitched_backbones():
    model = build().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bare = bare_forward(model, x)
        assert all(torch.equal(bare[t], model.backbones[t](x)) for t in model.tasks)


@pytest.mark.slow
def test_compiled_variants_are_timed_against_the_compiled_bare_backbones(cli):
    args = "bench resnet18 --tasks a b --batch 2 --input-size 32 --runs 1 --threads 1 --json"
    code, out, err = cli(*args.split(), "--compile", "--no-training")
    assert code == 0, err
    timings = {t["name"]: t for t in json.loads(out)["timings"]}
    compiled = timings["compiled cross-stitch"]
    assert compiled["baseline"] == "compiled bare backbones" and compiled["compile_seconds"] > 0
    assert timings["compiled bare backbones"]["ratio"] == 1.0


def test_peak_memory_follows_the_allocations_of_one_call():
    def call(x: torch.Tensor) -> None:
        first = torch.ones(25_000_000)  # 100 MB
        second = torch.ones(12_500_000)  # 50 MB: 150 MB held
        del first
        third = torch.ones(7_500_000)  # 30 MB: 80 MB held
        del second, third

    assert peak_tensor_mb(call, torch.empty(0)) == 150.0


def test_stale_artifacts_of_another_network_are_not_timed(cli, tmp_path, exported):
    folder, _ = exported
    for name in ("crossstitch.onnx", "crossstitch.pt2"):
        (tmp_path / name).symlink_to(folder / name)
    code, _, err = cli("build", "resnet18", "--tasks", "x", "y", "z")
    assert code == 0, err
    args = "bench --batch 1 --input-size 64 --runs 1 --no-training --json"
    code, out, err = cli(*args.split())
    assert code == 0, err
    result = json.loads(out)
    assert {t["name"] for t in result["timings"]} == {"cross-stitch", "bare backbones"}
    assert len(result["skipped_artifacts"]) == 2
    assert all("tasks is" in reason for reason in result["skipped_artifacts"])


def test_bench_refuses_conflicting_or_missing_choices(cli):
    for args, expected in [
        (["bench", "resnet18", "--model", "m.pt", "--tasks", "a", "b"], "not both"),
        (["bench", "resnet18"], "name the tasks"),
        (["bench", "--tasks", "a", "b"], "--tasks needs ARCH"),
        (["bench", "resnet18", "--tasks", "a", "b", "--runs", "0"], "--runs"),
        (["bench", "resnet18", "--tasks", "a", "b", "--threads", "0"], "--threads"),
        (["bench"], "crossstitch.safetensors does not exist"),
        (["bench", "resnet18", "-t", "a,b", "--batch", "1", "--input-size", "32"], "--no-training"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and err.startswith("Error: ") and expected in err.splitlines()[0], err
