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

from .estimator import MoreauConfig, MoreauResult
from .importance import METHODS, LayerScores, model_scores, scored_parameter_names
from .prune import PruneConfig, PruneReport, prune_structure
from .structure import ModelStructure, discover


@dataclass
class PruneResult:
    report: PruneReport
    scores: list[LayerScores]
    method: str
    estimate: MoreauResult | None = None
    timings: dict = field(default_factory=dict)
    allocation: dict | None = None


def compute_scores(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau",
                   prune: PruneConfig | None = None, moreau: MoreauConfig | None = None,
                   reduction: str = "sum", vectorize: bool = False, seed: int = 0,
                   micro_batch_size: int | None = None, progress: bool = True,
                   structure: ModelStructure | None = None, taylor_variant: str = "param_first",
                   estimator_path: str = "auto", gradient_checkpointing: bool = False,
                   check_memory: bool = False):
    """Unit scores of the layers to prune; returns (scores, MoreauResult or None, timings).

    ``taylor_variant`` (method ``taylor``): LLM-Pruner's ``param_first`` (default), ``param_second``,
    ``param_mix`` or ``vectorize`` (see :mod:`.taylor`). ``estimator_path`` (method ``moreau``):
    ``auto`` (the lean path when it applies), ``lean`` or ``reference`` (see :mod:`.lean`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    structure = structure or discover(model)
    prune = prune or PruneConfig()
    attn_range, mlp_range = prune.validate(structure.num_layers)
    layers = set(attn_range) | set(mlp_range)
    names = scored_parameter_names(structure, layers)
    grads, est, timings = None, None, {}
    if method in ("moreau", "taylor") and batch is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    if method == "taylor":  # every Taylor variant, the plain first order included, is one function
        from .taylor import taylor_scores

        variant = "vectorize" if vectorize and taylor_variant == "param_first" else taylor_variant
        scores, info = taylor_scores(model, batch, variant, prune, reduction, micro_batch_size, structure)
        timings.update({k: v for k, v in info.items() if k.endswith("_s")})
        return scores, None, timings
    if method == "moreau":
        from .lean import estimate

        t0 = time.perf_counter()
        cfg = moreau or MoreauConfig(seed=seed)
        if micro_batch_size and cfg.micro_batch_size is None:
            cfg = replace(cfg, micro_batch_size=micro_batch_size)
        est = estimate(model, batch, cfg, estimator_path, score=names, progress=progress, structure=structure,
                       gradient_checkpointing=gradient_checkpointing, check_memory=check_memory)
        grads = est.grads
        timings["importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model_scores(structure, method, grads, reduction, vectorize, prune.granularity, seed, layers)
    timings["scoring_s"] = time.perf_counter() - t0
    return scores, est, timings


def prune_model(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau",
                prune: PruneConfig | None = None, moreau: MoreauConfig | None = None,
                reduction: str = "sum", vectorize: bool = False, seed: int = 0,
                micro_batch_size: int | None = None, progress: bool = True, allocation: str = "uniform",
                **score_options) -> PruneResult:
    """Score the model's units with ``method`` on ``batch`` and prune it in place.

    ``allocation``: ``uniform`` (every pruned layer at ``prune.ratio``) or a per-layer allocator of
    :mod:`.allocation` (``owl``, ``alpha``, ``farms``), fitted so the parameters removed match uniform
    ``prune.ratio``'s (heads go in whole steps; see :func:`.allocation.structured_removal`).
    ``score_options`` go to :func:`compute_scores` (taylor_variant, estimator_path, ...).
    """
    structure = discover(model)
    prune = prune or PruneConfig()
    prune.validate(structure.num_layers)
    alloc = None
    timings = {}
    if allocation != "uniform":
        from .allocation import allocate_structured

        t0 = time.perf_counter()
        alloc = allocate_structured(model, prune, allocation, batch, structure, micro_batch_size)
        prune = replace(prune, layer_ratios=alloc.ratios)
        prune.validate(structure.num_layers)
        timings["allocation_s"] = time.perf_counter() - t0
    scores, est, more = compute_scores(model, batch, method, prune, moreau, reduction, vectorize, seed,
                                       micro_batch_size, progress, structure, **score_options)
    timings.update(more)
    t0 = time.perf_counter()
    report = prune_structure(structure, scores, prune)
    timings["prune_s"] = time.perf_counter() - t0
    return PruneResult(report, scores, method, est, timings, alloc.as_dict() if alloc else None)
