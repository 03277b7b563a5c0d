"""The fused CPU kernel for a cross-stitch unit's inference forward, loaded with ctypes.

``_fused.c`` is built at install time as an optional extension; without it (no C compiler)
``AVAILABLE`` is False and the units run their torch ops. The kernel reads every task's features
once and writes every output once, rounding each product and each sum as the torch ops do.
"""

from __future__ import annotations

import ctypes
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch
from torch import Tensor


def _load() -> ctypes.CDLL | None:
    """The built library beside this module, or None where the install could not build it."""
    here = Path(__file__).parent
    for suffix in EXTENSION_SUFFIXES:
        path = here / f"_fused{suffix}"
        if path.is_file():
            try:
                library = ctypes.CDLL(str(path))
            except OSError:
                return None
            library.crossstitch_mix.restype = None
            library.crossstitch_mix.argtypes = [
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int,
            ]
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


def stitch(
    weight: Tensor, xs: list[Tensor], channel_dim: int, threads: int | None = None
) -> list[Tensor]:
    """``out[i] = sum_j xs[j] * weight[i, j]`` in task order, in one pass; see ``usable``.

    ``weight`` is ``[T, T, C]`` (per channel, channels on ``channel_dim``) or ``[T, T]``.
    ``threads`` defaults to torch's, one per ``MIN_PER_THREAD`` elements of each task at most.
    """
    global calls
    calls += 1
    tasks = len(xs)
    first = xs[0]
    if weight.dim() == 2:
        outer, channels, inner = 1, 1, first.numel()
    else:
        axis = channel_dim % first.dim()
        channels = first.shape[axis]
        outer = first.shape[:axis].numel()
        inner = first.shape[axis + 1 :].numel()
    outs = [torch.empty_like(first) for _ in xs]
    pointers = ctypes.c_void_p * tasks
    _LIBRARY.crossstitch_mix(
        tasks,
        pointers(*(x.data_ptr() for x in xs)),
        pointers(*(o.data_ptr() for o in outs)),
        weight.data_ptr(),
        outer,
        channels,
        inner,
        threads or max(1, min(torch.get_num_threads(), first.numel() // MIN_PER_THREAD)),
    )
    return outs
