"""Output comparison in the manner of polygraphy: per output, error statistics and PASS/FAIL.

An output passes when ``max|got - want| <= atol + rtol * max|want|``: the tolerance follows the
output's scale, because randomly initialised deep networks produce huge activations whose
elementwise relative errors say nothing about the export.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OutputComparison:
    """One output compared: shapes, error statistics, the tolerance applied and the verdict."""

    name: str
    shape: tuple[int, ...] | None
    expected_shape: tuple[int, ...] | None
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    max_abs_expected: float
    tolerance: float
    passed: bool
    problem: str | None = None


@dataclass(frozen=True)
class Comparison:
    """All outputs of one verification, with the tolerances and inputs that were used."""

    outputs: list[OutputComparison]
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)


def _missing(name: str, problem: str, shape=None, expected_shape=None) -> OutputComparison:
    nan = float("nan")
    return OutputComparison(name, shape, expected_shape, nan, nan, nan, nan, nan, False, problem)


def compare_outputs(
    got: Mapping[str, Tensor], want: Mapping[str, Tensor], atol: float, rtol: float
) -> Comparison:
    """Compare every expected output with the one of the same name; extra outputs fail too."""
    rows = []
    for name, expected in want.items():
        if name not in got:
            rows.append(_missing(name, "missing", expected_shape=tuple(expected.shape)))
            continue
        actual = got[name].detach().to(torch.float64)
        expected = expected.detach().to(torch.float64)
        if actual.shape != expected.shape:
            rows.append(
                _missing(name, "shape mismatch", tuple(actual.shape), tuple(expected.shape))
            )
            continue
        diff = (actual - expected).abs()
        scale = expected.abs()
        nonzero = scale > 0
        max_abs = diff.max().item() if diff.numel() else 0.0
        max_expected = scale.max().item() if scale.numel() else 0.0
        tolerance = atol + rtol * max_expected
        finite = bool(torch.isfinite(actual).all() and torch.isfinite(expected).all())
        rows.append(
            OutputComparison(
                name=name,
                shape=tuple(actual.shape),
                expected_shape=tuple(expected.shape),
                max_abs_error=max_abs,
                mean_abs_error=diff.mean().item() if diff.numel() else 0.0,
                max_rel_error=(diff[nonzero] / scale[nonzero]).max().item()
                if nonzero.any()
                else 0.0,
                max_abs_expected=max_expected,
                tolerance=tolerance,
                passed=finite and max_abs <= tolerance,
                problem=None if finite else "non-finite values",
            )
        )
    rows.extend(_missing(name, "unexpected output") for name in got if name not in want)
    return Comparison(outputs=rows, atol=atol, rtol=rtol)
