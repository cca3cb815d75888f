"""One call from a model and a calibration batch to a pruned model: importance, then pruning.

This is the library entry point larger compressors use::

    from moreau_pruner import prune_model, PruneConfig, MoreauConfig
    result = prune_model(model, batch, method="moreau", prune=PruneConfig(ratio=0.2))
    result.report.params_after
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .estimator import MoreauConfig, MoreauResult, gradient, moreau_estimate
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


def compute_scores(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau",
                   prune: PruneConfig | None = None, moreau: MoreauConfig | None = None,
                   reduction: str = "sum", vectorize: bool = False, seed: int = 0,
                   micro_batch_size: int | None = None, progress: bool = True,
                   structure: ModelStructure | None = None):
    """Unit scores of every layer; returns (scores, MoreauResult or None, timings)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    structure = structure or discover(model)
    prune = prune or PruneConfig()
    attn_range, mlp_range = prune.validate(structure.num_layers)
    layers = set(attn_range) | set(mlp_range)
    names = scored_parameter_names(structure, layers)
    grads, est, timings = None, None, {}
    if method in ("moreau", "taylor"):
        if batch is None:
            raise ValueError(f"method {method!r} needs a calibration batch")
        t0 = time.perf_counter()
        if method == "moreau":
            cfg = moreau or MoreauConfig(seed=seed)
            if micro_batch_size and cfg.micro_batch_size is None:
                cfg.micro_batch_size = micro_batch_size
            est = moreau_estimate(model, batch, cfg, score=names, progress=progress, structure=structure)
            grads = est.grads
        else:
            grads = gradient(model, batch, names, micro_batch_size)
        timings["importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model_scores(structure, method, grads, reduction, vectorize, prune.granularity, seed, layers)
    timings["scoring_s"] = time.perf_counter() - t0
    return scores, est, timings


def prune_model(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau",
                prune: PruneConfig | None = None, moreau: MoreauConfig | None = None,
                reduction: str = "sum", vectorize: bool = False, seed: int = 0,
                micro_batch_size: int | None = None, progress: bool = True) -> PruneResult:
    """Score the model's units with ``method`` on ``batch`` and prune it in place."""
    structure = discover(model)
    prune = prune or PruneConfig()
    prune.validate(structure.num_layers)
    scores, est, timings = compute_scores(model, batch, method, prune, moreau, reduction, vectorize, seed,
                                          micro_batch_size, progress, structure)
    t0 = time.perf_counter()
    report = prune_structure(structure, scores, prune)
    timings["prune_s"] = time.perf_counter() - t0
    return PruneResult(report, scores, method, est, timings)
