"""moreau::prox_update_ and moreau::prox_update_multi_ on Triton.

One proximal step of the Moreau-envelope estimator, in place on ``delta`` (fp32)::

    reference mode (0):  u = delta - lr*g;             r = sqrt(mean_j u_ij**2)
                         coeff = 0 if r <= lr*soft else 1 - soft/r     (may be negative)
    paper mode (1):      u = delta - lr*(g + delta/lamb); r = sqrt(sum_j u_ij**2)
                         coeff = 0 if r <= lr*soft else 1 - lr*soft/r
    delta <- u*coeff;  acc += delta (accumulate);  returns sum(delta**2)

Rows are the output rows of the ``[shape[0], -1]`` view of a tensor with ndim >= 2 (one
program per row, two passes over its columns: the norm, then the update); a 1-D tensor is
grouped elementwise (r = sqrt(u*u), block-of-elements programs). Every program writes the sum
of its delta_new**2 into a partial buffer that a second small reduction adds up, so the result
does not depend on the launch order (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (DTYPE_CODE, NO_FP_FUSION, TABLES, _as_ptr, _find_segment, block_settings, chunked, device_guard,
                     next_pow2)

_MODE_REFERENCE = tl.constexpr(0)


@triton.jit
def _u(g, d, lr, lamb, MODE: tl.constexpr):
    """The unshrunk step: d - lr*g (reference) or d - lr*(g + d/lamb) (paper), fp32."""
    if MODE == _MODE_REFERENCE:
        u = d - lr * g
    else:
        u = d - lr * (g + tl.div_rn(d, lamb))
    return u


@triton.jit
def _coeff(ss, count, soft, thresh, MODE: tl.constexpr):
    """Shrink factor from the sum of squares ``ss`` of ``count`` values; thresh = lr*soft.
    reference: r = sqrt(ss/count), 0 if r <= thresh else 1 - soft/r;
    paper:     r = sqrt(ss),       0 if r <= thresh else 1 - thresh/r."""
    if MODE == _MODE_REFERENCE:
        r = tl.sqrt_rn(tl.div_rn(ss, count))
        c = 1.0 - tl.div_rn(tl.zeros_like(r) + soft, r)
    else:
        r = tl.sqrt_rn(ss)
        c = 1.0 - tl.div_rn(tl.zeros_like(r) + thresh, r)
    return tl.where(r <= thresh, 0.0, c)


@triton.jit
def _prox_row(g_ptr, d_ptr, a_ptr, ncols, lr, soft, thresh, lamb, MODE: tl.constexpr,
              ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """One row of ``ncols`` values at the given row pointers; returns sum(delta_new**2)."""
    cols = tl.arange(0, BLOCK)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, ncols, BLOCK):
        offs = c + cols
        m = offs < ncols
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=m, other=0.0)
        u = _u(g, d, lr, lamb, MODE)
        ss += u * u
    coeff = _coeff(tl.sum(ss, axis=0), tl.cast(ncols, tl.float32), soft, thresh, MODE)
    out = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, ncols, BLOCK):
        offs = c + cols
        m = offs < ncols
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=m, other=0.0)
        new = _u(g, d, lr, lamb, MODE) * coeff
        tl.store(d_ptr + offs, new, mask=m)
        if ACCUMULATE:
            a = tl.load(a_ptr + offs, mask=m, other=0.0)
            tl.store(a_ptr + offs, a + new, mask=m)
        out += tl.where(m, new * new, 0.0)
    return tl.sum(out, axis=0)


@triton.jit
def _prox_elems(g_ptr, d_ptr, a_ptr, start, numel, lr, soft, thresh, lamb, MODE: tl.constexpr,
                ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [start, start + BLOCK) of a 1-D tensor, each its own group (r = sqrt(u*u));
    returns the block's sum(delta_new**2)."""
    offs = start + tl.arange(0, BLOCK)
    m = offs < numel
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=m, other=0.0)
    u = _u(g, d, lr, lamb, MODE)
    new = u * _coeff(u * u, 1.0, soft, thresh, MODE)
    tl.store(d_ptr + offs, new, mask=m)
    if ACCUMULATE:
        a = tl.load(a_ptr + offs, mask=m, other=0.0)
        tl.store(a_ptr + offs, a + new, mask=m)
    return tl.sum(tl.where(m, new * new, 0.0), axis=0)


