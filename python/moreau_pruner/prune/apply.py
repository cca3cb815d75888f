"""Applying a plan: index-select the kept rows and columns of q/k/v/o and gate/up/down (SPEC §5),
update each attention's head bookkeeping, and report what changed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..model.structure import ModelStructure
from ..score.importance import LayerScores
from .plan import Counts, LayerPlan, check_scores, count_parameters, plan_units, uniform_cost
from .config import PruneConfig
from .target import PruneTarget, as_target, check_uniform_structure


@dataclass
class PruneReport:
    params_before: int
    params_after: int
    ratio: float
    scope: str
    granularity: str
    attn_layers: list[int]
    mlp_layers: list[int]
    layers: list[dict] = field(default_factory=list)
    rounds: int = 1  # iterative pruning: scoring rounds that led to this model
    uniform: dict | None = None  # uniform pruning: what it costs against the per-layer plan (uniform_cost)
    compensation: dict | None = None  # weight compensation before the units went (compensate.compensate_model)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kept_fraction"] = self.kept_fraction
        return d


@dataclass
class PruneResult:
    """What :func:`moreau_pruner.pipeline.prune_model` returns."""

    report: PruneReport
    scores: list[LayerScores]
    method: str
    estimate: object | None = None  # the MoreauResult of the (last) Moreau estimate
    timings: dict = field(default_factory=dict)
    allocation: dict | None = None
    rounds: int = 1
    policy: dict | None = None  # the policy-gradient pruner's search (see :mod:`.policy`)


def _select(lin: nn.Linear, idx: torch.Tensor, axis: int) -> None:
    """Keep rows (axis 0) or input columns (axis 1) ``idx`` of a Linear, in place."""
    w = lin.weight
    lin.weight = nn.Parameter(w.data.index_select(axis, idx.to(w.device)).contiguous(), requires_grad=w.requires_grad)
    if axis == 0:
        lin.out_features = len(idx)
        if lin.bias is not None:
            b = lin.bias
            lin.bias = nn.Parameter(b.data.index_select(0, idx.to(b.device)).contiguous(), requires_grad=b.requires_grad)
    else:
        lin.in_features = len(idx)


def _rows(units: list[int], width: int) -> torch.Tensor:
    """Row indices of whole units of ``width`` consecutive rows."""
    return torch.tensor([u * width + i for u in units for i in range(width)], dtype=torch.long)


def apply_plan(structure: ModelStructure, plans: list[LayerPlan]) -> None:
    """Index-select the kept rows/columns and update each attention's head bookkeeping."""
    for ls, plan in zip(structure.layers, plans):
        d = ls.head_dim
        attn = ls.attn
        if plan.kv_keep is not None and len(plan.kv_keep) < ls.n_kv_heads:
            n_rep = ls.n_rep
            _select(ls.q, _rows(plan.kv_keep, n_rep * d), 0)
            _select(ls.o, _rows(plan.kv_keep, n_rep * d), 1)
            _select(ls.k, _rows(plan.kv_keep, d), 0)
            _select(ls.v, _rows(plan.kv_keep, d), 0)
        elif plan.q_keep is not None and len(plan.q_keep[0]) < ls.n_rep:
            n_rep = ls.n_rep
            heads = [g * n_rep + j for g, keep in enumerate(plan.q_keep) for j in keep]
            _select(ls.q, _rows(heads, d), 0)
            _select(ls.o, _rows(heads, d), 1)
            attn.num_key_value_groups = len(plan.q_keep[0])
        if plan.mlp_keep is not None and len(plan.mlp_keep) < ls.intermediate_size:
            idx = torch.tensor(plan.mlp_keep, dtype=torch.long)
            _select(ls.gate, idx, 0)
            _select(ls.up, idx, 0)
            _select(ls.down, idx, 1)
        # attributes older transformers versions read in forward
        for attr, value in (("num_heads", ls.n_heads), ("num_key_value_heads", ls.n_kv_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(ls.mlp, "intermediate_size"):
            ls.mlp.intermediate_size = ls.intermediate_size


def set_stock_config(structure: ModelStructure) -> None:
    """After uniform pruning the in-memory config describes the model (so save_pretrained is right too)."""
    ls = structure.layers[0]
    config = structure.model.config
    config.num_attention_heads = ls.n_heads
    config.num_key_value_heads = ls.n_kv_heads
    config.intermediate_size = ls.intermediate_size
    config.head_dim = ls.head_dim


def prune_structure(target: PruneTarget | ModelStructure, scores: list[LayerScores], cfg: PruneConfig | None = None,
                    counts: Counts | None = None, compensate=None) -> PruneReport:
    """Plan and apply the pruning of ``target`` (a :class:`~.target.PruneTarget`, or a structure with
    its PruneConfig ``cfg``); returns the report (parameters before/after, widths).

    ``counts`` (local scope only) overrides how many units each layer loses (see
    :func:`~moreau_pruner.prune.plan.local_unit_counts`); iterative pruning uses it to spread one final
    size over rounds. ``compensate(structure, plans) -> dict`` runs once the units are chosen, before
    they are removed (weight compensation, :func:`.compensate.compensator`); its report is
    ``PruneReport.compensation``."""
    target = as_target(target, cfg)
    structure, cfg = target.structure, target.config
    check_scores(target, scores)
    cost = uniform_cost(target, scores) if cfg.uniform else None
    before = count_parameters(structure.model)
    plans = plan_units(target, scores, counts)
    old = structure.widths()
    compensation = compensate(structure, plans) if compensate is not None else None
    apply_plan(structure, plans)
    new = structure.widths()
    if cfg.uniform:
        check_uniform_structure(structure)  # the local rule at one ratio gives every layer the same counts
        set_stock_config(structure)
    layers = []
    for o, n, plan in zip(old, new, plans):
        layers.append({**n, "ratio": cfg.ratio_of(n["layer"]),
                       "removed_heads": o["num_attention_heads"] - n["num_attention_heads"],
                       "removed_kv_heads": o["num_key_value_heads"] - n["num_key_value_heads"],
                       "removed_channels": o["intermediate_size"] - n["intermediate_size"],
                       "kept_kv_groups": plan.kv_keep, "kept_query_heads": plan.q_keep,
                       "kept_channels": plan.mlp_keep})
    return PruneReport(before, count_parameters(structure.model), cfg.ratio, cfg.scope, cfg.granularity,
                       list(target.attn_range), list(target.mlp_range), layers, uniform=cost,
                       compensation=compensation)
