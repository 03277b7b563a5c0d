import pytest
import torch

from crossstitch import CrossStitchError, CrossStitchUnit


@pytest.mark.parametrize(
    ("tasks", "alpha", "beta", "expected_beta"),
    [(2, 0.9, None, 0.1), (3, 0.9, None, 0.05), (5, 0.8, None, 0.05), (2, 1.0, 1.0, 1.0)],
)
def test_init_diagonal_alpha_offdiagonal_beta(tasks, alpha, beta, expected_beta):
    names = [f"t{i}" for i in range(tasks)]
    unit = CrossStitchUnit(names, channels=8, alpha=alpha, beta=beta)
    assert unit.weight.shape == (tasks, tasks, 8)
    eye = torch.eye(tasks, dtype=torch.bool)
    assert torch.all(unit.weight[eye] == torch.tensor(alpha))
    assert torch.allclose(unit.weight[~eye], torch.tensor(expected_beta))
    if beta is None:
        assert torch.allclose(unit.weight.sum(dim=1), torch.ones(tasks, 8))


def test_layer_granularity_has_one_scalar_per_pair():
    unit = CrossStitchUnit(["a", "b", "c"], channels=16, granularity="layer")
    assert unit.weight.shape == (3, 3)
    assert unit["a", "b"].shape == ()


def test_pair_view_reads_and_writes_through():
    unit = CrossStitchUnit(["seg", "depth"], channels=4)
    view = unit["seg", "depth"]
    assert view.shape == (4,)
    view[:] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(unit.weight[0, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    unit["depth", "seg"] = 0.25
    assert torch.all(unit.weight[1, 0] == 0.25)
    assert unit.weight.requires_grad


def test_forward_mixes_tasks_per_channel():
    unit = CrossStitchUnit(["a", "b"], channels=2)
    unit["a", "a"] = torch.tensor([1.0, 0.0])
    unit["a", "b"] = torch.tensor([0.0, 2.0])
    xa, xb = torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), 5.0)
    out = unit({"a": xa, "b": xb})
    assert torch.all(out["a"][:, 0] == 1.0)
    assert torch.all(out["a"][:, 1] == 10.0)


def test_channel_last_features_are_stitched_on_the_last_axis():
    unit = CrossStitchUnit(["a", "b"], channels=3, channel_dim=-1)
    unit["a", "b"] = torch.tensor([0.0, 1.0, 2.0])
    unit["a", "a"] = 0.0
    out = unit({"a": torch.zeros(2, 5, 3), "b": torch.ones(2, 5, 3)})
    assert torch.equal(out["a"][0, 0], torch.tensor([0.0, 1.0, 2.0]))


def test_unknown_task_pair_is_a_key_error():
    unit = CrossStitchUnit(["a", "b"], channels=2)
    with pytest.raises(KeyError, match="unknown task 'c'"):
        unit["a", "c"]


@pytest.mark.parametrize(
    "kwargs",
    [{"granularity": "pixel"}, {"alpha": float("nan")}, {"beta": float("inf")}],
)
def test_bad_unit_options_are_refused(kwargs):
    with pytest.raises(CrossStitchError):
        CrossStitchUnit(["a", "b"], channels=2, **kwargs)
