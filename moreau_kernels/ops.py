"""The public ops, declared once as ``torch.library`` custom ops in the ``moreau`` namespace.

Each op validates its arguments, then runs on the backend that :mod:`.dispatch` selects. The
math of every op is the docstring of its twin in :mod:`.reference`. All ops work in eager mode,
under ``torch.compile`` (as opaque calls) and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .reference import MODE_PAPER, MODE_REFERENCE

_F32 = torch.float32


def _nonempty(name: str, t: Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); moreau ops need at least one element")


def _same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} has shape {tuple(b.shape)} but {a_name} has {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")


def _state(name: str, t: Tensor) -> None:
    """delta/acc: fp32 and contiguous (the kernels update them in place)."""
    if t.dtype != _F32:
        raise TypeError(f"{name} must be float32 (estimator state stays fp32), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _weight(name: str, t: Tensor) -> None:
    if t.dtype not in dispatch.WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _key(seed: int, step: int, index: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not 0 <= step < 2**32 or not 0 <= index < 2**32:
        raise ValueError(f"step and index must be in [0, 2**32), got step={step}, index={index}")


def _mode(prox_mode: int) -> None:
    if prox_mode not in (MODE_REFERENCE, MODE_PAPER):
        raise ValueError(f"mode must be {MODE_REFERENCE} (reference) or {MODE_PAPER} (paper), got {prox_mode}")


# ---------------------------------------------------------------- philox_normal
@torch.library.custom_op("moreau::philox_normal", mutates_args=())
def philox_normal(like: Tensor, seed: int, step: int, index: int) -> Tensor:
    """Float32 standard-normal noise shaped like ``like`` for the key (seed, step, index)."""
    _nonempty("like", like)
    _key(seed, step, index)
    return dispatch.run("philox_normal", like, seed, step, index)


@philox_normal.register_fake
def _(like, seed, step, index):
    return torch.empty(like.shape, dtype=_F32, device=like.device)


# ---------------------------------------------------------------- perturb
def _check_perturb(w, delta, noise, out):
    _nonempty("w", w)
    _weight("w", w)
    _same_shape("w", w, "delta", delta)
    _state("delta", delta)
    if noise is not None:
        _same_shape("w", w, "noise", noise)
    _same_shape("w", w, "out", out)
    if out.dtype != w.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {w.dtype} tensor, got {out.dtype}")


@torch.library.custom_op("moreau::perturb_out", mutates_args=("out",))
def perturb_out(w: Tensor, delta: Tensor, noise: Optional[Tensor], out: Tensor, std: float,
                seed: int, step: int, index: int) -> None:
    """out = (w + xi*|std*w|) + delta; xi = ``noise`` or Philox(seed, step, index)."""
    _check_perturb(w, delta, noise, out)
    _key(seed, step, index)
    w = w.contiguous()
    noise = noise.contiguous() if noise is not None else None
    dispatch.run("perturb_out", w, delta, noise, out, std, seed, step, index)


def perturb(w: Tensor, delta: Tensor, std: float, seed: int, step: int, index: int,
            noise: Optional[Tensor] = None) -> Tensor:
    """Functional form of :func:`perturb_out`: returns the perturbed weight in w's dtype."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    perturb_out(w, delta, noise, out, std, seed, step, index)
    return out


@torch.library.custom_op("moreau::perturb_multi", mutates_args=("outs",))
def perturb_multi(ws: list[Tensor], deltas: list[Tensor], outs: list[Tensor], std: float, seed: int,
                  step: int, indices: list[int]) -> None:
    """:func:`perturb_out` over lists (one launch where the backend can), noise from Philox."""
    if not len(ws) == len(deltas) == len(outs) == len(indices):
        raise ValueError("ws, deltas, outs and indices must have the same length")
    for w, d, o, i in zip(ws, deltas, outs, indices):
        _check_perturb(w, d, None, o)
        _key(seed, step, i)
        if not w.is_contiguous():
            raise ValueError("perturb_multi needs contiguous weights")
    if ws:
        dispatch.run("perturb_multi", ws, deltas, outs, std, seed, step, indices)


# ---------------------------------------------------------------- prox update
def _check_prox(g, delta, acc, accumulate, prox_mode):
    _nonempty("g", g)
    _weight("g", g)
    _same_shape("delta", delta, "g", g)
    _state("delta", delta)
    if acc is not None:
        _same_shape("delta", delta, "acc", acc)
        _state("acc", acc)
    elif accumulate:
        raise ValueError("accumulate=True needs an acc tensor")
    _mode(prox_mode)


@torch.library.custom_op("moreau::prox_update_", mutates_args=("delta", "acc"))
def prox_update_(g: Tensor, delta: Tensor, acc: Optional[Tensor], lr: float, soft: float, lamb: float,
                 prox_mode: int, accumulate: bool) -> Tensor:
    """One proximal step in place (SPEC §2 steps 3-7 / §3); returns sum(delta_new**2) as fp32."""
    _check_prox(g, delta, acc, accumulate, prox_mode)
    return dispatch.run("prox_update_", g.contiguous(), delta, acc, lr, soft, lamb, prox_mode, accumulate)


@prox_update_.register_fake
def _(g, delta, acc, lr, soft, lamb, prox_mode, accumulate):
    return torch.empty((), dtype=_F32, device=delta.device)


@torch.library.custom_op("moreau::prox_update_multi_", mutates_args=("deltas", "accs"))
def prox_update_multi_(gs: list[Tensor], deltas: list[Tensor], accs: list[Tensor], lr: float, soft: float,
                       lamb: float, prox_mode: int, accumulate: bool) -> Tensor:
    """:func:`prox_update_` over lists; ``accs`` is empty or one per delta. Returns [n] sums."""
    if len(gs) != len(deltas) or (len(accs) and len(accs) != len(deltas)):
        raise ValueError("gs and deltas must have the same length, accs empty or the same length")
    if accumulate and not len(accs):
        raise ValueError("accumulate=True needs one acc per delta")
    for k, (g, d) in enumerate(zip(gs, deltas)):
        _check_prox(g, d, accs[k] if len(accs) else None, accumulate, prox_mode)
        if not g.is_contiguous():
            raise ValueError("prox_update_multi_ needs contiguous gradients")
    if not deltas:
        return torch.zeros(0, dtype=_F32)
    return dispatch.run("prox_update_multi_", gs, deltas, accs, lr, soft, lamb, prox_mode, accumulate)


@prox_update_multi_.register_fake
def _(gs, deltas, accs, lr, soft, lamb, prox_mode, accumulate):
    dev = deltas[0].device if deltas else torch.device("cpu")
    return torch.empty((len(deltas),), dtype=_F32, device=dev)


# ---------------------------------------------------------------- saliency
@torch.library.custom_op("moreau::channel_saliency", mutates_args=())
def channel_saliency(w: Tensor, g: Optional[Tensor], vectorize: bool) -> tuple[Tensor, Tensor]:
    """Per-row and per-column sums of |w*g| (|sum w*g| with ``vectorize``; g=None: |w|), fp32."""
    _nonempty("w", w)
    _weight("w", w)
    if w.dim() != 2:
        raise ValueError(f"channel_saliency needs a 2-D weight, got shape {tuple(w.shape)}")
    if g is not None:
        _same_shape("w", w, "g", g)
        _weight("g", g)
        g = g.contiguous()
    return dispatch.run("channel_saliency", w.contiguous(), g, vectorize)


@channel_saliency.register_fake
def _(w, g, vectorize):
    return (torch.empty((w.shape[0],), dtype=_F32, device=w.device),
            torch.empty((w.shape[1],), dtype=_F32, device=w.device))
