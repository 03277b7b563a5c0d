"""The fused CPU kernel for a cross-stitch unit, forward and backward, loaded with ctypes.

``_fused.c`` is built at install time as an optional extension; without it (no C compiler)
``AVAILABLE`` is False and the units run their torch ops. The kernel reads every task's features
once and writes every output once (``stitch``, or over the inputs: ``stitch_``), rounding each
product and each sum as the torch ops do. For training, ``stitch_with_grad`` adds a backward of
two passes: the kernel again for the inputs' gradients, ``weight_grad`` for the weight's.
"""

from __future__ import annotations

import ctypes
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch
from torch import Tensor

_SIZES = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
_POINTERS = ctypes.POINTER(ctypes.c_void_p)
# Argument types of the library's functions: tasks, arrays, weight, geometry, threads.
_SIGNATURES = {
    "crossstitch_mix": [ctypes.c_int, _POINTERS, _POINTERS, ctypes.c_void_p, *_SIZES],
    "crossstitch_mix_inplace": [ctypes.c_int, _POINTERS, ctypes.c_void_p, ctypes.c_void_p, *_SIZES],
    "crossstitch_weight_grad": [ctypes.c_int, _POINTERS, _POINTERS, ctypes.c_void_p, *_SIZES],
    "crossstitch_block": [],
}


def _load() -> ctypes.CDLL | None:
    """The built library beside this module, or None where the install could not build it.

    A library that lacks one of the functions (left by an older build) counts as not built.
    """
    here = Path(__file__).parent
    for suffix in EXTENSION_SUFFIXES:
        path = here / f"_fused{suffix}"
        if path.is_file():
            try:
                library = ctypes.CDLL(str(path))
                for name, argtypes in _SIGNATURES.items():
                    function = getattr(library, name)
                    function.argtypes = argtypes
                    function.restype = ctypes.c_int if name == "crossstitch_block" else None
            except (OSError, AttributeError):
                return None
            return library
    return None


# Elements per task that make a thread's share worth starting it: on few cores a new thread
# competes with torch's OpenMP workers, which busy-wait for a while after each parallel op.
MIN_PER_THREAD = 1 << 20

_LIBRARY = _load()
AVAILABLE = _LIBRARY is not None
# How many times ``stitch`` ran in this process: reports and tests tell the path taken by it.
calls = 0


def kernel_name(ran: bool) -> str:
    """Which kernel ran the units, for reports; ``ran`` says whether ``stitch`` was called."""
    if ran:
        return "fused C kernel"
    return "torch ops" if AVAILABLE else "torch ops (fused C kernel not built)"


def usable(weight: Tensor, xs: list[Tensor], channel_dim: int) -> bool:
    """Whether ``stitch`` gives exactly what the torch ops would, and nothing needs those ops.

    Not while tracing, compiling or exporting (graphs keep the plain ops; the unit rules out
    scripting itself), and only for a ``[T, T(, C)]`` weight and same-shaped contiguous float32
    CPU features. Where autograd records, ``stitch_with_grad`` is the call to make.
    """
    if not AVAILABLE or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    first = xs[0]
    if (
        weight.shape[:2] != (len(xs), len(xs))
        or first.dim() == 0
        or first.numel() == 0
        or not -first.dim() <= channel_dim < first.dim()
    ):
        return False
    if weight.dim() == 3 and first.shape[channel_dim] != weight.shape[2]:
        return False
    return (
        _plain(weight)
        and all(type(x) is Tensor and _plain(x) for x in xs)
        and all(x.shape == first.shape for x in xs)
    )


