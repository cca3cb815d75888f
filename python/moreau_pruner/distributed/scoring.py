"""Unit scores of an FSDP2-sharded model, the same on every rank (SPEC §9).

The importance (the Moreau estimate on the ``fsdp`` strategy, the plain gradient, the Fisher
diagonal) runs on the local shards with the data-parallel runner. Row saliencies of the local rows
are gathered, column saliencies (o_proj/down_proj) are summed across ranks, so every rank holds the
same unit scores and computes the same plan.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

import moreau_kernels as mk

from ..estimate import FsdpStrategy, MoreauConfig, estimate, fisher_diagonal, gradient
from ..estimate.params import unique_named_parameters
from ..model.structure import discover
from ..prune.plan import PruneConfig
from ..score.importance import METHODS, check_head_score, model_scores, scored_parameter_names, weight_gradient
from ..score.taylor import effective_gradients
from .context import Context, DataParallel, all_reduce, gather_rows

TAYLOR_VARIANTS = ("param_first", "param_second", "param_mix", "vectorize")


def sharded_saliency(ctx: Context, grads: dict[str, torch.Tensor] | None):
    """A ``saliency`` for :func:`moreau_pruner.score.importance.layer_scores` on sharded weights: row sums
    of the local rows are gathered, column sums are summed over ranks (identical on every rank)."""

    def saliency(lin, _grads, names, vectorize):
        w = lin.weight
        rows_n, cols_n = w.shape
        local = w.to_local().detach()
        g = weight_gradient(w, grads, names)
        if local.shape[0]:
            rows, _ = mk.channel_saliency(local, g, vectorize)
            p = local.float() if g is None else local.float() * g.float()
            cols = p.sum(dim=0) if vectorize else p.abs().sum(dim=0)
        else:
            rows = torch.zeros(0, dtype=torch.float32, device=local.device)
            cols = torch.zeros(cols_n, dtype=torch.float32, device=local.device)
        cols = all_reduce(ctx, cols)
        return gather_rows(ctx, rows, rows_n), (cols.abs() if vectorize else cols)

    return saliency


def compute_scores_fsdp(model: nn.Module, batch: torch.Tensor | None, ctx: Context, method: str = "moreau",
                        prune=None, moreau: MoreauConfig | None = None, reduction: str = "sum",
                        vectorize: bool = False, seed: int = 0, micro_batch_size: int | None = None,
                        progress: bool = True, taylor_variant: str = "param_first", head_score: str = "unit"):
    """Unit scores of the layers to prune (the same on every rank); returns (scores, estimate, timings).

    ``head_score``: how attention units combine their channels (:data:`.importance.HEAD_SCORES`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_head_score(head_score)
    structure = discover(model)
    prune = prune or PruneConfig()
    attn_range, mlp_range = prune.validate(structure.num_layers)
    layers = set(attn_range) | set(mlp_range)
    names = scored_parameter_names(structure, layers)
    if method in ("moreau", "taylor") and batch is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    timings: dict = {}
    runner = DataParallel(ctx)
    est = None
    grads = None
    t0 = time.perf_counter()
    comm0 = ctx.comm_s
    if method == "moreau":
        cfg = moreau or MoreauConfig(seed=seed)
        if micro_batch_size and cfg.micro_batch_size is None:
            cfg = replace(cfg, micro_batch_size=micro_batch_size)
        est = estimate(model, batch, cfg, FsdpStrategy(runner), score=names, progress=progress, structure=structure)
        grads = est.grads
    elif method == "taylor":
        if taylor_variant not in TAYLOR_VARIANTS:
            raise ValueError(f"taylor variant must be one of {TAYLOR_VARIANTS}, got {taylor_variant!r}")
        if vectorize and taylor_variant == "param_first":
            taylor_variant = "vectorize"
        g = (gradient(model, batch, names, micro_batch_size, runner=runner) if taylor_variant != "param_second"
             else None)
        f = (fisher_diagonal(model, batch, names, runner) if taylor_variant in ("param_second", "param_mix")
             else None)
        if f is not None:  # F ⊙ W needs the local rows of W
            local_w = {n: p.to_local() for n, p in unique_named_parameters(model) if n in f}
            grads = {n: (fv * local_w[n].detach().float() if taylor_variant == "param_second"
                         else g[n].float() - 0.5 * fv * local_w[n].detach().float()) for n, fv in f.items()}
        else:
            grads = effective_gradients(model, taylor_variant, g, None)
        vectorize = taylor_variant == "vectorize"
    timings["importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model_scores(structure, "taylor" if method == "taylor" else method, grads, reduction, vectorize,
                          prune.granularity, seed, layers,
                          saliency=sharded_saliency(ctx, grads if method != "magnitude" else None),
                          head_score=head_score)
    timings["scoring_s"] = time.perf_counter() - t0
    timings["collectives_s"] = ctx.comm_s - comm0
    return scores, est, timings
