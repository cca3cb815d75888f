"""moreau::channel_saliency on Triton: per-row and per-column sums of a 2-D weight's saliency.

s = |w * g| (g absent: |w|); rows[i] = sum_j s[i, j], cols[j] = sum_i s[i, j]. With
``vectorize`` the absolute value comes after the sum: rows[i] = |sum_j w*g|, cols[j] =
|sum_i w*g|, so the kernel accumulates signed sums and the abs is applied at the very end.

The weight is read once, in [BLOCK_R, BLOCK_C] tiles. Program (i, j) owns row block i and the
j-th of ``splits`` column ranges; it writes its row sums to ``rows_part[j]`` and each tile's
column sums to ``cols_part[i]``. Two small fixed-order reductions over the partial buffers then
give rows and cols (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import NO_FP_FUSION, device_guard, next_pow2, num_sms


@triton.jit
def _saliency_kernel(w_ptr, g_ptr, rows_part_ptr, cols_part_ptr, R, C, tiles_per_split,
                     HAS_G: tl.constexpr, VECTORIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """rows_part[j, r] = sum over program (i, j)'s columns of p[r, c]; cols_part[i, c] = sum over
    row block i of p[r, c]; p = w*g (w without g), |.| first unless VECTORIZE. fp32 sums."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    rr = i * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rr < R
    row_base = rr.to(tl.int64)[:, None] * C
    row_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    c_first = j * tiles_per_split * BLOCK_C
    c_end = tl.minimum(c_first + tiles_per_split * BLOCK_C, C)
    for c0 in range(c_first, c_end, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < c_end
        m = rmask[:, None] & cmask[None, :]
        offs = row_base + cc[None, :]
        p = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_G:
            p = p * tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if not VECTORIZE:
            p = tl.abs(p)
        row_acc += tl.sum(p, axis=1)
        tl.store(cols_part_ptr + i.to(tl.int64) * C + cc, tl.sum(p, axis=0), mask=cmask)
    tl.store(rows_part_ptr + j.to(tl.int64) * R + rr, row_acc, mask=rmask)


def _tiles(R: int, C: int) -> tuple[int, int, int]:
    block_r = min(next_pow2(R), 32)
    block_c = min(max(next_pow2(C), 16), 128)
    warps = 4 if block_r * block_c >= 2048 else 1
    return block_r, block_c, warps


def channel_saliency(w: torch.Tensor, g: torch.Tensor | None, vectorize: bool, splits: int | None = None):
    """``splits`` (column ranges per row block) defaults to enough programs to fill the GPU."""
    R, C = w.shape
    block_r, block_c, warps = _tiles(R, C)
    n_rb = triton.cdiv(R, block_r)
    n_ct = triton.cdiv(C, block_c)
    if splits is None:
        splits = triton.cdiv(4 * num_sms(w.device), n_rb)
    splits = max(1, min(int(splits), n_ct))
    tiles_per_split = triton.cdiv(n_ct, splits)
    splits = triton.cdiv(n_ct, tiles_per_split)  # no empty column ranges
    rows_part = torch.empty((splits, R), dtype=torch.float32, device=w.device)
    cols_part = torch.empty((n_rb, C), dtype=torch.float32, device=w.device)
    with device_guard(w):
        _saliency_kernel[(n_rb, splits)](w, g if g is not None else w, rows_part, cols_part, R, C, tiles_per_split,
                                         HAS_G=g is not None, VECTORIZE=bool(vectorize), BLOCK_R=block_r,
                                         BLOCK_C=block_c, num_warps=warps, **NO_FP_FUSION)
    rows = rows_part.sum(dim=0)
    cols = cols_part.sum(dim=0)
    if vectorize:
        rows.abs_()
        cols.abs_()
    return rows, cols
