"""Dense heads: per-task outputs at the input resolution, in the model, checkpoints and summary."""

import json

import pytest
import torch
from torch import nn

import crossstitch
from crossstitch import CrossStitchError, DenseHead
from crossstitch.summary import summarize
from helpers import build, image, randomize_units


def test_heads_give_per_pixel_outputs_and_other_tasks_keep_their_features():
    model = build(tasks=["seg", "depth", "normals"], heads={"seg": 21, "depth": 1})
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert list(out) == ["seg", "depth", "normals"]
    assert out["seg"].shape == (2, 21, 64, 96)
    assert out["depth"].shape == (2, 1, 64, 96)
    assert out["normals"].shape == (2, 512, 2, 3)
    assert isinstance(model.heads["seg"], DenseHead) and "normals" not in model.heads
    assert model.config.head_channels == {"seg": 21, "depth": 1}


def test_a_module_head_is_used_as_given_and_resized_to_the_input():
    head = nn.Conv2d(512, 4, kernel_size=1)
    model = build(heads={"depth": head})
    assert model.heads["depth"] is head
    assert model.config.heads == ()
    assert model(image(batch=1, size=80))["depth"].shape == (1, 4, 80, 80)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ({"edges": 2}, "unknown task 'edges'"),
        ({"seg": 0}, "positive number of output channels"),
        ({"seg": -3}, "got -3"),
        ({"seg": True}, "got True"),
        ({"seg": "21"}, "got '21'"),
        ({"seg": 2.0}, "got 2.0"),
    ],
)
def test_bad_heads_are_refused_before_building(heads, message):
    with pytest.raises(CrossStitchError, match=message):
        build(heads=heads)


@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_heads_keep_bit_exact_parity_with_the_reference(granularity):
    model = build(tasks=["a", "b", "c"], granularity=granularity, heads={"a": 3, "c": 2})
    randomize_units(model)
    results = crossstitch.check_parity(model, image(size=72))
    assert [r.shape for r in results] == [(2, 3, 72, 72), (2, 512, 3, 3), (2, 2, 72, 72)]
    assert all(r.identical for r in results)


def test_gradients_reach_the_heads():
    model = build(heads={"seg": 3}).train()
    out = model(image())
    (out["seg"].mean() + out["depth"].mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())


def test_heads_survive_a_checkpoint(tmp_path):
    model = build(heads={"depth": 1})
    randomize_units(model)
    with torch.no_grad():
        model.heads["depth"].classifier.bias.fill_(0.25)
    loaded = crossstitch.load(crossstitch.save(model, tmp_path / "m.pt"))
    assert loaded.config.head_channels == {"depth": 1}
    x = image()
    want, got = model.eval()(x), loaded.eval()(x)
    assert got["depth"].shape == (2, 1, 64, 64)
    assert all(torch.equal(want[t], got[t]) for t in model.tasks)


def test_module_heads_cannot_be_saved_as_checkpoints(tmp_path):
    model = build(heads={"seg": 2, "depth": nn.Conv2d(512, 1, 1)})
    with pytest.raises(CrossStitchError, match="head of task depth is your own module"):
        crossstitch.save(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("heads", [[1], {"seg": 0}, {"seg": "2"}, {"seg": True}])
def test_a_damaged_heads_field_is_refused(tmp_path, heads):
    path = tmp_path / "m.pt"
    crossstitch.save(build(heads={"seg": 2}), path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["heads"] = heads
    torch.save(payload, path)
    with pytest.raises(CrossStitchError, match="config field 'heads'"):
        crossstitch.load(path)


def test_summary_counts_head_parameters_and_output_shapes():
    model = build(
        tasks=["seg", "depth", "normals"], heads={"seg": 21, "depth": nn.Conv2d(512, 2, 1)}
    )
    summary = summarize(model, (64, 96))
    rows = {row.task: row for row in summary.outputs}
    assert (rows["seg"].head, rows["seg"].shape) == ("dense", (21, 64, 96))
    assert rows["seg"].head_params == sum(p.numel() for p in model.heads["seg"].parameters())
    assert (rows["depth"].head, rows["depth"].shape) == ("Conv2d", (2, 64, 96))
    assert (rows["normals"].head, rows["normals"].head_params) == (None, 0)
    assert rows["normals"].shape == (512, 2, 3)
    assert summary.head_params == rows["seg"].head_params + rows["depth"].head_params
    assert summary.total_params == (
        3 * summary.params_per_task + summary.stitch_params + summary.head_params
    )


def test_build_head_option_attaches_heads(cli, tmp_path):
    code, out, err = cli(
        "build", "resnet18", "--tasks", "seg,depth", "--head", "seg=21", "--head", "depth=1",
        "--input-size", "64", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["heads"] == {"seg": 21, "depth": 1}
    assert [o["shape"] for o in result["summary"]["outputs"]] == [[21, 64, 64], [1, 64, 64]]
    model = crossstitch.load(tmp_path / "crossstitch.safetensors")
    assert model(image(batch=1))["seg"].shape == (1, 21, 64, 64)


def test_build_summary_shows_heads_and_their_outputs(cli):
    code, out, err = cli(
        "build", "resnet18", "-t", "seg,depth", "--head", "seg=21", "--input-size", "64"
    )
    assert code == 0, err
    assert "Outputs per image" in out and "21×64×64" in out and "512×2×2" in out
    assert "in heads" in out


def test_build_summary_without_heads_has_no_outputs_table(cli):
    code, out, _ = cli("build", "resnet18", "-t", "seg,depth", "--input-size", "64")
    assert code == 0 and "Outputs per image" not in out and "in heads" not in out