@triton.jit
def _prox_rows_kernel(g_ptr, d_ptr, a_ptr, part_ptr, ncols, lr, soft, thresh, lamb, MODE: tl.constexpr,
                      ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Program p updates row p of the [rows, ncols] view; part[p] = its sum(delta_new**2)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * ncols
    s = _prox_row(g_ptr + base, d_ptr + base, a_ptr + base, ncols, tl.cast(lr, tl.float32),
                  tl.cast(soft, tl.float32), tl.cast(thresh, tl.float32), tl.cast(lamb, tl.float32),
                  MODE, ACCUMULATE, BLOCK)
    tl.store(part_ptr + row, s)


@triton.jit
def _prox_elems_kernel(g_ptr, d_ptr, a_ptr, part_ptr, numel, lr, soft, thresh, lamb, MODE: tl.constexpr,
                       ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Program p updates elements [p*BLOCK, (p+1)*BLOCK) of a 1-D tensor; part[p] = their sum."""
    pid = tl.program_id(0)
    s = _prox_elems(g_ptr, d_ptr, a_ptr, pid.to(tl.int64) * BLOCK, numel, tl.cast(lr, tl.float32),
                    tl.cast(soft, tl.float32), tl.cast(thresh, tl.float32), tl.cast(lamb, tl.float32),
                    MODE, ACCUMULATE, BLOCK)
    tl.store(part_ptr + pid, s)


@triton.jit
def _prox_rows_multi_kernel(tab_ptr, n, part_ptr, lr, soft, thresh, lamb, KIND: tl.constexpr,
                            MODE: tl.constexpr, ACCUMULATE: tl.constexpr, NT: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Rows of many tensors. ``tab`` is int64 [5, n]: g, delta, acc addresses, ncols, first row
    (ascending). Program p updates row p - first[t] of tensor t; part[p] = its sum."""
    pid = tl.program_id(0)
    t = _find_segment(tab_ptr + 4 * n, n, pid, NT)
    ncols = tl.load(tab_ptr + 3 * n + t)
    base = (pid - tl.load(tab_ptr + 4 * n + t)).to(tl.int64) * ncols
    g_ptr = _as_ptr(tl.load(tab_ptr + t), KIND) + base
    d_ptr = _as_ptr(tl.load(tab_ptr + n + t), 0) + base
    a_ptr = _as_ptr(tl.load(tab_ptr + 2 * n + t), 0) + base
    s = _prox_row(g_ptr, d_ptr, a_ptr, ncols, tl.cast(lr, tl.float32), tl.cast(soft, tl.float32),
                  tl.cast(thresh, tl.float32), tl.cast(lamb, tl.float32), MODE, ACCUMULATE, BLOCK)
    tl.store(part_ptr + pid, s)


@triton.jit
def _prox_elems_multi_kernel(tab_ptr, n, part_ptr, lr, soft, thresh, lamb, KIND: tl.constexpr,
                             MODE: tl.constexpr, ACCUMULATE: tl.constexpr, NT: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Blocks of many 1-D tensors. ``tab`` is int64 [5, n]: g, delta, acc addresses, numel, first
    program (ascending). Program p updates block p - first[t] of tensor t; part[p] = its sum."""
    pid = tl.program_id(0)
    t = _find_segment(tab_ptr + 4 * n, n, pid, NT)
    numel = tl.load(tab_ptr + 3 * n + t)
    start = (pid - tl.load(tab_ptr + 4 * n + t)).to(tl.int64) * BLOCK
    g_ptr = _as_ptr(tl.load(tab_ptr + t), KIND)
    d_ptr = _as_ptr(tl.load(tab_ptr + n + t), 0)
    a_ptr = _as_ptr(tl.load(tab_ptr + 2 * n + t), 0)
    s = _prox_elems(g_ptr, d_ptr, a_ptr, start, numel, tl.cast(lr, tl.float32), tl.cast(soft, tl.float32),
                    tl.cast(thresh, tl.float32), tl.cast(lamb, tl.float32), MODE, ACCUMULATE, BLOCK)
    tl.store(part_ptr + pid, s)


@triton.jit
def _segment_sum_kernel(part_ptr, seg_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[t] = sum(part[seg[0, t] : seg[1, t]]) (seg is int64 [2, n]), fixed order."""
    t = tl.program_id(0)
    lo = tl.load(seg_ptr + t)
    hi = tl.load(seg_ptr + n + t)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(lo, hi, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < hi, other=0.0)
    tl.store(out_ptr + t, tl.sum(acc, axis=0))


def _scalars(lr, soft, lamb):
    # lr*soft is formed in double and rounded once, as the reference's comparison does
    return float(lr), float(soft), float(lr) * float(soft), float(lamb)


def prox_update_(g, delta, acc, lr, soft, lamb, prox_mode, accumulate) -> torch.Tensor:
    lr, soft, thresh, lamb = _scalars(lr, soft, lamb)
    acc_t = acc if accumulate else delta
    with device_guard(delta):
        if delta.dim() >= 2:
            rows = delta.shape[0]
            ncols = delta.numel() // rows
            block, warps = block_settings(ncols, lo=16, hi=4096)
            part = torch.empty(rows, dtype=torch.float32, device=delta.device)
            _prox_rows_kernel[(rows,)](g, delta, acc_t, part, ncols, lr, soft, thresh, lamb, MODE=int(prox_mode),
                                       ACCUMULATE=bool(accumulate), BLOCK=block, num_warps=warps, **NO_FP_FUSION)
        else:
            n = delta.numel()
            block, warps = block_settings(n, lo=16, hi=2048)
            part = torch.empty(triton.cdiv(n, block), dtype=torch.float32, device=delta.device)
            _prox_elems_kernel[(part.numel(),)](g, delta, acc_t, part, n, lr, soft, thresh, lamb,
                                                MODE=int(prox_mode), ACCUMULATE=bool(accumulate), BLOCK=block,
                                                num_warps=warps, **NO_FP_FUSION)
    return part.sum()


def prox_update_multi_(gs, deltas, accs, lr, soft, lamb, prox_mode, accumulate) -> torch.Tensor:
    """Fused: one launch per (kind, gradient dtype) group for the updates, one for the sums."""
    lr, soft, thresh, lamb = _scalars(lr, soft, lamb)
    device = deltas[0].device
    if any(d.device != device for d in deltas):
        raise ValueError("prox_update_multi_ on the triton backend needs all tensors on one device, got "
                         + ", ".join(sorted({str(d.device) for d in deltas})))
    acc_list = list(accs) if (accumulate and len(accs)) else list(deltas)
    groups: dict = {}
    for k, d in enumerate(deltas):
        groups.setdefault((d.dim() >= 2, gs[k].dtype), []).append(k)

    launches = []  # (rows?, members, block, warps, firsts, total)
    seg_lo, seg_hi = [0] * len(deltas), [0] * len(deltas)
    n_part = 0
    for (is_rows, dtype), members in groups.items():
        for part in chunked(members):
            if is_rows:
                sizes = [deltas[k].numel() // deltas[k].shape[0] for k in part]
                block, warps = block_settings(max(sizes), lo=16, hi=4096)
                progs = [deltas[k].shape[0] for k in part]
            else:
                sizes = [deltas[k].numel() for k in part]
                block, warps = block_settings(max(sizes), lo=16, hi=2048)
                progs = [triton.cdiv(s, block) for s in sizes]
            firsts, total = [], 0
            for k, p in zip(part, progs):
                firsts.append(total)
                seg_lo[k], seg_hi[k] = n_part + total, n_part + total + p
                total += p
            launches.append((is_rows, dtype, part, sizes, block, warps, firsts, total, n_part))
            n_part += total

    partials = torch.empty(n_part, dtype=torch.float32, device=device)
    out = torch.empty(len(deltas), dtype=torch.float32, device=device)
    with device_guard(deltas[0]):
        for is_rows, dtype, part, sizes, block, warps, firsts, total, base in launches:
            tab = TABLES.get((tuple(gs[k].data_ptr() for k in part), tuple(deltas[k].data_ptr() for k in part),
                              tuple(acc_list[k].data_ptr() for k in part), tuple(sizes), tuple(firsts)), device)
            kernel = _prox_rows_multi_kernel if is_rows else _prox_elems_multi_kernel
            kernel[(total,)](tab, len(part), partials[base:], lr, soft, thresh, lamb, KIND=DTYPE_CODE[dtype],
                             MODE=int(prox_mode), ACCUMULATE=bool(accumulate), NT=max(16, next_pow2(len(part))),
                             BLOCK=block, num_warps=warps, **NO_FP_FUSION)
        seg = TABLES.get((tuple(seg_lo), tuple(seg_hi)), device)
        _segment_sum_kernel[(len(deltas),)](partials, seg, out, len(deltas), BLOCK=256, **NO_FP_FUSION)
    return out
