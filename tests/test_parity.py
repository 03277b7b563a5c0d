"""Bit-exact parity of the fast units with the stack-and-sum reference formulation."""

import pytest
import torch

from crossstitch import check_parity
from crossstitch.reference import reference_stitch
from helpers import build, image, randomize_units


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg11_bn"])
@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_model_equals_reference_bit_for_bit(arch, num_tasks, granularity):
    model = build(arch, [f"task{i}" for i in range(num_tasks)], granularity=granularity)
    randomize_units(model)
    results = check_parity(model, image())
    assert [r.task for r in results] == model.tasks
    for result in results:
        assert result.identical, result
        assert result.max_abs_error == 0.0


def test_parity_detects_a_difference():
    model = build()
    randomize_units(model)
    unit = model.cross_stitch["layer2"]
    original = unit.forward

    def off_by_a_little(features, **options):
        out = original(features, **options)
        return {t: v * (1 + 1e-6) for t, v in out.items()}

    unit.forward = off_by_a_little
    results = check_parity(model, image())
    assert not any(r.identical for r in results)
    assert all(r.max_abs_error > 0 for r in results)


def test_reference_is_the_formula():
    weight = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    xa, xb = torch.ones(1, 2, 1, 1), torch.full((1, 2, 1, 1), 10.0)
    out_a, out_b = reference_stitch(weight, [xa, xb], channel_dim=1)
    assert out_a.flatten().tolist() == [1 + 30, 2 + 40]
    assert out_b.flatten().tolist() == [5 + 70, 6 + 80]


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_reference_adds_as_torch_sum_over_the_stack_does_up_to_four_tasks(tasks):
    """Up to four tasks the written-out sum (docs/design.md §2) equals ``torch.sum`` over the
    stacked products, bit for bit, on every tail length of a vector."""
    generator = torch.Generator().manual_seed(tasks)
    weight = torch.randn(tasks, tasks, generator=generator)
    for size in [*range(1, 70), 1000, 1001, 4097]:
        xs = [torch.randn(size, generator=generator) * 1e3 for _ in range(tasks)]
        got = reference_stitch(weight, xs, channel_dim=0)
        for i, out in enumerate(got):
            stacked = torch.stack([weight[i, j] * xs[j] for j in range(tasks)])
            assert torch.equal(out, torch.sum(stacked, dim=0))


def test_partial_stitching_leaves_other_stages_alone():
    model = build(stages=["layer2", "layer4"])
    assert list(model.cross_stitch) == ["layer2", "layer4"]
    randomize_units(model)
    assert all(r.identical for r in check_parity(model, image()))
