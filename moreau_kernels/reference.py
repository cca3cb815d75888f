"""Pure-PyTorch reference of every moreau op.

This module is the contract: every fused backend (C++/OpenMP, CUDA, Triton) must match these
functions, and the tests compare against them. The math follows ``SPEC.md`` §2-§4.

Conventions shared by all backends
----------------------------------
* Counter-based noise (Philox 4x32-10). For element ``e`` (row-major flat index) of parameter
  number ``index`` at estimator step ``step`` and user seed ``seed``::

      key     = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
      counter = (q & 0xFFFFFFFF, q >> 32, step, index)        with q = e // 4
      x0..x3  = philox4x32_10(counter, key)
      lane    = e % 4;   (a, b) = (x0, x1) for lanes 0, 1 and (x2, x3) for lanes 2, 3
      u1      = ((a >> 8) + 1) * 2**-24          in (0, 1]
      u2      = (b >> 8) * 2**-24                in [0, 1)
      r       = sqrt(-2 * log(u1));  theta = 6.2831855 * u2      (fp32 math)
      xi      = r * cos(theta) for even lanes, r * sin(theta) for odd lanes

  The uint32 words are bit-identical in every backend; the normals differ only by the
  last-ulp differences of each platform's log/sin/cos.
* ``delta`` and ``acc`` are float32 whatever the weight dtype; arithmetic happens in float32.
* Row groups: a tensor with ``ndim >= 2`` is viewed as ``[shape[0], -1]`` and each output row
  is one group; a 1-D tensor is grouped elementwise.
"""
from __future__ import annotations

import math

import torch

