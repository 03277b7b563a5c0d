"""`crossstitch bench` on a tiny configuration: it runs and reports what scripts rely on."""

import json

import torch

from crossstitch import fused
from crossstitch.exporters.bench import bare_forward
from helpers import build


def test_bench_json_carries_every_variant_and_statistic(cli):
    args = "bench resnet18 --tasks a b --batch 2 --input-size 32 --runs 2 --threads 1 --json"
    code, out, err = cli(*args.split())
    assert code == 0, err
    result = json.loads(out)
    assert result["arch"] == "resnet18" and result["tasks"] == ["a", "b"]
    assert (result["batch"], result["input_size"], result["threads"]) == (2, [32, 32], 1)
    assert result["unit_kernel"] == fused.kernel_name(fused.AVAILABLE)
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
        str(folder / "crossstitch.pt"),
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
    assert f"cross-stitch units: {fused.kernel_name(fused.AVAILABLE)}." in out
    assert "training" not in out.split("\n", 1)[1].split("vs bare")[0]


def test_bare_forward_matches_unstitched_backbones():
    model = build().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bare = bare_forward(model, x)
        assert all(torch.equal(bare[t], model.backbones[t](x)) for t in model.tasks)


def test_bench_refuses_conflicting_or_missing_choices(cli):
    for args, expected in [
        (["bench", "resnet18", "--model", "m.pt", "--tasks", "a", "b"], "not both"),
        (["bench", "resnet18"], "name the tasks"),
        (["bench", "--tasks", "a", "b"], "--tasks needs ARCH"),
        (["bench", "resnet18", "--tasks", "a", "b", "--runs", "0"], "--runs"),
        (["bench", "resnet18", "--tasks", "a", "b", "--threads", "0"], "--threads"),
        (["bench"], "crossstitch.pt does not exist"),
        (["bench", "resnet18", "-t", "a,b", "--batch", "1", "--input-size", "32"], "--no-training"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and err.startswith("Error: ") and expected in err.splitlines()[0], err
