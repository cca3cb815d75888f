"""One call from a model and a calibration batch to a pruned model: importance, then pruning.

This is the library entry point larger compressors use::

    from moreau_pruner import prune_model, PruneConfig, MoreauConfig
    result = prune_model(model, batch, method="moreau", prune=PruneConfig(ratio=0.2))
    result.report.params_after
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..estimate.estimator import MoreauConfig, MoreauResult
from ..score.importance import METHODS, LayerScores, check_head_score, model_scores, scored_parameter_names
from .compensate import CompensateConfig, compensator, merge_reports
from .plan import (PruneConfig, PruneReport, check_uniform_structure, count_parameters, local_unit_counts,
                    prunable_weights, prune_structure)
from ..model.structure import ModelStructure, discover


@dataclass
class PruneResult:
    report: PruneReport
    scores: list[LayerScores]
    method: str
    estimate: MoreauResult | None = None
    timings: dict = field(default_factory=dict)
    allocation: dict | None = None
    rounds: int = 1
    policy: dict | None = None  # the policy-gradient pruner's search (see :mod:`.policy`)


def compute_scores(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau",
                   prune: PruneConfig | None = None, moreau: MoreauConfig | None = None,
                   reduction: str = "sum", vectorize: bool = False, seed: int = 0,
                   micro_batch_size: int | None = None, progress: bool = True,
                   structure: ModelStructure | None = None, taylor_variant: str = "param_first",
                   estimator_path: str = "auto", gradient_checkpointing: bool = False,
                   check_memory: bool = False, head_score: str = "unit"):
    """Unit scores of the layers to prune; returns (scores, MoreauResult or None, timings).

    ``taylor_variant`` (method ``taylor``): LLM-Pruner's ``param_first`` (default), ``param_second``,
    ``param_mix`` or ``vectorize`` (see :mod:`.taylor`). ``estimator_path`` (method ``moreau``):
    ``auto`` (the lean path when it applies), ``lean`` or ``reference`` (see :mod:`.lean`).
    ``head_score``: how attention units combine their channels (:data:`.importance.HEAD_SCORES`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_head_score(head_score)
    structure = structure or discover(model)
    prune = prune or PruneConfig()
    attn_range, mlp_range = prune.validate(structure.num_layers)
    layers = set(attn_range) | set(mlp_range)
    names = scored_parameter_names(structure, layers)
    grads, est, timings = None, None, {}
    if method in ("moreau", "taylor") and batch is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    if method == "taylor":  # every Taylor variant, the plain first order included, is one function
        from ..score.taylor import taylor_scores

        variant = "vectorize" if vectorize and taylor_variant == "param_first" else taylor_variant
        scores, info = taylor_scores(model, batch, variant, prune, reduction, micro_batch_size, structure, head_score)
        timings.update({k: v for k, v in info.items() if k.endswith("_s")})
        return scores, None, timings
    if method == "moreau":
        from ..estimate.lean import estimate

        t0 = time.perf_counter()
        cfg = moreau or MoreauConfig(seed=seed)
        if micro_batch_size and cfg.micro_batch_size is None:
            cfg = replace(cfg, micro_batch_size=micro_batch_size)
        est = estimate(model, batch, cfg, estimator_path, score=names, progress=progress, structure=structure,
                       gradient_checkpointing=gradient_checkpointing, check_memory=check_memory)
        grads = est.grads
        timings["importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model_scores(structure, method, grads, reduction, vectorize, prune.granularity, seed, layers,
                          head_score=head_score)
    timings["scoring_s"] = time.perf_counter() - t0
    return scores, est, timings


def prune_model(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau",
                prune: PruneConfig | None = None, moreau: MoreauConfig | None = None,
                reduction: str = "sum", vectorize: bool = False, seed: int = 0,
                micro_batch_size: int | None = None, progress: bool = True, allocation: str = "uniform",
                rounds: int = 1, compensate: CompensateConfig | None = None, **score_options) -> PruneResult:
    """Score the model's units with ``method`` on ``batch`` and prune it in place.

    ``allocation``: ``uniform`` (every pruned layer at ``prune.ratio``) or a per-layer allocator of
    :mod:`.allocation` (``owl``, ``alpha``, ``farms``), fitted so the parameters removed match uniform
    ``prune.ratio``'s (heads go in whole steps; see :func:`.allocation.structured_removal`).
    ``rounds`` K > 1 prunes iteratively: the final size is that of one-shot pruning, reached in K
    rounds that each re-score the partly pruned model and remove about 1/K of the units (local
    scope: of each layer's units to remove; global scope: of the weights to remove). The report
    covers all rounds (kept indices refer to the original model); ``scores`` and ``estimate`` are
    those of the last round, ``timings`` their sums.
    ``score_options`` go to :func:`compute_scores` (taylor_variant, estimator_path, ...).
    ``prune.uniform``: the same widths in every layer, a stock-config model (:mod:`.export` saves it);
    refused, before any work, with a per-layer allocation or a model whose layers differ in width.
    ``compensate``: once each round's units are chosen, update the weights that stay so every pruned
    layer reproduces its dense output on the calibration activations (:mod:`.compensate`; its report
    is ``report.compensation``), before the next round scores.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    comp = compensator(discover(model), compensate, batch, progress) if compensate is not None else None
    if method == "policy-gradient":
        return _policy_gradient(model, batch, prune, moreau, allocation, rounds, micro_batch_size, progress,
                                seed, {**score_options, "compensate": comp})
    structure = discover(model)
    prune = prune or PruneConfig()
    attn_range, mlp_range = prune.validate(structure.num_layers)
    if prune.uniform:
        if allocation != "uniform":
            raise ValueError(f"uniform pruning keeps every layer at the same width; allocation {allocation!r} "
                             "gives layers different ratios (use allocation='uniform')")
        check_uniform_structure(structure)
    alloc = None
    timings: dict[str, float] = {}
    if allocation != "uniform":
        from .allocation import allocate_structured

        t0 = time.perf_counter()
        alloc = allocate_structured(model, prune, allocation, batch, structure, micro_batch_size)
        prune = replace(prune, layer_ratios=alloc.ratios)
        prune.validate(structure.num_layers)
        timings["allocation_s"] = time.perf_counter() - t0
    final = local_unit_counts(structure, prune, attn_range, mlp_range) if prune.scope == "local" else None
    total0 = prunable_weights(structure, prune.granularity, attn_range, mlp_range)
    before = count_parameters(model)
    reports: list[PruneReport] = []
    scores, est = [], None
    for k in range(1, rounds + 1):
        if k > 1:
            structure = discover(model)
        counts, cfg = None, prune
        if final is not None:  # this round's share of each layer's final removal
            done = {i: _removed_units(reports, i, prune.granularity) for i in final}
            counts = {i: tuple(None if n is None else _share(n, k, rounds) - d
                               for n, d in zip(final[i], done[i])) for i in final}
        else:  # global: r of the original prunable weights, 1/K of it per round
            now = prunable_weights(structure, prune.granularity, attn_range, mlp_range)
            ratio = (prune.ratio * total0 * k / rounds - (total0 - now)) / now
            if ratio <= 0:
                continue
            cfg = replace(prune, ratio=min(ratio, 1 - 1e-9))
        scores, est, more = compute_scores(model, batch, method, cfg, moreau, reduction, vectorize, seed,
                                           micro_batch_size, progress, structure, **score_options)
        for key, v in more.items():
            timings[key] = timings.get(key, 0.0) + v
        t0 = time.perf_counter()
        reports.append(prune_structure(structure, scores, cfg, counts, compensate=comp))
        timings["prune_s"] = timings.get("prune_s", 0.0) + time.perf_counter() - t0
    report = _combine_reports(reports, prune, before, count_parameters(model), rounds)
    if report.compensation is not None:
        timings["compensate_s"] = report.compensation["seconds"]
    return PruneResult(report, scores, method, est, timings, alloc.as_dict() if alloc else None, rounds)


def _policy_gradient(model, batch, prune, moreau, allocation, rounds, micro_batch_size, progress, seed,
                     options) -> PruneResult:
    """``method='policy-gradient'``: :func:`.policy.policy_prune` (``options``: ``policy`` a PolicyConfig,
    ``target_params``, and the scoring options of its metric initialisation)."""
    from .policy import PolicyConfig, policy_prune

    if allocation != "uniform":
        raise ValueError(f"the policy-gradient pruner allocates the budget across layers itself; allocation "
                         f"{allocation!r} does not apply")
    if rounds != 1:
        raise ValueError("the policy-gradient pruner searches the whole mask at once; rounds > 1 do not apply")
    policy = options.pop("policy", None) or PolicyConfig(seed=seed)
    target = options.pop("target_params", None)
    res = policy_prune(model, batch, prune, policy, moreau, target, progress, micro_batch_size, **options)
    if res.report.compensation is not None:
        res.timings["compensate_s"] = res.report.compensation["seconds"]
    return res


def _share(n: int, k: int, rounds: int) -> int:
    """Units removed after round k of ``rounds`` when n go in all: the nearest integer to n·k/K."""
    return (2 * n * k + rounds) // (2 * rounds)


def _removed_units(reports: list[PruneReport], layer: int, granularity: str) -> tuple[int, int]:
    """(attention units, MLP channels) the earlier rounds removed from ``layer``."""
    attn = mlp = 0
    for rep in reports:
        entry = rep.layers[layer]
        per_group = entry["removed_heads"] // max(entry["num_key_value_heads"], 1)
        attn += entry["removed_kv_heads"] if granularity == "kv-group" else per_group
        mlp += entry["removed_channels"]
    return attn, mlp


def _compose(outer: list | None, inner: list | None) -> list | None:
    """Indices kept by two successive selections, as indices of the first one's input."""
    if outer is None or inner is None:
        return inner if outer is None else outer
    return [outer[i] for i in inner]


def _combine_reports(reports: list[PruneReport], cfg: PruneConfig, before: int, after: int,
                     rounds: int) -> PruneReport:
    """One report for all rounds: widths of the last, removals and kept indices against the first."""
    first = reports[0]
    layers = []
    for entries in zip(*(r.layers for r in reports)):
        a, z = entries[0], entries[-1]
        kv, q, mlp = a["kept_kv_groups"], a["kept_query_heads"], a["kept_channels"]
        for e in entries[1:]:
            kv = _compose(kv, e["kept_kv_groups"])
            mlp = _compose(mlp, e["kept_channels"])
            if q is not None and e["kept_query_heads"] is not None:
                q = [_compose(g, h) for g, h in zip(q, e["kept_query_heads"])]
            elif q is None:
                q = e["kept_query_heads"]
        heads0 = a["num_attention_heads"] + a["removed_heads"]
        kv0 = a["num_key_value_heads"] + a["removed_kv_heads"]
        inter0 = a["intermediate_size"] + a["removed_channels"]
        layers.append({**z, "ratio": cfg.ratio_of(z["layer"]), "removed_heads": heads0 - z["num_attention_heads"],
                       "removed_kv_heads": kv0 - z["num_key_value_heads"],
                       "removed_channels": inter0 - z["intermediate_size"],
                       "kept_kv_groups": kv, "kept_query_heads": q, "kept_channels": mlp})
    return PruneReport(before, after, cfg.ratio, cfg.scope, cfg.granularity, first.attn_layers, first.mlp_layers,
                       layers, rounds=rounds, uniform=first.uniform,
                       compensation=merge_reports([r.compensation for r in reports]))
