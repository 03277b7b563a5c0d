"""The reference formulation: the plainest reading of the cross-stitch formula, for parity checks.

Kept apart from ``units.py`` on purpose: it shares the backbones' modules and the unit weights
with the model under test, but none of its stitching code (docs/design.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crossstitch.backbone import CrossStitchBackbone


def reference_stitch(weight: Tensor, xs: list[Tensor], channel_dim: int) -> list[Tensor]:
    """``x̂_i = Σ_j A[i, j] ⊙ x_j``: per pair a broadcast product, added up in task order.

    The sum is written out as one addition after another: ``torch.sum`` over stacked products
    adds the last elements of a tensor whose size is not a multiple of 32 in another order from
    five tasks on, which changes their last bit.
    """
    num_tasks = len(xs)
    outputs = []
    for i in range(num_tasks):
        products = []
        for j in range(num_tasks):
            a = weight[i, j]
            if a.dim() == 1:
                shape = [1] * xs[j].dim()
                shape[channel_dim] = a.numel()
                a = a.view(shape)
            products.append(a * xs[j])
        total = products[0]
        for product in products[1:]:
            total = total + product
        outputs.append(total)
    return outputs


def reference_forward(model: CrossStitchBackbone, x: Tensor) -> dict[str, Tensor]:
    """Run ``model``'s backbones and heads, stitching with ``reference_stitch``."""

    def stitch(stage: str, features: dict[str, Tensor]) -> dict[str, Tensor]:
        xs = [features[task] for task in model.tasks]
        weight = model.cross_stitch[stage].weight
        return dict(zip(model.tasks, reference_stitch(weight, xs, model.channel_dim), strict=True))

    return model.run(x, stitch)


@dataclass(frozen=True)
class ParityResult:
    """One output of the model compared with the reference; ``task`` is the output's name.

    ``problem`` says why a comparison cannot pass even where the values agree: non-finite
    values (NaN or infinity) in the output, or in the unit weights.
    """

    task: str
    shape: tuple[int, ...]
    identical: bool
    max_abs_error: float
    mean_abs_error: float
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.identical and self.problem is None


def non_finite_units(model: CrossStitchBackbone) -> list[str]:
    """The stages whose unit weights hold NaN or infinity."""
    return [
        stage
        for stage, unit in model.cross_stitch.items()
        if not bool(torch.isfinite(unit.weight).all())
    ]


@torch.no_grad()
def check_parity(model: CrossStitchBackbone, x: Tensor) -> list[ParityResult]:
    """Compare ``model(x)`` with the reference formulation, output by output, for bit equality.

    NaN never matches NaN: an output with non-finite values fails, and so does every output of
    a model whose unit weights are not all finite.
    """
    was_training = model.training
    model.eval()
    try:
        got = model(x)
        want = reference_forward(model, x)
    finally:
        model.train(was_training)
    broken = non_finite_units(model)
    results = []
    for name in want:
        a, b = got[name], want[name]
        finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
        error = (a.double() - b.double()).abs()
        problem = None
        if broken:
            problem = f"unit weights after {', '.join(broken)} are not finite"
        elif not finite:
            problem = "non-finite values (NaN or infinity) in the output"
        results.append(
            ParityResult(
                task=name,
                shape=tuple(a.shape),
                identical=finite and torch.equal(a, b),
                max_abs_error=error.max().item() if error.numel() else 0.0,
                mean_abs_error=error.mean().item() if error.numel() else 0.0,
                problem=problem,
            )
        )
    return results
