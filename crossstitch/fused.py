"""The fused CPU kernel for a cross-stitch unit's inference forward, loaded with ctypes.

``_fused.c`` is built at install time as an optional extension; without it (no C compiler)
``AVAILABLE`` is False and the units run their torch ops. The kernel reads every task's features
once and writes every output once, rounding each product and each sum as the torch ops do.
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
    scripting itself), not when autograd would record, and only for a ``[T, T(, C)]`` weight and
    same-shaped contiguous float32 CPU features.
    """
    if not AVAILABLE or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or any(x.requires_grad for x in xs)):
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
    pointers = ctypes.c_void_p * len(xs)
    _LIBRARY.crossstitch_mix(
        len(xs),
        pointers(*(x.data_ptr() for x in xs)),
        pointers(*(o.data_ptr() for o in outs)),
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
        (ctypes.c_void_p * len(xs))(*(x.data_ptr() for x in xs)),
        scratch.data_ptr(),
        weight.data_ptr(),
        *_geometry(weight, xs[0], channel_dim),
        threads,
    )
    return xs
