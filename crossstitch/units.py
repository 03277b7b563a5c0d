"""The cross-stitch unit: a learned linear recombination of per-task activations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from crossstitch.config import (
    GRANULARITIES,
    check_choice,
    check_number,
    check_tasks,
    default_beta,
)


class CrossStitchUnit(nn.Module):
    """Recombines task features: ``out[i] = sum_j A[i, j] * x[j]``, summed in task order.

    ``A`` is one parameter of shape ``[T, T, C]`` (``granularity="channel"``, one weight per
    channel) or ``[T, T]`` (``"layer"``). ``channel_dim`` is where the channels lie in the
    features: 1 for NCHW maps, -1 for channel-last tokens. Plain torch ops: a multiply per pair
    and an add per term, accumulated left to right (never a fused multiply-add), so the result
    equals the reference formulation bit for bit (docs/design.md §1). At most one product
    temporary is alive at a time; the inputs are never written to.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        channels: int,
        *,
        granularity: str = "channel",
        alpha: float = 0.9,
        beta: float | None = None,
        channel_dim: int = 1,
    ) -> None:
        super().__init__()
        self.tasks = list(check_tasks(tasks))
        self.granularity = check_choice(granularity, "granularity", GRANULARITIES)
        self.alpha = check_number(alpha, "alpha")
        beta = default_beta(self.alpha, len(self.tasks)) if beta is None else beta
        self.beta = check_number(beta, "beta")
        self.channels = channels
        self.channel_dim = channel_dim
        num_tasks = len(self.tasks)
        shape = (num_tasks, num_tasks, channels) if granularity == "channel" else (num_tasks,) * 2
        self.weight = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the diagonal to alpha and everything else to beta."""
        with torch.no_grad():
            self.weight.fill_(self.beta)
            self.weight.diagonal(0, 0, 1).fill_(self.alpha)

    def _pair(self, key: tuple[str, str]) -> tuple[int, int]:
        target, source = key
        for task in (target, source):
            if task not in self.tasks:
                raise KeyError(f"unknown task {task!r}; tasks are {self.tasks}")
        return self.tasks.index(target), self.tasks.index(source)

    def __getitem__(self, key: tuple[str, str]) -> Tensor:
        """A view of ``A[target, source]``; writing into it changes the unit."""
        i, j = self._pair(key)
        return self.weight.detach()[i, j]

    def __setitem__(self, key: tuple[str, str], value: float | Tensor) -> None:
        i, j = self._pair(key)
        with torch.no_grad():
            self.weight[i, j] = value

    def broadcast_shape(self, ndim: int) -> tuple[int, ...]:
        """Shape that lines one row of per-channel weights up with the channel axis."""
        if self.granularity == "layer":
            return ()
        if self.channel_dim in (-1, ndim - 1):
            return (self.channels,)
        return (self.channels,) + (1,) * (ndim - self.channel_dim - 1)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The recombined features, one per task, in task order."""
        xs = [features[task] for task in self.tasks]
        weight = self.weight.view(self.weight.shape[:2] + self.broadcast_shape(xs[0].dim()))
        out = {}
        for i, task in enumerate(self.tasks):
            acc = xs[0] * weight[i, 0]
            for j in range(1, len(xs)):
                acc = acc.add_(xs[j] * weight[i, j])
            out[task] = acc
        return out

    def extra_repr(self) -> str:
        return (
            f"tasks={self.tasks}, channels={self.channels}, granularity={self.granularity}, "
            f"alpha={self.alpha}, beta={self.beta}"
        )
