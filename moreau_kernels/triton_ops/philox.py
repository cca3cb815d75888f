"""moreau::philox_normal on Triton: counter-based standard-normal noise.

Layout (identical to :mod:`moreau_kernels.reference`): element ``e`` of parameter ``index`` at
step ``step`` uses Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(q_lo, q_hi, step, index)``, ``q = e // 4``; the four words feed elements ``4q .. 4q+3``:
lanes 0/1 are the Box-Muller pair of (x0, x1), lanes 2/3 of (x2, x3).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import NO_FP_FUSION, PRECISE, _cos, _log, _sin, block_settings, device_guard

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
_TWO_PI = tl.constexpr(6.2831855)  # float32(2*pi), as in reference.TWO_PI_F32
_INV_2_24 = tl.constexpr(5.9604644775390625e-08)  # 2**-24, exact in fp32


@triton.jit
def _philox_key(seed, step, index):
    """uint32 (k0, k1, c2, c3) from the int seed (< 2**63) and step/index (< 2**32)."""
    s = seed.to(tl.int64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (step.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    c3 = (index.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1, c2, c3


@triton.jit
def _philox4x32_10(q, k0, k1, c2, c3):
    """Philox 4x32, 10 rounds, on the counters (q & 0xFFFFFFFF, q >> 32, c2, c3), q int64.

    One round: (hi0, lo0) = M0 * x0, (hi1, lo1) = M1 * x2 (64-bit products split in 32-bit
    halves) and x = (hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0); then k0 += W0, k1 += W1 (mod 2**32).
    """
    x0 = (q & 0xFFFFFFFF).to(tl.uint32)
    x1 = ((q >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x2 = tl.zeros_like(x0) + c2
    x3 = tl.zeros_like(x0) + c3
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(x0, _M0)
        lo0 = x0 * _M0
        hi1 = tl.umulhi(x2, _M1)
        lo1 = x2 * _M1
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return x0, x1, x2, x3


@triton.jit
def _box_muller(a, b, PRECISE: tl.constexpr):
    """(r cos t, r sin t) with u1 = ((a >> 8) + 1) 2**-24 in (0, 1], u2 = (b >> 8) 2**-24,
    r = sqrt(-2 log u1), t = 6.2831855 u2 (fp32)."""
    u1 = ((a >> 8) + 1).to(tl.float32) * _INV_2_24
    u2 = (b >> 8).to(tl.float32) * _INV_2_24
    r = tl.sqrt_rn(-2.0 * _log(u1, PRECISE))
    theta = u2 * _TWO_PI
    return r * _cos(theta, PRECISE), r * _sin(theta, PRECISE)


@triton.jit
def _philox_normal_tile(block_start, seed, step, index, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    """The normals of elements [block_start, block_start + BLOCK) as a [BLOCK // 4, 4] tile, with
    their int64 flat offsets (same shape). ``block_start`` is a multiple of 4."""
    k0, k1, c2, c3 = _philox_key(seed, step, index)
    q = block_start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    x0, x1, x2, x3 = _philox4x32_10(q, k0, k1, c2, c3)
    z0, z1 = _box_muller(x0, x1, PRECISE)
    z2, z3 = _box_muller(x2, x3, PRECISE)
    lane = tl.arange(0, 4)[None, :]
    z = tl.where(lane == 0, z0[:, None],
                 tl.where(lane == 1, z1[:, None], tl.where(lane == 2, z2[:, None], z3[:, None])))
    offs = q[:, None] * 4 + lane
    return z, offs


@triton.jit(do_not_specialize=["seed", "step", "index"])
def _philox_normal_kernel(out_ptr, numel, seed, step, index, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = xi_e, the standard normal of element e (module docstring), fp32."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    z, offs = _philox_normal_tile(start, seed, step, index, PRECISE, BLOCK)
    tl.store(out_ptr + offs, z, mask=offs < numel)


@triton.jit(do_not_specialize=["first_q", "seed", "step", "index"])
def _philox_bits_kernel(out_ptr, nq, first_q, seed, step, index, BLOCK: tl.constexpr):
    """out[q, j] = word x_j of Philox4x32-10 at counter first_q + q, stored bit-cast to int32."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k0, k1, c2, c3 = _philox_key(seed, step, index)
    x0, x1, x2, x3 = _philox4x32_10(q + first_q.to(tl.int64), k0, k1, c2, c3)
    m = q < nq
    tl.store(out_ptr + q * 4 + 0, x0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + q * 4 + 1, x1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + q * 4 + 2, x2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + q * 4 + 3, x3.to(tl.int32, bitcast=True), mask=m)


def noise_block(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for elementwise noise work: a multiple of 4, at most 4096."""
    return block_settings(numel, lo=16, hi=4096)


def philox_normal(like: torch.Tensor, seed: int, step: int, index: int) -> torch.Tensor:
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    n = out.numel()
    block, warps = noise_block(n)
    with device_guard(out):
        _philox_normal_kernel[(triton.cdiv(n, block),)](out, n, int(seed), int(step), int(index),
                                                       PRECISE=PRECISE, BLOCK=block, num_warps=warps, **NO_FP_FUSION)
    return out


def philox_bits(numel: int, seed: int, step: int, index: int, device=None, first_q: int = 0) -> torch.Tensor:
    """Same words as :func:`moreau_kernels.reference.philox_bits` ([Q, 4] int64 holding uint32),
    for counters ``first_q .. first_q + Q - 1`` (a test hook: large ``first_q`` checks the high
    counter word without a 2**34-element tensor)."""
    nq = (numel + 3) // 4
    out = torch.empty((nq, 4), dtype=torch.int32, device=device)
    block = min(max(16, 1 << max(0, nq - 1).bit_length()), 1024)
    with device_guard(out):
        _philox_bits_kernel[(triton.cdiv(nq, block),)](out, nq, int(first_q), int(seed), int(step), int(index),
                                                      BLOCK=block, **NO_FP_FUSION)
    return out.to(torch.int64) & 0xFFFFFFFF
