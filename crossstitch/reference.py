"""The reference formulation: the plainest reading of the cross-stitch formula, for parity checks.

Kept apart from ``units.py`` on purpose: it shares the backbones' modules and the unit weights
with the model under test, but none of its stitching code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crossstitch.backbone import CrossStitchBackbone, stage_output
from crossstitch.heads import head_output


def reference_stitch(weight: Tensor, xs: list[Tensor], channel_dim: int) -> list[Tensor]:
    """``x̂_i = Σ_j A[i, j] ⊙ x_j``: per pair a broadcast product, added up in task order.

    The sum is written out as one addition after another. ``torch.sum`` over the stacked
    products (DESIGN §1) adds in that same order for up to four tasks; from five on, its
    vectorised reduction adds the last elements of a tensor whose size is not a multiple of 32
    in another order, which changes their last bit, so the order is spelt out here.
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
    """Run ``model``'s backbones stage by stage, stitching with ``reference_stitch``.

    Tasks with a head get that head's output at the input size, as the model gives it; with
    ``features == "all"`` every stitched stage's features come first, as ``"<task>.<stage>"``.
    """
    tasks = model.tasks
    feats = [model.backbones[t].stem(x) for t in tasks]
    stitched = []
    for name in model.backbones[tasks[0]].stages:
        feats = [model.backbones[t].stages[name](f) for t, f in zip(tasks, feats, strict=True)]
        if name in model.cross_stitch:
            feats = reference_stitch(model.cross_stitch[name].weight, feats, model.channel_dim)
            stitched.append((name, feats))
    size = x.shape[-2:]
    outputs = {}
    for i, t in enumerate(tasks):
        if model.features == "all":
            for name, stage_feats in stitched:
                outputs[stage_output(t, name)] = stage_feats[i]
        if t in model.heads:
            outputs[t] = head_output(model.heads[t], feats[i], size)
        elif model.features == "last":
            outputs[t] = feats[i]
    return outputs


@dataclass(frozen=True)
class ParityResult:
    """Comparison of one output of the model with the reference; ``task`` is the output's name."""

    task: str
    shape: tuple[int, ...]
    identical: bool
    max_abs_error: float
    mean_abs_error: float

    @property
    def passed(self) -> bool:
        return self.identical


@torch.no_grad()
def check_parity(model: CrossStitchBackbone, x: Tensor) -> list[ParityResult]:
    """Compare ``model(x)`` with the reference formulation, output by output, for bit equality."""
    was_training = model.training
    model.eval()
    try:
        got = model(x)
        want = reference_forward(model, x)
    finally:
        model.train(was_training)
    results = []
    for task in want:
        a, b = got[task], want[task]
        error = (a - b).abs().nan_to_num(nan=0.0)
        results.append(
            ParityResult(
                task=task,
                shape=tuple(a.shape),
                identical=_identical(a, b),
                max_abs_error=error.max().item(),
                mean_abs_error=error.mean().item(),
            )
        )
    return results


def _identical(a: Tensor, b: Tensor) -> bool:
    """``torch.equal``, except that NaN matches NaN: overflowing inits give NaN in both."""
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(
        a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    )
