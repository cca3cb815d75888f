"""moreau::perturb_out and moreau::perturb_multi on Triton.

w_tilde = (w + xi * |std * w|) + delta, computed in fp32 and stored in w's dtype; xi is the
Philox normal of (seed, step, index) (see :mod:`.philox`) or a given noise tensor.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._utils import (DTYPE_CODE, NO_FP_FUSION, PRECISE, TABLES, _as_ptr, _find_segment, chunked, device_guard,
                     next_pow2)
from .philox import _philox_normal_tile, noise_block


@triton.jit
def _perturb_tile(w_ptr, d_ptr, noise_ptr, out_ptr, start, numel, std, seed, step, index,
                  HAS_NOISE: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = (w[e] + xi[e] * |std * w[e]|) + delta[e] for e in [start, start + BLOCK), fp32
    math; xi = noise[e] when HAS_NOISE, else the Philox normal of element e. Each Philox call
    feeds four consecutive elements (a [BLOCK // 4, 4] tile)."""
    if HAS_NOISE:
        offs = start + (tl.arange(0, BLOCK // 4).to(tl.int64) * 4)[:, None] + tl.arange(0, 4)[None, :]
        m = offs < numel
        xi = tl.load(noise_ptr + offs, mask=m, other=0.0).to(tl.float32)
    else:
        xi, offs = _philox_normal_tile(start, seed, step, index, PRECISE, BLOCK)
        m = offs < numel
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=m, other=0.0)
    sigma = tl.abs(std * w)
    res = (w + xi * sigma) + d
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["seed", "step", "index"])
def _perturb_kernel(w_ptr, d_ptr, noise_ptr, out_ptr, numel, std, seed, step, index,
                    HAS_NOISE: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    """One tensor: program p perturbs elements [p * BLOCK, (p + 1) * BLOCK)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    _perturb_tile(w_ptr, d_ptr, noise_ptr, out_ptr, start, numel, tl.cast(std, tl.float32), seed, step, index,
                  HAS_NOISE, PRECISE, BLOCK)


@triton.jit(do_not_specialize=["seed", "step"])
def _perturb_multi_kernel(tab_ptr, n, std, seed, step, KIND: tl.constexpr, NT: tl.constexpr,
                          PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    """Many tensors in one launch. ``tab`` is int64 [6, n]: w address, delta address, out
    address, numel, index, first program of the tensor (ascending). Program p finds its tensor t,
    then perturbs block p - first[t] of it with the key (seed, step, index[t])."""
    pid = tl.program_id(0)
    t = _find_segment(tab_ptr + 5 * n, n, pid, NT)
    w_ptr = _as_ptr(tl.load(tab_ptr + t), KIND)
    d_ptr = _as_ptr(tl.load(tab_ptr + n + t), 0)
    o_ptr = _as_ptr(tl.load(tab_ptr + 2 * n + t), KIND)
    numel = tl.load(tab_ptr + 3 * n + t)
    index = tl.load(tab_ptr + 4 * n + t)
    start = (pid - tl.load(tab_ptr + 5 * n + t)).to(tl.int64) * BLOCK
    _perturb_tile(w_ptr, d_ptr, d_ptr, o_ptr, start, numel, tl.cast(std, tl.float32), seed, step, index,
                  False, PRECISE, BLOCK)


def perturb_out(w, delta, noise, out, std, seed, step, index) -> None:
    n = w.numel()
    block, warps = noise_block(n)
    has_noise = noise is not None
    with device_guard(out):
        _perturb_kernel[(triton.cdiv(n, block),)](
            w, delta, noise if has_noise else delta, out, n, float(std), int(seed), int(step), int(index),
            HAS_NOISE=has_noise, PRECISE=PRECISE, BLOCK=block, num_warps=warps, **NO_FP_FUSION)


def perturb_multi(ws, deltas, outs, std, seed, step, indices) -> None:
    """One launch per (device, dtype) group of up to MAX_FUSED_TENSORS tensors."""
    groups: dict = {}
    for k, w in enumerate(ws):
        groups.setdefault((w.device, w.dtype), []).append(k)
    for (device, dtype), members in groups.items():
        for part in chunked(members):
            block, warps = noise_block(max(ws[k].numel() for k in part))
            progs = [triton.cdiv(ws[k].numel(), block) for k in part]
            firsts, total = [], 0
            for p in progs:
                firsts.append(total)
                total += p
            tab = TABLES.get((tuple(ws[k].data_ptr() for k in part), tuple(deltas[k].data_ptr() for k in part),
                              tuple(outs[k].data_ptr() for k in part), tuple(ws[k].numel() for k in part),
                              tuple(int(indices[k]) for k in part), tuple(firsts)), device)
            with device_guard(outs[part[0]]):
                _perturb_multi_kernel[(total,)](
                    tab, len(part), float(std), int(seed), int(step), KIND=DTYPE_CODE[dtype],
                    NT=max(16, next_pow2(len(part))), PRECISE=PRECISE, BLOCK=block, num_warps=warps,
                    **NO_FP_FUSION)
