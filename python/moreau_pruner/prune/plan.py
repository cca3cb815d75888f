"""Structural pruning of LLaMA-family models from unit scores (SPEC §5).

``local`` (default, published): in each pruned layer remove n = C - int(C·(1-r)) of the C MLP
channels; for attention compute n the same way over the q/o width C = H·d and remove
floor(n / (n_rep·d)) KV groups (``kv-group``) or floor(n / (H_kv·d)) query heads from every KV
group (``query-heads``). Lowest scores go; a layer always keeps at least one unit of each kind.

``global``: one threshold across all pruned layers. Units differ in size (a KV group of
LLaMA-7B holds 4·128·4096 weights, an MLP channel 3·4096), so scores are divided by the number
of weights in the unit before ranking (score per weight); units are removed in that order until
r of the weights of all prunable units in the layer ranges are gone.

``uniform``: every layer keeps the same number of KV groups / query heads per group and MLP
channels, so the result is a stock LlamaConfig / MistralConfig / Qwen2Config model (see
:mod:`moreau_pruner.io.stock`). Each layer still keeps its own highest-scoring units; only the counts are shared.
It applies the local rule to *all* layers: a layer range that leaves some layers at full width is
refused (the model would not be uniform), as are global scope and per-layer ratios (they vary the
count by design), and a model whose layers already differ in width.

``round_to`` m keeps MLP widths at multiples of m (the kept count is rounded to the nearest
multiple, at least m), which keeps the pruned matmuls on fast tensor-core shapes; attention
widths are already whole heads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from ..score.importance import LayerScores
from ..model.structure import ModelStructure
from .config import PruneConfig
from .target import PruneTarget, as_target

Counts = dict[int, tuple[int | None, int | None]]


@dataclass
class LayerPlan:
    layer: int
    kv_keep: list[int] | None = None  # kept KV groups (kv-group granularity)
    q_keep: list[list[int]] | None = None  # kept query heads per KV group (query-heads granularity)
    mlp_keep: list[int] | None = None


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_remove(c: int, r: float) -> int:
    return c - int(c * (1 - r))


def _round_keep(keep: int, c: int, m: int | None) -> int:
    if not m:
        return keep
    return min(c, max(m, int(round(keep / m)) * m))


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the kept units after removing the n lowest (stable for ties), ascending."""
    order = torch.argsort(scores.float(), stable=True)
    return sorted(order[n:].tolist())


