"""The cross-stitch unit: a learned linear recombination of per-task activations."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from crossstitch import fused
from crossstitch.errors import CrossStitchError

GRANULARITIES = ("channel", "layer")
# Hooks registered for every module; one of them could keep a unit's inputs.
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def default_beta(alpha: float, num_tasks: int) -> float:
    """Off-diagonal init that makes every row of the unit a convex combination."""
    return (1.0 - alpha) / (num_tasks - 1)


def check_init(alpha: float, beta: float | None) -> None:
    """Refuse non-finite init values before anything is built."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None and not math.isfinite(value):
            raise CrossStitchError(f"{name} must be a finite number, got {value}")


class CrossStitchUnit(nn.Module):
    """Recombines task features: ``out[i] = sum_j A[i, j] * x[j]``, summed in task order.

    ``A`` is one parameter of shape ``[T, T, C]`` (``granularity="channel"``, one weight per
    channel) or ``[T, T]`` (``"layer"``). ``channel_dim`` is where the channels lie in the
    features: 1 for NCHW maps, -1 for channel-last tokens. The sum is accumulated left to right
    with separate multiplies and adds (no fused multiply-add), so the result equals the
    stack-and-sum reference bit for bit on CPU. On contiguous float32 CPU features the fused C
    kernel (``crossstitch.fused``) runs instead where it is built: the same roundings in one
    pass, written over the inputs at inference when the caller gives them up and nothing else
    can see them, and with its own two-pass backward in training.
    """

    def __init__(
        self,
        tasks: list[str],
        channels: int,
        granularity: str = "channel",
        alpha: float = 0.9,
        beta: float | None = None,
        channel_dim: int = 1,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise CrossStitchError(
                f"unknown granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}"
            )
        if len(tasks) < 2:
            raise CrossStitchError("a cross-stitch unit needs at least two tasks")
        check_init(alpha, beta)
        self.tasks = list(tasks)
        self.channels = channels
        self.granularity = granularity
        self.channel_dim = channel_dim
        self.alpha = float(alpha)
        self.beta = float(default_beta(alpha, len(tasks)) if beta is None else beta)
        num_tasks = len(tasks)
        shape = (num_tasks, num_tasks, channels) if granularity == "channel" else (num_tasks,) * 2
        self.weight = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the diagonal to alpha and everything else to beta."""
        with torch.no_grad():
            self.weight.fill_(self.beta)
            for i in range(len(self.tasks)):
                self.weight[i, i] = self.alpha

    def _pair(self, key: tuple[str, str]) -> tuple[int, int]:
        target, source = key
        for task in (target, source):
            if task not in self.tasks:
                raise KeyError(f"unknown task '{task}'; tasks are {self.tasks}")
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

    def forward(self, features: dict[str, Tensor], reuse_inputs: bool = False) -> dict[str, Tensor]:
        """The recombined features, one per task.

        ``reuse_inputs=True`` says the caller is done with ``features`` (the backbone passes its
        stage outputs so): at inference the fused kernel then writes the outputs over them, and
        the unit allocates nothing, where no hook and no other reference can see those tensors.
        """
        overwrite = reuse_inputs and not torch.jit.is_scripting() and self._may_overwrite(features)
        xs = [features[task] for task in self.tasks]
        if not torch.jit.is_scripting() and fused.usable(self.weight, xs, self.channel_dim):
            if torch.is_grad_enabled() and (
                self.weight.requires_grad or any(x.requires_grad for x in xs)
            ):
                stitch = fused.stitch_with_grad
            else:
                stitch = fused.stitch_ if overwrite else fused.stitch
            return dict(zip(self.tasks, stitch(self.weight, xs, self.channel_dim), strict=True))
        return dict(zip(self.tasks, self.mix(xs), strict=True))

    def _may_overwrite(self, features: dict[str, Tensor]) -> bool:
        """No autograd, no hook that could keep the inputs, and nothing else holding them."""
        return (
            not torch.is_grad_enabled()
            and not (self._forward_hooks or self._forward_pre_hooks)
            and not any(getattr(torch_module, name, True) for name in _GLOBAL_HOOKS)
            and fused.held_only_by(features)
        )

    def mix(self, xs: list[Tensor]) -> list[Tensor]:
        """The unit in elementwise torch ops, one output per task in task order.

        The path for tracing and export, and wherever the fused kernel does not apply.
        """
        weight = self.weight.view(self.weight.shape[:2] + self.broadcast_shape(xs[0].dim()))
        out = []
        for i in range(len(xs)):
            acc = xs[0] * weight[i, 0]
            for j in range(1, len(xs)):
                acc = acc.add_(xs[j] * weight[i, j])
            out.append(acc)
        return out

    def extra_repr(self) -> str:
        return (
            f"tasks={self.tasks}, channels={self.channels}, granularity={self.granularity}, "
            f"alpha={self.alpha}, beta={self.beta}"
        )
