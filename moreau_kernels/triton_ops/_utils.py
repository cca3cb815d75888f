"""Shared pieces of the Triton backend: precise-math helpers, launch settings, pointer tables.

Nothing here is public; the op files import from it.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a @triton.jit function is interpreted; read the
# variable the same way. Under the interpreter (numpy) libdevice is unavailable, so the kernels
# take a PRECISE constexpr: libdevice on GPU (tl.log/sin/cos may lower to approximate PTX
# instructions there), tl.* under the interpreter (numpy's float32 functions are correctly rounded
# to ~1 ulp already).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PRECISE = not INTERPRET

if PRECISE:
    from triton.language.extra import libdevice
else:  # pragma: no cover - the name is only referenced in branches the interpreter skips
    libdevice = None

# Launch/compile options of every kernel here. Triton lets LLVM and ptxas contract a*b + c into
# one fma by default; the C++ kernels (-ffp-contract=off), the CUDA kernels (__fmul_rn/__fadd_rn)
# and the fp32 reference round the product and the sum separately, so w + xi*sigma and
# delta - lr*g would differ in the last bit. The compile check rejects fma.rn.f32 in the PTX of
# the kernels that do not call libdevice (whose log/sin/cos use fma internally, on purpose).
NO_FP_FUSION = {"enable_fp_fusion": False}

MAX_FUSED_TENSORS = 1024  # tensors per multi-tensor launch (the table is searched as one vector)


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    """Natural log, correctly rounded to ~1 ulp on every platform."""
    if PRECISE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _cos(x, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.cos(x)
    else:
        y = tl.cos(x)
    return y


@triton.jit
def _sin(x, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.sin(x)
    else:
        y = tl.sin(x)
    return y


@triton.jit
def _find_segment(starts_ptr, n, pid, NT: tl.constexpr):
    """Index t of the segment holding work item ``pid``: the number of ``starts[0..n)`` that are
    <= pid, minus one (``starts`` is ascending, ``starts[0] == 0``). One vector load, no branches."""
    ar = tl.arange(0, NT)
    starts = tl.load(starts_ptr + ar, mask=ar < n, other=2147483647)
    return tl.sum((starts <= pid).to(tl.int32), axis=0) - 1


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_settings(n: int, lo: int = 16, hi: int = 4096) -> tuple[int, int]:
    """(BLOCK, num_warps) for a loop over ``n`` elements: the next power of two clamped to
    [lo, hi], and more warps for longer blocks (the Liger rule of thumb)."""
    block = min(max(next_pow2(n), lo), hi)
    if block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    elif block >= 512:
        warps = 4
    else:
        warps = 2 if block >= 256 else 1
    return block, warps


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one. Under the
    interpreter, silence numpy's floating-point warnings instead (e.g. the 1/0 of an all-zero row,
    whose result a ``tl.where`` then discards, exactly as on the GPU)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if INTERPRET:
        import numpy as np

        return np.errstate(divide="ignore", invalid="ignore", over="ignore")
    return contextlib.nullcontext()


class TableCache:
    """Device copies of the int64 pointer/size tables of multi-tensor launches.

    The key is the table content itself (pointers, sizes, keys), so a hit is always correct even
    if a tensor was freed and its memory reused; the estimator loop reuses the same tensors every
    step, so after the first step no host-to-device copy is needed.
    """

    def __init__(self, size: int = 16):
        self.size = size
        self._d: OrderedDict = OrderedDict()

    def get(self, columns: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
        key = (str(device), columns)
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        tab = torch.tensor(columns, dtype=torch.int64).to(device)  # [n_columns, n]
        self._d[key] = tab
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return tab


TABLES = TableCache()


def chunked(items: list, size: int | None = None):
    """Successive slices of at most ``size`` (default MAX_FUSED_TENSORS, read at call time)."""
    size = size or MAX_FUSED_TENSORS
    for i in range(0, len(items), size):
        yield items[i:i + size]


DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _as_ptr(addr, KIND: tl.constexpr):
    """An int64 address (from a pointer table) as a typed pointer: KIND 0 fp32, 1 bf16, 2 fp16."""
    if KIND == 0:
        p = addr.to(tl.pointer_type(tl.float32), bitcast=True)
    elif KIND == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16), bitcast=True)
    else:
        p = addr.to(tl.pointer_type(tl.float16), bitcast=True)
    return p
