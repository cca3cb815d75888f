"""Weight compensation (:mod:`moreau_pruner.prune.compensate`) on an FSDP2-sharded model.

Every rank walks the layers with its own calibration rows through the sharded model (each layer is
all-gathered for its forward as usual); the Gram matrices of the o_proj/down_proj inputs, their sums
and token counts are all-reduced, so every rank solves with the Gram matrix of the whole batch.
FSDP2 shards dim 0, the output rows of o_proj/down_proj, and the update maps every row through the
same matrix, so each rank updates its own rows in place. The layers are not reshaped: the removed
columns are left at zero, which makes each layer compute what the pruned layer computes, and rank 0
removes them by index-select after gathering the model, as without compensation.

A bias (the ``bias`` and ``weights+bias`` modes) is not added to the sharded modules: each rank's
rows of the bias change are gathered, a forward hook adds the whole vector to the linear's output
during the walk, and rank 0 puts it into the gathered model's bias (:func:`install_biases`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..prune.compensate import BIAS_SWITCHES, CompensateConfig, OneProcess, compensate_model
from ..prune.config import PruneConfig
from ..prune.plan import plan_units
from ..prune.target import resolve_target
from .context import Context, all_reduce, batch_rows, gather_rows


class Ranks(OneProcess):
    """Sums over the ranks, updates this rank's rows, keeps bias changes for rank 0."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.biases: dict[tuple[int, str], torch.Tensor] = {}
        self.hooks: list = []

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.ctx, t)

    def rows(self, lin: nn.Linear) -> torch.Tensor:
        return lin.weight.to_local()

    def add_bias(self, model, structure, ls, kind: str, delta: torch.Tensor) -> str | None:
        lin = getattr(ls, kind)
        full = gather_rows(self.ctx, delta, lin.out_features)
        self.biases[(ls.index, kind)] = full.cpu()
        add = full.to(device=self.ctx.device)

        def hook(_mod, _args, out):
            return out + add.to(out.dtype)

        self.hooks.append(lin.register_forward_hook(hook))
        return BIAS_SWITCHES[kind][0] if lin.bias is None else None  # switched on by install_biases

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def plans_of(structure, scores, cfg: PruneConfig):
    """The plans :func:`moreau_pruner.prune.apply.prune_structure` makes from ``scores`` (the same on every rank)."""
    return plan_units(resolve_target(structure, cfg), scores)


def compensate_fsdp(model: nn.Module, scores, prune: PruneConfig, batch: torch.Tensor, cfg: CompensateConfig,
                    ctx: Context, progress: bool = False) -> tuple[dict, dict]:
    """Compensate the sharded ``model`` for the plan ``scores`` give under ``prune``, on this rank's rows of
    ``batch`` (the whole batch, the same on every rank). Returns (the report, the same on every rank;
    the bias changes {(layer, 'o' or 'down'): full vector} for :func:`install_biases`)."""
    from ..model.structure import discover

    structure = discover(model)
    plans = plans_of(structure, scores, prune)
    a, b = batch_rows(batch.shape[0], ctx.world, ctx.rank)
    ranks = Ranks(ctx)
    try:
        report = compensate_model(structure, plans, batch[a:b], cfg, progress and ctx.is_main, ranks)
    finally:
        ranks.remove_hooks()
    return report, ranks.biases


def install_biases(model: nn.Module, biases: dict) -> None:
    """On rank 0's gathered model: add the bias changes of :func:`compensate_fsdp` (switching the bias on
    where the linears had none; either before or after the units are removed)."""
    from ..model.structure import discover

    structure = discover(model)
    one = OneProcess()
    for (layer, kind), delta in sorted(biases.items()):
        one.add_bias(model, structure, structure.layers[layer], kind, delta.double())