MODE_REFERENCE = 0  # SPEC §2: u = d - lr*g; RMS row stat; zero test at lr*soft, shrink by soft
MODE_PAPER = 1  # SPEC §3: u = d - lr*(g + d/lamb); l2 row norm; tau = lr*soft for both

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831855  # float32(2*pi), the constant every backend uses


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, without int64 overflow."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p0 = a * b_lo  # < 2**48
    p1 = a * b_hi  # < 2**48
    mid = p0 + ((p1 & 0xFFFF) << 16)  # < 2**49
    lo = mid & _MASK32
    hi = (p1 >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox 4x32 on int64 tensors holding uint32 values; returns four int64 tensors."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _check_key(seed: int, step: int, index: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    for name, v in (("step", step), ("index", index)):
        if not 0 <= v < 2**32:
            raise ValueError(f"{name} must be in [0, 2**32), got {v}")


def philox_bits(numel: int, seed: int, step: int, index: int, device=None, first_q: int = 0) -> torch.Tensor:
    """The raw uint32 words (as int64) for counters q = first_q .. first_q+ceil(numel/4)-1, shape [Q, 4]."""
    _check_key(seed, step, index)
    nq = (numel + 3) // 4
    q = torch.arange(first_q, first_q + nq, dtype=torch.int64, device=device)
    c0 = q & _MASK32
    c1 = q >> 32
    c2 = torch.full_like(q, step)
    c3 = torch.full_like(q, index)
    x = philox4x32(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    return torch.stack(x, dim=1)


def bits_to_normal(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Box-Muller on the [Q, 4] words: lanes (0,1) from (x0,x1), lanes (2,3) from (x2,x3)."""
    a = bits[:, 0::2]  # x0, x2
    b = bits[:, 1::2]  # x1, x3
    scale = 2.0**-24
    u1 = ((a >> 8) + 1).to(torch.float32) * scale
    u2 = (b >> 8).to(torch.float32) * scale
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * TWO_PI_F32
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=2)  # [Q, 2 pairs, (cos, sin)]
    return z.reshape(-1)[:numel]


def normal_noise(shape, seed: int, step: int, index: int, device=None, offset: int = 0) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` for the key (seed, step, index).

    ``offset``: flat index, in the full parameter, of this tensor's first element, so that a slice
    of rows (a rank's shard) gets exactly the noise of those elements in the full tensor.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    lane = offset % 4
    bits = philox_bits(numel + lane, seed, step, index, device=device, first_q=offset // 4)
    return bits_to_normal(bits, numel + lane)[lane:].reshape(shape)


def philox_normal(like: torch.Tensor, seed: int, step: int, index: int) -> torch.Tensor:
    """The op form of :func:`normal_noise`: noise shaped like ``like``, on its device."""
    return normal_noise(like.shape, seed, step, index, like.device)


def perturb(w: torch.Tensor, delta: torch.Tensor, noise: torch.Tensor | None, std: float,
            seed: int, step: int, index: int) -> torch.Tensor:
    """w_tilde = (w + xi * |std * w|) + delta, computed in fp32, returned in w's dtype.

    ``xi`` is ``noise`` when given (the published torch-generator stream), else the Philox
    normal of (seed, step, index).
    """
    w32 = w.float()
    xi = noise.float() if noise is not None else normal_noise(w.shape, seed, step, index, w.device)
    sigma = torch.abs(std * w32)
    return ((w32 + xi * sigma) + delta).to(w.dtype)


def row_view(t: torch.Tensor) -> torch.Tensor:
    """[R, C] view for row grouping; 1-D tensors become [n, 1] (elementwise groups)."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)


def _f32(x: float, like: torch.Tensor) -> torch.Tensor:
    """``x`` rounded once to fp32, as a 0-d tensor on ``like``'s device."""
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (as sqrtf, __fsqrt_rn, tl.sqrt_rn): torch's vectorized CPU
    sqrt is accurate to ~0.5001 ulp only; in fp64 and rounded once it is exact for fp32 inputs."""
    return torch.sqrt(x.double()).float()


def prox_update_(g: torch.Tensor, delta: torch.Tensor, acc: torch.Tensor | None, lr: float,
                 soft: float, lamb: float, prox_mode: int, accumulate: bool) -> torch.Tensor:
    """One proximal step, in place on ``delta`` (and ``acc`` when ``accumulate``).

    reference mode (SPEC §2)::

        u     = delta - lr * g
        r_i   = sqrt(mean_j u_ij**2)   (2-D rows)  |  |u_i|  (1-D)
        coeff = 0 if r_i <= lr*soft else 1 - soft / r_i      (may be negative: reflection)

    paper mode (SPEC §3)::

        u     = delta - lr * (g + delta / lamb)
        r_i   = sqrt(sum_j u_ij**2)    (2-D rows)  |  |u_i|  (1-D)
        coeff = max(0, 1 - lr*soft / r_i)

    delta <- u * coeff; if accumulate: acc += delta. Returns sum(delta**2) (fp32 scalar).
    """
    # Every quotient is one correctly rounded fp32 division, as in the fused kernels: a Python
    # scalar divided by a tensor is r.reciprocal() * s in torch (two roundings), and on CUDA a
    # tensor divided by a Python scalar is t * (1/s); fp32 0-d tensors avoid both.
    if prox_mode == MODE_REFERENCE:
        u = delta - lr * g.float()
    else:
        u = delta - lr * (g.float() + torch.div(delta, _f32(lamb, delta)))
    rows = row_view(u)
    if prox_mode == MODE_REFERENCE:
        r = _sqrt_rn((rows * rows).mean(dim=1, keepdim=True))
        coeff = torch.where(r <= lr * soft, torch.zeros_like(r), 1.0 - torch.div(_f32(soft, r), r))
    elif prox_mode == MODE_PAPER:
        r = _sqrt_rn((rows * rows).sum(dim=1, keepdim=True))
        tau = lr * soft
        coeff = torch.where(r <= tau, torch.zeros_like(r), 1.0 - torch.div(_f32(tau, r), r))
    else:
        raise ValueError(f"mode must be {MODE_REFERENCE} (reference) or {MODE_PAPER} (paper), got {prox_mode}")
    new = (rows * coeff).reshape(delta.shape)
    delta.copy_(new)
    if accumulate:
        if acc is None:
            raise ValueError("accumulate=True needs an acc tensor")
        acc.add_(new)
    return (new * new).sum()


def channel_saliency(w: torch.Tensor, g: torch.Tensor | None, vectorize: bool = False):
    """Per-output-row and per-input-column saliency of a 2-D weight, in fp32.

    s = |w * g| (g=None means g = 1, the magnitude baseline).
    rows[i] = sum_j s[i, j], cols[j] = sum_i s[i, j]; with ``vectorize`` the absolute value is
    taken after the sum: rows[i] = |sum_j w*g|, cols[j] = |sum_i w*g|.
    """
    if w.dim() != 2:
        raise ValueError(f"channel_saliency needs a 2-D weight, got shape {tuple(w.shape)}")
    p = w.float() if g is None else w.float() * g.float()
    if vectorize:
        return p.sum(dim=1).abs(), p.sum(dim=0).abs()
    a = p.abs()
    return a.sum(dim=1), a.sum(dim=0)


# ----------------------------------------------------------------------------------------
# Out-variants and multi-tensor forms: loops over the single-tensor math above. Fused
# backends replace the loop with one launch; the results must be the same.
# ----------------------------------------------------------------------------------------
def perturb_out(w, delta, noise, out, std, seed, step, index) -> None:
    out.copy_(perturb(w, delta, noise, std, seed, step, index))


def perturb_multi(ws, deltas, outs, std, seed, step, indices) -> None:
    for w, d, o, i in zip(ws, deltas, outs, indices):
        perturb_out(w, d, None, o, std, seed, step, i)


def prox_update_multi_(gs, deltas, accs, lr, soft, lamb, prox_mode, accumulate) -> torch.Tensor:
    accs = list(accs) if len(accs) else [None] * len(deltas)
    sums = [prox_update_(g, d, a, lr, soft, lamb, prox_mode, accumulate) for g, d, a in zip(gs, deltas, accs)]
    if not sums:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack(sums).to(torch.float32)
