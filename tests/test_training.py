"""param_groups: units train faster than everything else, every parameter in exactly one group."""

import math

import pytest
import torch
from torch import nn

import crossstitch
from crossstitch import CrossStitchError
from helpers import build, image


class MultiTaskModel(nn.Module):
    """A wrapping model with its own parameters, one of them shared by two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build(heads={"seg": 3})
        self.depth_head = nn.Conv2d(512, 1, 1)
        self.alias = self.depth_head
        self.extra = nn.Linear(4, 4)
        self.extra_again = nn.Linear(4, 4)
        self.extra_again.weight = self.extra.weight
        self.unit_again = self.backbone.cross_stitch["layer2"]


def _ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("make", [build, MultiTaskModel], ids=["backbone", "wrapper"])
def test_every_parameter_is_in_exactly_one_group(make):
    model = make()
    groups = crossstitch.param_groups(model, lr=0.01)
    grouped = [i for g in groups for i in _ids(g["params"])]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(_ids(model.parameters()))
    units = [m for m in model.modules() if isinstance(m, crossstitch.CrossStitchUnit)]
    assert sorted(_ids(groups[0]["params"])) == sorted(id(u.weight) for u in units)
    torch.optim.AdamW(groups)  # refuses a parameter given twice


def test_units_train_at_a_multiple_of_lr_without_weight_decay():
    unit_group, rest = crossstitch.param_groups(build(), lr=0.01, weight_decay=1e-4)
    assert (unit_group["name"], unit_group["lr"], unit_group["weight_decay"]) == (
        "cross_stitch",
        pytest.approx(1.0),
        0.0,
    )
    assert (rest["name"], rest["lr"], rest["weight_decay"]) == ("backbone", 0.01, 1e-4)
    fast, _ = crossstitch.param_groups(build(), lr=0.5, unit_lr_mult=3.0)
    assert fast["lr"] == 1.5


def test_an_sgd_step_moves_units_at_their_rate_and_the_rest_at_lr():
    model = build(heads={"depth": 1}).train()
    unit = model.cross_stitch["layer3"].weight
    conv = model.backbones["seg"].stages["layer3"][0].conv1.weight
    head = model.heads["depth"].classifier.weight
    before = {
        name: p.detach().clone() for name, p in [("unit", unit), ("conv", conv), ("head", head)]
    }
    optimizer = torch.optim.SGD(crossstitch.param_groups(model, lr=1e-3, unit_lr_mult=100.0))
    out = model(image())
    (out["seg"].square().mean() + out["depth"].mean()).backward()
    grads = {"unit": unit.grad.clone(), "conv": conv.grad.clone(), "head": head.grad.clone()}
    optimizer.step()
    assert not torch.equal(unit, before["unit"])
    torch.testing.assert_close(unit.detach(), before["unit"] - 0.1 * grads["unit"])
    torch.testing.assert_close(conv.detach(), before["conv"] - 1e-3 * grads["conv"])
    torch.testing.assert_close(head.detach(), before["head"] - 1e-3 * grads["head"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"lr": -1.0}, "lr must be"),
        ({"lr": math.nan}, "lr must be"),
        ({"lr": 0.1, "unit_lr_mult": -2.0}, "unit_lr_mult must be a finite number >= 0"),
        ({"lr": 0.1, "unit_lr_mult": math.inf}, "unit_lr_mult must be"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
    ],
)
def test_bad_rates_are_refused(kwargs, message):
    with pytest.raises(CrossStitchError, match=message):
        crossstitch.param_groups(build(), **kwargs)


def test_a_model_without_units_is_refused():
    with pytest.raises(CrossStitchError, match="Linear holds no CrossStitchUnit"):
        crossstitch.param_groups(nn.Linear(2, 2), lr=0.1)