def attention_units_removed(n_heads: int, head_dim: int, n_kv_heads: int, ratio: float, granularity: str) -> int:
    """The local rule (module docstring): KV groups removed (``kv-group``) or query heads removed from
    every KV group (``query-heads``) at ``ratio``; at least one unit of each kind stays."""
    n = _n_remove(n_heads * head_dim, ratio)
    n_rep = n_heads // n_kv_heads
    if granularity == "kv-group":
        return min(n // (n_rep * head_dim), n_kv_heads - 1)
    return min(n // (n_kv_heads * head_dim), n_rep - 1)


def unit_params(ls, hidden: int) -> tuple[int, int, int]:
    """Parameters of one query head (q rows with bias, o columns), of one KV head's k and v rows (with
    biases) and of one MLP channel (gate/up rows with biases, down column) in layer ``ls``."""
    d = ls.head_dim
    head = 2 * d * hidden + (d if ls.q.bias is not None else 0)
    kv = 2 * d * hidden + sum(d for lin in (ls.k, ls.v) if lin.bias is not None)
    channel = 3 * hidden + sum(1 for lin in (ls.gate, ls.up) if lin.bias is not None)
    return head, kv, channel


def mlp_channels_removed(channels: int, ratio: float, round_to: int | None) -> int:
    """MLP channels the local rule removes at ``ratio`` (``round_to`` applied; one channel always stays)."""
    keep = _round_keep(channels - _n_remove(channels, ratio), channels, round_to)
    return channels - max(keep, 1)


def local_unit_counts(target: PruneTarget) -> Counts:
    """Per layer, (attention units, MLP channels) the local rule removes; None where the layer is
    outside the range. Attention units are KV groups (``kv-group``) or query heads taken from every
    KV group (``query-heads``)."""
    cfg, counts = target.config, {}
    for ls in target.structure.layers:
        ratio = cfg.ratio_of(ls.index)
        attn = (attention_units_removed(ls.n_heads, ls.head_dim, ls.n_kv_heads, ratio, cfg.granularity)
                if ls.index in target.attn_range else None)
        mlp = (mlp_channels_removed(ls.intermediate_size, ratio, cfg.round_to)
               if ls.index in target.mlp_range else None)
        counts[ls.index] = (attn, mlp)
    return counts


def plan_local(target: PruneTarget, scores: list[LayerScores], counts: Counts | None = None) -> list[LayerPlan]:
    """Remove the lowest-scoring units of each layer: ``counts`` of them (see :func:`local_unit_counts`,
    its default), so iterative pruning can give each round its share of the final removal."""
    structure, cfg = target.structure, target.config
    counts = local_unit_counts(target) if counts is None else counts
    plans = []
    for ls, sc in zip(structure.layers, scores):
        plan = LayerPlan(ls.index)
        attn, mlp = counts.get(ls.index, (None, None))
        if attn is not None:
            if cfg.granularity == "kv-group":
                plan.kv_keep = _lowest(sc.attention, min(attn, ls.n_kv_heads - 1))
            else:
                heads = sc.attention.view(ls.n_kv_heads, ls.n_rep)
                plan.q_keep = [_lowest(heads[g], min(attn, ls.n_rep - 1)) for g in range(ls.n_kv_heads)]
        if mlp is not None:
            plan.mlp_keep = _lowest(sc.mlp, min(mlp, ls.intermediate_size - 1))
        plans.append(plan)
    return plans


def prunable_weights(structure: ModelStructure, granularity: str, attn_range: range, mlp_range: range) -> int:
    """Weights of the prunable units in the layer ranges, as the global rule counts them (q/o
    columns of every query head, k/v rows too with ``kv-group``, gate/up/down of every channel)."""
    hidden, total = structure.hidden_size, 0
    for ls in structure.layers:
        if ls.index in attn_range:
            kv = 2 * ls.head_dim * hidden * ls.n_kv_heads if granularity == "kv-group" else 0
            total += 2 * ls.head_dim * hidden * ls.n_heads + kv
        if ls.index in mlp_range:
            total += 3 * hidden * ls.intermediate_size
    return total


def plan_global(target: PruneTarget, scores: list[LayerScores]) -> list[LayerPlan]:
    """Greedy removal by score per weight across layers (see the module docstring)."""
    structure, cfg, attn_range, mlp_range = target.structure, target.config, target.attn_range, target.mlp_range
    hidden = structure.hidden_size
    cands = []  # (score per weight, size, layer, kind, unit)
    for ls, sc in zip(structure.layers, scores):
        d = ls.head_dim
        if ls.index in attn_range:
            head_size = 2 * d * hidden  # q rows + o columns of one query head
            if cfg.granularity == "kv-group":
                size = ls.n_rep * head_size + 2 * d * hidden  # + k, v rows
                for u in range(ls.n_kv_heads):
                    cands.append((float(sc.attention[u]) / size, size, ls.index, "kv", u))
            else:  # rank j = the j-th lowest head of every KV group, removed together
                size = ls.n_kv_heads * head_size
                ranked = sc.attention.view(ls.n_kv_heads, ls.n_rep).sort(dim=1).values
                for j in range(ls.n_rep):
                    cands.append((float(ranked[:, j].sum()) / size, size, ls.index, "qrank", j))
        if ls.index in mlp_range:
            size = 3 * hidden
            for c, v in enumerate(sc.mlp.tolist()):  # the same Python floats as float(sc.mlp[c]), faster
                cands.append((v / size, size, ls.index, "mlp", c))
    goal = cfg.ratio * prunable_weights(structure, cfg.granularity, attn_range, mlp_range)
    removed = {ls.index: {"kv": set(), "qrank": set(), "mlp": set()} for ls in structure.layers}
    limits = {ls.index: {"kv": ls.n_kv_heads - 1, "qrank": ls.n_rep - 1, "mlp": ls.intermediate_size - 1}
              for ls in structure.layers}
    done = 0
    for score, size, layer, kind, unit in sorted(cands, key=lambda c: c[0]):
        if done >= goal:
            break
        if len(removed[layer][kind]) >= limits[layer][kind]:
            continue
        removed[layer][kind].add(unit)
        done += size
    plans = []
    for ls, sc in zip(structure.layers, scores):
        plan = LayerPlan(ls.index)
        rem = removed[ls.index]
        if ls.index in attn_range:
            if cfg.granularity == "kv-group":
                plan.kv_keep = [u for u in range(ls.n_kv_heads) if u not in rem["kv"]]
            else:
                heads = sc.attention.view(ls.n_kv_heads, ls.n_rep)
                plan.q_keep = [_lowest(heads[g], len(rem["qrank"])) for g in range(ls.n_kv_heads)]
        if ls.index in mlp_range:
            c = ls.intermediate_size
            keep = _round_keep(c - len(rem["mlp"]), c, cfg.round_to)
            plan.mlp_keep = _lowest(sc.mlp, c - max(keep, 1))
        plans.append(plan)
    return plans


def plan_units(target: PruneTarget, scores: list[LayerScores], counts=None) -> list[LayerPlan]:
    """The plans :func:`moreau_pruner.prune.apply.prune_structure` applies: the local rule (``counts``
    overriding how many units each layer loses) or the global one."""
    if target.config.scope != "local":
        if counts is not None:
            raise ValueError("explicit unit counts apply to local pruning (scope='local')")
        return plan_global(target, scores)
    return plan_local(target, scores, counts)


def check_scores(target: PruneTarget, scores: list[LayerScores]) -> None:
    """Scores fit the target: one entry per layer, the right number of finite scores where a layer is pruned."""
    structure, cfg = target.structure, target.config
    if len(scores) != structure.num_layers:
        raise ValueError(f"got scores for {len(scores)} layers, the model has {structure.num_layers}")
    for ls, sc in zip(structure.layers, scores):
        n_att = ls.n_kv_heads if cfg.granularity == "kv-group" else ls.n_heads
        for part, n, in_range, what in ((sc.attention, n_att, ls.index in target.attn_range, "attention"),
                                        (sc.mlp, ls.intermediate_size, ls.index in target.mlp_range, "MLP")):
            if not in_range:
                continue
            if part is None or part.numel() != n:
                raise ValueError(f"layer {ls.index}: {what} scores do not match the structure "
                                 f"(granularity {cfg.granularity!r} needs {n} {what} scores)")
            if not torch.isfinite(part).all():
                raise ValueError(f"layer {ls.index}: {what} importance scores contain NaN or inf")


def _removed_params(ls, plan: LayerPlan) -> int:
    """Parameters ``plan`` removes from layer ``ls`` (what apply_plan would take away)."""
    d = ls.head_dim

    def rows(lin, n):  # n output rows (and their bias entries)
        return n * (lin.in_features + (1 if lin.bias is not None else 0))

    def cols(lin, n):  # n input columns
        return n * lin.out_features

    removed = 0
    if plan.kv_keep is not None and len(plan.kv_keep) < ls.n_kv_heads:
        groups = ls.n_kv_heads - len(plan.kv_keep)
        q_heads = groups * ls.n_rep
        removed += rows(ls.q, q_heads * d) + cols(ls.o, q_heads * d) + rows(ls.k, groups * d) + rows(ls.v, groups * d)
    elif plan.q_keep is not None and len(plan.q_keep[0]) < ls.n_rep:
        q_heads = ls.n_kv_heads * (ls.n_rep - len(plan.q_keep[0]))
        removed += rows(ls.q, q_heads * d) + cols(ls.o, q_heads * d)
    if plan.mlp_keep is not None:
        ch = ls.intermediate_size - len(plan.mlp_keep)
        removed += rows(ls.gate, ch) + rows(ls.up, ch) + cols(ls.down, ch)
    return removed


def planned_params_after(target: PruneTarget, plans: list[LayerPlan]) -> int:
    """The model's parameter count after ``plans`` would be applied (nothing is changed)."""
    structure = target.structure
    return count_parameters(structure.model) - sum(_removed_params(ls, p) for ls, p in zip(structure.layers, plans))


def ratio_for_params(target: PruneTarget | ModelStructure, target_params: int, cfg: PruneConfig | None = None,
                     scores: list[LayerScores] | None = None) -> float:
    """The smallest ratio at which ``target``'s pruning (a :class:`~.target.PruneTarget`, or a structure
    with its PruneConfig ``cfg``) leaves at most ``target_params`` parameters.

    Used to compare layer ranges, scopes and granularities at equal size: the unit counts move in
    whole steps (one MLP channel in every pruned layer, one query head per KV group, ...), so the
    result is the first ratio whose pruning reaches the target, and the model it gives is smaller
    than the target by less than one such step. The ratio is rounded up to the shortest decimal
    that gives the same parameter count.

    Local scope needs no scores (the counts depend on the ratio only). Global scope ranks units by
    score, so ``scores`` (those ``prune_structure`` will get) are required: the solved ratio then
    holds for those scores only. The target's ratio is ignored; per-layer ratios are refused (they fix
    the ratio of every layer already). A target the ranges cannot reach (even removing all but one
    unit of each kind) or one at or above the model's size is a ValueError.
    """
    target = as_target(target, cfg)
    structure, cfg = target.structure, target.config
    if cfg.layer_ratios:
        raise ValueError("ratio_for_params solves one ratio; the config already has per-layer ratios")
    attn_range, mlp_range = target.attn_range, target.mlp_range
    if cfg.scope == "global" and scores is None:
        raise ValueError("with global scope the parameters removed depend on the scores: pass scores=")
    if scores is None:  # the local rule's counts do not look at the scores' values
        n_att = lambda ls: ls.n_kv_heads if cfg.granularity == "kv-group" else ls.n_heads
        scores = [LayerScores(ls.index, torch.zeros(n_att(ls)), torch.zeros(ls.intermediate_size))
                  for ls in structure.layers]
    before = count_parameters(structure.model)
    goal = int(target_params)
    if goal >= before:
        raise ValueError(f"target of {goal:,} parameters is not below the model's {before:,}")

    def after(r: float) -> int:
        t = target.with_config(replace(cfg, ratio=r))
        return planned_params_after(t, plan_local(t, scores) if cfg.scope == "local" else plan_global(t, scores))

    lo, hi = 0.0, 1.0 - 1e-9
    smallest = after(hi)
    if smallest > goal:
        raise ValueError(f"target of {goal:,} parameters is out of reach: pruning attention layers "
                         f"{attn_range.start}:{attn_range.stop} and MLP layers {mlp_range.start}:{mlp_range.stop} "
                         f"({cfg.scope}, {cfg.granularity}) leaves at least {smallest:,}")
    for _ in range(60):  # after() is non-increasing in r: keep after(lo) > goal >= after(hi)
        mid = (lo + hi) / 2
        if after(mid) <= goal:
            hi = mid
        else:
            lo = mid
    reached = after(hi)
    for digits in range(1, 16):
        r = math.ceil(hi * 10 ** digits) / 10 ** digits
        if r < 1 and after(r) == reached:
            return r
    return hi


def uniform_cost(target: PruneTarget, scores: list[LayerScores]) -> dict:
    """Parameters of the uniform plan against the per-layer plan at the same ratio.

    The per-layer plan is what the same settings give without ``uniform``: the local rule in the
    given layer ranges, or the published default range when none is given (layers outside it keep
    full width, which a stock config cannot express). ``params_difference`` = uniform - per-layer:
    positive when the uniform model is larger.
    """
    structure, cfg = target.structure, target.config
    per_layer = PruneConfig(**{**asdict(cfg), "uniform": False})
    a, m = per_layer.layer_ranges(structure.num_layers)
    after_pl = planned_params_after(target, plan_local(PruneTarget(structure, per_layer, a, m), scores))
    after_u = planned_params_after(target, plan_local(target, scores))
    return {"uniform_params_after": after_u, "per_layer_params_after": after_pl,
            "params_difference": after_u - after_pl,
            "per_layer_attn_layers": [a.start, a.stop], "per_layer_mlp_layers": [m.start, m.stop]}
