"""Stage checkpointing: the same training step as without it, in less memory.

Gradients are compared bit for bit: the recomputation runs the same kernels on the same
inputs. Batch norm running statistics and ``num_batches_tracked`` must be those of one update.
"""

import copy
import json

import pytest
import torch
import torchvision

import crossstitch
from crossstitch.exporters.bench import peak_tensor_mb
from helpers import build, image, randomize_units

CASES = {
    "default": {},
    "all-features-some-heads": {"features": "all", "heads": {"seg": 3}},
    "layer-units": {"granularity": "layer"},
}


def _pair(options: dict) -> tuple[crossstitch.CrossStitchBackbone, crossstitch.CrossStitchBackbone]:
    """The same model twice, in training mode: as built, and with stage checkpointing."""
    plain = build("resnet18", **options).train()
    randomize_units(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_stages = True
    return plain, checkpointed


def _step(model, x: torch.Tensor) -> None:
    sum(o.square().mean() for o in model(x).values()).backward()


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_and_batch_norm_statistics_equal_those_without_checkpointing(case):
    plain, checkpointed = _pair(CASES[case])
    x = image()
    _step(plain, x)
    _step(checkpointed, x)
    want = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        assert torch.equal(p.grad, want[name].grad), name
    buffers = dict(plain.named_buffers())
    for name, value in checkpointed.named_buffers():
        assert torch.equal(value, buffers[name]), name
    counts = {v.item() for n, v in checkpointed.named_buffers() if "num_batches_tracked" in n}
    assert counts == {1}


def test_the_flag_is_in_the_config_and_survives_a_checkpoint_file(tmp_path):
    model = build(checkpoint_stages=True)
    assert model.checkpoint_stages and model.config.checkpoint_stages
    crossstitch.save(model, tmp_path / "model.safetensors")
    loaded = crossstitch.load(tmp_path / "model.safetensors")
    assert loaded.checkpoint_stages and loaded.config.checkpoint_stages
    assert not build().config.checkpoint_stages
    models = {task: torchvision.models.resnet18() for task in ("a", "b")}
    own = crossstitch.CrossStitchBackbone(models, checkpoint_stages=True)
    assert own.checkpoint_stages and own.config.checkpoint_stages


def test_inference_and_export_trace_the_plain_stages():
    plain, checkpointed = _pair({})
    x = image()
    with torch.no_grad():
        assert torch.equal(plain.eval()(x)["seg"], checkpointed.eval()(x)["seg"])
    graphs = [str(torch.export.export(m, (x,)).graph) for m in (plain, checkpointed)]
    assert graphs[0] == graphs[1]
    assert "checkpoint" not in graphs[1]


def test_a_training_step_holds_less_memory():
    plain, checkpointed = _pair({})
    x = image(batch=4, size=128)
    peaks = []
    for model in (plain, checkpointed):
        _step(model, x)  # a first step allocates the gradients outside the measured one
        peaks.append(peak_tensor_mb(lambda t, m=model: _step(m, t), x))
    assert peaks[1] < 0.8 * peaks[0]


def test_the_compiled_training_step_is_one_graph_with_the_same_gradients():
    torch.compiler.reset()
    plain, checkpointed = _pair({"heads": {"seg": 3}})
    x = image()
    _step(plain, x)
    _step(torch.compile(checkpointed, fullgraph=True, backend="aot_eager"), x)
    want = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    buffers = dict(plain.named_buffers())
    for name, value in checkpointed.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=1e-5, atol=1e-6, msg=name)


def test_build_records_the_flag_inspect_shows_it_and_bench_compares_both_steps(cli):
    code, out, err = cli("build", "resnet18", "--tasks", "a", "b", "--checkpoint-stages", "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["checkpoint_stages"] is True
    code, out, err = cli("inspect")
    assert code == 0, err
    assert "stage checkpointing" in out
    args = "bench resnet18 --tasks a b --batch 2 --input-size 32 --runs 1 --threads 1 --json"
    code, out, err = cli(*args.split(), "--checkpoint-stages")
    assert code == 0, err
    result = json.loads(out)
    training = {t["name"] for t in result["timings"] if t["mode"] == "training"}
    assert training == {"cross-stitch", "bare backbones", "checkpointed"}
    ratios = result["checkpointing"]
    assert ratios["memory_ratio"] > 0 and ratios["time_ratio"] > 0