def _plain(x: Tensor) -> bool:
    """A dense contiguous float32 CPU tensor: memory the kernel can read as it is."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.layout == torch.strided
        and x.is_contiguous()
    )


def _storage_uses(x: Tensor) -> int:
    return torch._C._storage_Use_Count(x.untyped_storage()._cdata)


def _holders(features: dict[str, Tensor]) -> list[tuple[int, int, int]]:
    """Per tensor: Python references, holders of its TensorImpl, holders of its memory."""
    return [
        (sys.getrefcount(x), x._use_count(), _storage_uses(x)) if type(x) is Tensor else (0, 0, 0)
        for x in features.values()
    ]


# What ``_holders`` reports for a tensor that only a dict holds; None where this torch does not
# expose the counts, and then nothing is ever overwritten.
try:
    _ALONE: tuple[int, int, int] | None = _holders({"probe": torch.empty(1)})[0]
except (AttributeError, RuntimeError):
    _ALONE = None


def held_only_by(features: dict[str, Tensor]) -> bool:
    """Whether ``features`` alone holds each of its tensors, so writing over them is unseen.

    No other name, container, hook, view, autograd record or entry of the same dict may hold a
    tensor or share its memory. The counts are compared with those of a tensor known to be held
    by a dict alone, measured the same way when this module loads.
    """
    return _ALONE is not None and all(h == _ALONE for h in _holders(features))


def _geometry(weight: Tensor, first: Tensor, channel_dim: int) -> tuple[int, int, int]:
    """The features as ``[outer, channels, inner]``; the whole tensor for a ``[T, T]`` weight."""
    if weight.dim() == 2:
        return 1, 1, first.numel()
    axis = channel_dim % first.dim()
    return first.shape[:axis].numel(), first.shape[axis], first.shape[axis + 1 :].numel()


def _addresses(tensors: list[Tensor]) -> ctypes.Array:
    """The tensors' data pointers as the C array the kernel takes."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _threads(first: Tensor, threads: int | None) -> int:
    return threads or max(1, min(torch.get_num_threads(), first.numel() // MIN_PER_THREAD))


def stitch(
    weight: Tensor, xs: list[Tensor], channel_dim: int, threads: int | None = None
) -> list[Tensor]:
    """``out[i] = sum_j xs[j] * weight[i, j]`` in task order, in one pass; see ``usable``.

    ``weight`` is ``[T, T, C]`` (per channel, channels on ``channel_dim``) or ``[T, T]``.
    ``threads`` defaults to torch's, one per ``MIN_PER_THREAD`` elements of each task at most.
    """
    global calls
    calls += 1
    outs = [torch.empty_like(xs[0]) for _ in xs]
    _LIBRARY.crossstitch_mix(
        len(xs),
        _addresses(xs),
        _addresses(outs),
        weight.data_ptr(),
        *_geometry(weight, xs[0], channel_dim),
        _threads(xs[0], threads),
    )
    return outs


def stitch_(
    weight: Tensor, xs: list[Tensor], channel_dim: int, threads: int | None = None
) -> list[Tensor]:
    """``stitch`` with each output written over its task's input, which is returned.

    Allocates nothing the size of the features, so the unit adds no memory traffic or page
    faults beyond the arithmetic. The inputs must not share memory; see ``held_only_by``.
    """
    global calls
    calls += 1
    threads = _threads(xs[0], threads)
    scratch = torch.empty(threads * len(xs) * _LIBRARY.crossstitch_block())
    _LIBRARY.crossstitch_mix_inplace(
        len(xs),
        _addresses(xs),
        scratch.data_ptr(),
        weight.data_ptr(),
        *_geometry(weight, xs[0], channel_dim),
        threads,
    )
    return xs


def weight_grad(
    weight: Tensor,
    grads: list[Tensor],
    xs: list[Tensor],
    channel_dim: int,
    threads: int | None = None,
) -> Tensor:
    """``dw[i, j] = sum(grads[i] * xs[j])`` over all but the channel axis, shaped as ``weight``.

    One read of every gradient and input; each thread's sums are kept in float64 and added in
    thread order, so the result does not depend on timing.
    """
    threads = _threads(xs[0], threads)
    outer, channels, inner = _geometry(weight, xs[0], channel_dim)
    sums = torch.zeros(threads, len(xs), len(xs), channels, dtype=torch.float64)
    _LIBRARY.crossstitch_weight_grad(
        len(xs),
        _addresses(grads),
        _addresses(xs),
        sums.data_ptr(),
        outer,
        channels,
        inner,
        threads,
    )
    return sums.sum(0).to(weight.dtype).view(weight.shape)


class _Stitch(torch.autograd.Function):
    """The unit for autograd: the kernel forward, and a backward of two passes.

    The inputs' gradients are the kernel again with the weight's task axes swapped; the
    weight's gradient is ``weight_grad``. Under ``create_graph``, or when an output has no
    gradient (it adds nothing then, not zero times a weight that may be infinite), the backward
    runs in torch ops instead.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, channel_dim: int, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(weight, *xs)
        ctx.channel_dim = channel_dim
        ctx.set_materialize_grads(False)
        return tuple(stitch(weight, list(xs), channel_dim))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        weight, *xs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled() or any(g is None for g in grads):
            grad_weight, grad_xs = _torch_backward(weight, xs, grads, ctx.channel_dim)
        else:
            grads = [g.contiguous() for g in grads]
            grad_xs = [None] * len(xs)
            if any(wanted):
                grad_xs = stitch(weight.transpose(0, 1).contiguous(), grads, ctx.channel_dim)
            grad_weight = None
            if ctx.needs_input_grad[0]:
                grad_weight = weight_grad(weight, grads, xs, ctx.channel_dim)
        grad_xs = [g if needed else None for g, needed in zip(grad_xs, wanted, strict=True)]
        return (grad_weight, None, *grad_xs)


def _torch_backward(
    weight: Tensor, xs: list[Tensor], grads: tuple[Tensor | None, ...], channel_dim: int
) -> tuple[Tensor, list[Tensor]]:
    """The unit's backward in torch ops, which autograd can record; outputs without gradient
    contribute nothing."""
    axis = channel_dim % xs[0].dim()
    shape = [1] * xs[0].dim()
    if weight.dim() == 3:
        shape[axis] = weight.shape[2]
    others = [d for d in range(xs[0].dim()) if weight.dim() == 2 or d != axis]
    pairs = weight.view(*weight.shape[:2], *shape)
    present = [i for i, g in enumerate(grads) if g is not None]
    grad_xs = [sum(grads[i] * pairs[i, j] for i in present) for j in range(len(xs))]
    rows = [
        torch.stack([(grads[i] * x).sum(others) for x in xs])
        if i in present
        else weight.new_zeros(weight.shape[1:])
        for i in range(len(grads))
    ]
    return torch.stack(rows).view(weight.shape), grad_xs


def stitch_with_grad(weight: Tensor, xs: list[Tensor], channel_dim: int) -> list[Tensor]:
    """``stitch`` recorded by autograd, for training; see ``_Stitch``."""
    return list(_Stitch.apply(weight, channel_dim, *xs))
