"""Unit scores of an FSDP2-sharded model, the same on every rank (SPEC §9).

The importance (the Moreau estimate on the ``fsdp`` strategy, the plain gradient, the Fisher
diagonal) runs on the local shards with the data-parallel runner. Row saliencies of the local rows
are gathered, column saliencies (o_proj/down_proj) are summed across ranks, so every rank holds the
same unit scores and computes the same plan.
"""
from __future__ import annotations

import torch

import moreau_kernels as mk

from ..estimate import FsdpStrategy, estimate, fisher_diagonal, gradient
from ..estimate.params import unique_named_parameters
from ..score.importance import weight_gradient
from .context import Context, DataParallel, all_reduce, gather_rows


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


class FsdpScoring:
    """The scoring context (:mod:`moreau_pruner.score.context`) of an FSDP2-sharded model: the Moreau
    estimate and the gradients on local shards, column sums over ranks, so every rank computes the
    same unit scores."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.runner = DataParallel(ctx)
        self._comm0 = ctx.comm_s

    def estimate(self, model, batch, config, target, options, progress):
        return estimate(model, batch, config, FsdpStrategy(self.runner), score=target.scored_names,
                        progress=progress, structure=target.structure)

    def gradient(self, model, batch, names, micro_batch_size):
        return gradient(model, batch, names, micro_batch_size, runner=self.runner)

    def fisher(self, model, batch, names):
        return fisher_diagonal(model, batch, names, self.runner)

    def weights(self, model) -> dict[str, torch.Tensor]:
        """The local rows of every weight (F ⊙ W is elementwise)."""
        return {n: p.to_local() for n, p in unique_named_parameters(model)}

    def saliency(self, grads):
        return sharded_saliency(self.ctx, grads)

    def timings(self) -> dict[str, float]:
        return {"collectives_s": self.ctx.comm_s - self._comm0}
