"""The structure groups of the estimate (``group='structure'``, ``paper`` mode only, SPEC §3).

With ``group='structure'`` the soft-threshold of the proximal step acts on whole prunable units,
attention heads (query heads with their KV rows and o_proj columns) and MLP channels (gate/up rows
with the down_proj column), instead of on rows. Tensors in no group (embeddings, norms, lm_head,
layers outside the structure) keep the row groups of ``moreau_kernels.prox_update_``.

The same code runs in one process and on FSDP2 ranks: each state holds some rows of its tensor
(:attr:`~moreau_pruner.estimate.strategies.base.State.rows`), the runner adds up the squared
norms of a group's units (:meth:`~moreau_pruner.estimate.runner.Runner.unit_norms`) and, on
several ranks, sums them over the ranks in one all-reduce per step (column groups of o_proj and
down_proj span every rank's rows).
"""
from __future__ import annotations

import torch

from .config import MoreauConfig
from .strategies.base import State, Strategy, Updates


def structure_groups(structure, states: list[State]):
    """Per layer, the tensors of its prunable units and how to slice them: a list of
    ``(entries, n_units)``, each entry ``(state, axis, unit_of_index)`` saying that rows (axis 0)
    or columns (axis 1) of the state's local tensor belong to unit ``unit_of_index[i]``."""
    by_param = {id(st.param): st for st in states}
    out = []
    for layer in structure.layers:
        for parts, n_units in ((layer.attention_unit_map(), layer.n_attention_units),
                               (layer.mlp_unit_map(), layer.intermediate_size)):
            entries = []
            for param, axis, unit in parts:
                st = by_param.get(id(param))
                if st is not None:
                    unit = unit.to(st.delta.device)
                    entries.append((st, axis, unit[st.rows] if axis == 0 else unit))
            if entries:
                out.append((entries, n_units))
    return out


def structure_prox(groups, cfg: MoreauConfig, updates: Updates, strategy: Strategy) -> None:
    """Paper-mode group soft-threshold with heads / MLP channels as groups (pure PyTorch):
    u = δ − γ(g + δ/λ), δ ← u · max(0, 1 − γs/‖u_unit‖). Marks the grouped tensors done with their
    Σδ² and drops their gradients; the loop updates the others."""
    runner = strategy.runner
    pending = []
    for entries, n_units in groups:
        us, pieces = [], []
        for st, axis, unit in entries:
            g = strategy.gradient(st).float()
            u = st.delta - cfg.lr * (g + st.delta / cfg.lamb)
            if not st.empty:
                sq = u * u
                sq = sq.sum(dim=1) if (axis == 0 and u.dim() == 2) else (sq.sum(dim=0) if axis == 1 else sq)
                pieces.append((unit, sq))
            us.append(u)
        pending.append((entries, us, runner.unit_norms(pieces, n_units)))
        if runner.world == 1:  # nothing to sum over ranks: shrink now, so one group's u lives at a time
            _shrink(pending.pop(), cfg, updates, strategy)
    if pending:
        totals = runner.sum_unit_norms([norm2 for _, _, norm2 in pending])
        for (entries, us, _), norm2 in zip(pending, totals):
            _shrink((entries, us, norm2), cfg, updates, strategy)


def _shrink(group, cfg: MoreauConfig, updates: Updates, strategy: Strategy) -> None:
    entries, us, norm2 = group
    tau = cfg.lr * cfg.soft
    r = torch.sqrt(norm2)
    coeff = torch.where(r <= tau, torch.zeros_like(r), 1.0 - tau / r)
    for (st, axis, unit), u in zip(entries, us):
        c = coeff.to(u.device)[unit]
        new = u * (c[:, None] if (axis == 0 and u.dim() == 2) else (c[None, :] if axis == 1 else c))
        st.delta.copy_(new)
        if updates.accumulate and st.acc is not None:
            st.acc.add_(new)
        updates.set_sum(st.index, st)
        strategy.clear(st)
