"""Structured importance of attention units and MLP channels (SPEC §4).

Per weight s = |W ⊙ G|, G being Ĝ (``moreau``), the plain gradient (``taylor``) or 1
(``magnitude``). Per layer, each matrix contributes a per-unit part:

* MLP channel c: gate row c, up row c, down column c.
* attention: q rows and o columns (query-head channels), k and v rows (KV channels).
  ``kv-group`` unit k sums q/o channels of query heads k*n_rep .. k*n_rep+n_rep-1 and the k/v
  channels of KV head k; ``query-heads`` unit h sums the q/o channels of query head h.

The parts are combined across matrices with ``reduction``: ``sum`` (published default, equal to
the plain sum of SPEC §4), ``mean``, ``max``, ``prod`` or ``first`` (root matrix only: q for
attention, gate for MLP). For channels, the combination is per channel. Biases are pruned with
their rows but, like the published importance, do not enter the score. ``vectorize`` takes
|Σ W⊙G| per channel instead of Σ|W⊙G| (LLM-Pruner's vector-wise variant).

How an attention unit's channels are combined (``head_score``, :data:`HEAD_SCORES`):

* ``unit`` (default): each matrix's part is first summed over the unit's channels, then the
  per-matrix unit scores are combined with ``reduction`` (q, k, v, o for ``kv-group``; q, o for
  ``query-heads``).
* ``llm-pruner``: LLM-Pruner's TaylorImportance + MetaPruner order, with the GQA mapping of HF's
  ``repeat_kv``. The q rows and o columns are first aligned onto the KV head's channels: KV
  channel k·d + i collects channel i of every query head h with h // n_rep = k; the per-matrix
  channel vectors [k, v, q, o] (root k first, as LLM-Pruner roots a GQA group at k_proj) are
  combined per channel with ``reduction``; the unit's d channels are then summed (MetaPruner's
  consecutive groups). ``query-heads``: [q, o] per channel, then summed over the head's d channels.
* ``llm-pruner-upstream``: the same, but aligned as upstream LLM-Pruner does
  (``imp.view(n_rep, H_kv·d).sum(0)``), which gives KV head k the query heads k, k+H_kv,
  k+2·H_kv…: not the heads ``repeat_kv`` feeds from it. Kept to reproduce upstream's choices.
  Without k/v in the unit (``query-heads``) there is nothing to align and it equals ``llm-pruner``.

With ``sum`` (and ``mean``) ``unit`` and ``llm-pruner`` give the same scores: summing over
channels and over matrices commute. ``max``, ``prod`` and ``first`` differ (per unit vs per
channel, and ``first`` is q for ``unit``, k for ``llm-pruner`` on a KV group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import moreau_kernels as mk

from ..model.structure import GRANULARITIES, LayerStructure, ModelStructure
from .methods import UNIT_SCORERS

REDUCTIONS = ("sum", "mean", "max", "prod", "first")
HEAD_SCORES = ("unit", "llm-pruner", "llm-pruner-upstream")


@dataclass
class LayerScores:
    layer: int
    attention: torch.Tensor | None  # [H_kv] (kv-group) or [H] (query-heads), fp32; None: not scored
    mlp: torch.Tensor | None  # [intermediate_size], fp32; None: not scored


def reduce_parts(parts: list[torch.Tensor], reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "first":
        return parts[0]
    stacked = torch.stack(parts)
    if reduction == "sum":
        return stacked.sum(0)
    if reduction == "mean":
        return stacked.mean(0)
    if reduction == "max":
        return stacked.max(0).values
    return stacked.prod(0)


def weight_gradient(w: torch.Tensor, grads: dict[str, torch.Tensor] | None, names: dict[int, str]):
    """The gradient estimate of weight ``w`` in ``grads`` (None when scoring by magnitude)."""
    if grads is None:
        return None
    name = names[id(w)]
    if name not in grads:
        raise KeyError(f"no gradient estimate for {name}; was it scored by the estimator?")
    return grads[name]


def _saliency(lin, grads, names, vectorize) -> tuple[torch.Tensor, torch.Tensor]:
    w = lin.weight
    rows, cols = mk.channel_saliency(w.detach(), weight_gradient(w, grads, names), vectorize)
    return rows, cols


def check_head_score(head_score: str) -> str:
    if head_score not in HEAD_SCORES:
        raise ValueError(f"head_score must be one of {HEAD_SCORES}, got {head_score!r}")
    return head_score


def align_query_channels(x: torch.Tensor, n_kv_heads: int, head_dim: int, upstream: bool = False) -> torch.Tensor:
    """Per-channel scores of the q/o width [H·d] folded onto the KV width [H_kv·d].

    KV channel k·d + i sums channel i of the query heads that KV head k serves: h // n_rep = k
    (``repeat_kv``), or h % H_kv = k with ``upstream`` (upstream LLM-Pruner's fold)."""
    n_rep = x.numel() // (n_kv_heads * head_dim)
    if upstream:
        return x.view(n_rep, n_kv_heads * head_dim).sum(0)
    return x.view(n_kv_heads, n_rep, head_dim).sum(1).reshape(-1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, n_heads: int,
                     n_kv_heads: int, head_dim: int, reduction: str = "sum", granularity: str = "kv-group",
                     head_score: str = "unit") -> torch.Tensor:
    """Attention unit scores from the per-channel parts: q, k, v row sums, o column sums.

    [H_kv] for ``kv-group``, [H] for ``query-heads``; ``head_score``: see the module docstring."""
    check_head_score(head_score)
    d, h, hkv = head_dim, n_heads, n_kv_heads
    if head_score == "unit":
        if granularity == "kv-group":
            parts = [q.view(hkv, -1).sum(1), k.view(hkv, d).sum(1), v.view(hkv, d).sum(1), o.view(hkv, -1).sum(1)]
        else:
            parts = [q.view(h, d).sum(1), o.view(h, d).sum(1)]
        return reduce_parts(parts, reduction)
    if granularity == "kv-group":
        upstream = head_score == "llm-pruner-upstream"
        parts = [k, v, align_query_channels(q, hkv, d, upstream), align_query_channels(o, hkv, d, upstream)]
        return reduce_parts(parts, reduction).view(hkv, d).sum(1)
    return reduce_parts([q, o], reduction).view(h, d).sum(1)


def layer_scores(ls: LayerStructure, grads: dict[str, torch.Tensor] | None, names: dict[int, str],
                 reduction: str = "sum", vectorize: bool = False, granularity: str = "kv-group",
                 saliency=None, head_score: str = "unit") -> LayerScores:
    """Scores of one layer's attention units and MLP channels; ``grads=None`` is the magnitude baseline.

    ``saliency(lin, grads, names, vectorize) -> (row sums, column sums)`` replaces the one-process
    computation (the sharded path of :mod:`.distributed` passes its own, with cross-rank sums).
    ``head_score``: how an attention unit's channels are combined (module docstring).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    check_head_score(head_score)
    sal = saliency or _saliency
    q = sal(ls.q, grads, names, vectorize)[0]
    k = sal(ls.k, grads, names, vectorize)[0]
    v = sal(ls.v, grads, names, vectorize)[0]
    o = sal(ls.o, grads, names, vectorize)[1]
    attention = attention_scores(q, k, v, o, ls.n_heads, ls.n_kv_heads, ls.head_dim, reduction, granularity,
                                 head_score)
    gate = sal(ls.gate, grads, names, vectorize)[0]
    up = sal(ls.up, grads, names, vectorize)[0]
    down = sal(ls.down, grads, names, vectorize)[1]
    mlp = reduce_parts([gate, up, down], reduction)
    return LayerScores(ls.index, attention, mlp)


def model_scores(structure: ModelStructure, method: str, grads: dict[str, torch.Tensor] | None = None,
                 reduction: str = "sum", vectorize: bool = False, granularity: str = "kv-group",
                 seed: int = 0, layers: set[int] | None = None, saliency=None,
                 head_score: str = "unit") -> list[LayerScores]:
    """Scores for every layer in ``layers`` (None: all; the others get ``None`` scores).

    ``grads`` is Ĝ for ``moreau``, the gradient for ``taylor``; ``saliency`` and ``head_score``: see
    :func:`layer_scores`."""
    if method not in UNIT_SCORERS:
        raise ValueError(f"method must be one of {UNIT_SCORERS}, got {method!r}")
    check_head_score(head_score)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        out = []
        for ls in structure.layers:
            if layers is not None and ls.index not in layers:
                out.append(LayerScores(ls.index, None, None))
                continue
            n_att = ls.n_kv_heads if granularity == "kv-group" else ls.n_heads
            out.append(LayerScores(ls.index, torch.rand(n_att, generator=gen), torch.rand(ls.intermediate_size,
                                                                                        generator=gen)))
        return out
    if method in ("moreau", "taylor") and grads is None:
        raise ValueError(f"method {method!r} needs gradient estimates")
    names = {id(p): n for n, p in structure.model.named_parameters()}
    use = None if method == "magnitude" else grads
    return [layer_scores(ls, use, names, reduction, vectorize, granularity, saliency, head_score)
            if layers is None or ls.index in layers else LayerScores(ls.index, None, None)
            for ls in structure.layers]
