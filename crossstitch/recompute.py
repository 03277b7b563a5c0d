"""Stage checkpointing: a stage keeps only its input for backward and runs again to get the rest.

Training memory grows with the number of tasks: every task network keeps its activations for
backward. ``checkpointed`` wraps one stage in non-reentrant ``torch.utils.checkpoint``, so a
stage's inner activations exist for one stage of one task at a time, at the cost of running its
forward again during backward (docs/design.md §12).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Put the buffers of ``module`` (batch norm running statistics, ``num_batches_tracked``)
    back as they were on leaving, so that a recomputation does not count the batch twice.
    """
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """The forward runs as it is; the recomputation in backward leaves the buffers alone."""
    return contextlib.nullcontext(), buffers_restored(module)


def checkpointed(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, its activations recomputed in backward instead of kept.

    Under ``torch.compile`` the compiler recomputes from the traced graph, whose running
    statistic updates happen once, in the forward; the eager recomputation restores them itself.
    """
    if torch.compiler.is_compiling():
        return checkpoint(module, x, use_reentrant=False)
    return checkpoint(
        module, x, use_reentrant=False, context_fn=functools.partial(_contexts, module)
    )


def run_stage(module: nn.Module, x: Tensor, recompute: bool) -> Tensor:
    """``module(x)``, checkpointed when ``recompute``."""
    return checkpointed(module, x) if recompute else module(x)
