"""Moreau (and plain-gradient Taylor) importance for Torch-Pruning's ``MetaPruner``: MLP channels and
hidden size.

``MoreauImportance(model, batch, config)`` is a Torch-Pruning importance: called on a group, it
returns one score per channel, Σ|W ⊙ Ĝ| over the group's linear layers (Torch-Pruning's group
Taylor score with the Moreau estimate Ĝ of :func:`moreau_pruner.estimate` in place of the
gradient; a tied head's Ĝ is its embedding's). The estimate runs once, on the model as it is when
the first group is scored, with gradients enabled; it runs again only when a group's weights changed
shape since (a later step of an iterative ``MetaPruner``). ``TaylorImportance(model, batch)`` is the
same with the plain gradient of the calibration loss, for comparison. With Torch-Pruning's defaults
(``group_reduction='mean'``, ``normalizer='mean'``) the ranking inside a group is that of
``prune_model``'s ``reduction='sum'``, so the same MLP channels are kept. The hidden-size group (the
residual stream: embedding, o_proj/down_proj rows, every reader's columns, the norms) is scored the
same way; Torch-Pruning leaves ``config.hidden_size`` as it was.

Attention heads are refused. Torch-Pruning 1.6.1 with transformers 5 cannot be trusted with them on a
grouped-query (GQA) model: traced through the default SDPA attention (no ``repeat_kv`` in the graph) the
attention group has the key/value width and ``pruner/algorithms/base_pruner.py`` reshapes its scores
into query heads, so the query heads it keeps ignore the q/o weights (it kept zeroed heads in our
test); when a KV group has two query heads, removing one per group maps onto every key/value channel
and the group is silently skipped; and the attention group of a rotary model does not build at all
(``rotate_half``'s slice/concat loop shifts the indices on every turn of
``_fix_dependency_graph_non_recursive``, so it never ends; Torch-Pruning's issues 527 and 456 report
such endless loops on Qwen3 and CogVideoX). An importance cannot repair that, so a group that prunes
heads (q/k/v rows, o columns) raises a ValueError: put the attention modules in ``ignored_layers`` and
prune attention with :func:`moreau_pruner.prune_model` (our planner keeps whole KV groups or query
heads per group).
"""
from __future__ import annotations

from abc import abstractmethod
from contextlib import contextmanager

import torch
from torch import nn

try:
    import torch_pruning as tp
except ImportError as e:  # the optional extra is missing
    raise ImportError("moreau_pruner.integrations.torch_pruning needs Torch-Pruning: "
                      f"pip install 'moreau-kernels[torch-pruning]' (scripts/setup.sh does this; {e})") from e

from ..estimate import estimate
from ..estimate.config import MoreauConfig
from ..estimate.runner import lm_loss
from ..model.structure import discover

__all__ = ["MoreauImportance", "TaylorImportance", "attention_modules"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The q/k/v/o projections of every decoder layer (for ``MetaPruner(ignored_layers=...)``)."""
    return [m for ls in discover(model).layers for m in (ls.q, ls.k, ls.v, ls.o)]


class _GradientImportance(tp.importance.GroupTaylorImportance):
    """Group Taylor importance whose gradients come from :meth:`gradients` (computed once per shape)."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, *, group_reduction: str = "mean",
                 normalizer: str = "mean", multivariable: bool = False):
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, multivariable=multivariable,
                         target_types=[nn.Linear])
        structure = discover(model)  # UnsupportedArchitecture (a ValueError) for a model we do not know
        self.model, self.batch = model, batch
        self._heads = {id(m): "out" for ls in structure.layers for m in (ls.q, ls.k, ls.v)}
        self._heads.update({id(ls.o): "in" for ls in structure.layers})
        self._grads: dict[str, torch.Tensor] = {}

    @abstractmethod
    def gradients(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: the gradient (or its estimate) of that weight}, computed on the model as it is now."""

    def _check(self, group) -> list[tuple[str, nn.Linear]]:
        names = {id(m): n for n, m in self.model.named_modules()}
        params = {id(p): n for n, p in self.model.named_parameters()}  # a tied head's weight is the embedding's
        linears = []
        for dep, _ in group:
            layer = dep.target.module
            side = "out" if dep.handler == tp.prune_linear_out_channels else "in"
            if self._heads.get(id(layer)) == side:
                raise ValueError(
                    f"{type(self).__name__} does not score attention heads ({names.get(id(layer), layer)}): "
                    "Torch-Pruning ranks grouped-query heads from the key/value projections' scores reshaped into "
                    "query heads, so its choice ignores the q/o weights and can keep worthless heads. Put the "
                    "attention modules in ignored_layers (moreau_pruner.integrations.torch_pruning."
                    "attention_modules(model)) and prune attention with moreau_pruner.prune_model")
            if isinstance(layer, nn.Linear):
                linears.append((params[id(layer.weight)], layer))
        return linears

    @contextmanager
    def _swapped(self, linears):
        old = [lin.weight.grad for _, lin in linears]
        try:
            for name, lin in linears:
                lin.weight.grad = self._grads[name].to(lin.weight.dtype)
            yield
        finally:
            for (_, lin), g in zip(linears, old):
                lin.weight.grad = g

    def __call__(self, group):
        linears = self._check(group)
        if any(n not in self._grads or self._grads[n].shape != lin.weight.shape for n, lin in linears):
            params = {id(p): n for n, p in self.model.named_parameters()}  # a tied head's is the embedding's
            names = list(dict.fromkeys(params[id(m.weight)] for m in self.model.modules() if isinstance(m, nn.Linear)))
            with torch.enable_grad():
                self._grads = self.gradients(names)
        with self._swapped(linears):
            return super().__call__(group)


class MoreauImportance(_GradientImportance):
    """Σ|W ⊙ Ĝ| per channel with the Moreau estimate Ĝ of ``model`` on ``batch`` (LongTensor
    [n, seq]); ``config``/``strategy`` as :func:`moreau_pruner.estimate`."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, config: MoreauConfig | None = None,
                 strategy: str = "auto", **kw):
        super().__init__(model, batch, **kw)
        self.config, self.strategy = config or MoreauConfig(), strategy
        self.result = None  # the last MoreauResult

    def gradients(self, names: list[str]) -> dict[str, torch.Tensor]:
        self.result = estimate(self.model, self.batch, self.config, self.strategy, score=names, progress=False)
        return self.result.grads


class TaylorImportance(_GradientImportance):
    """Σ|W ⊙ ∇L| per channel with the gradient of the calibration loss of ``model`` on ``batch``."""

    def gradients(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        grads = torch.autograd.grad(lm_loss(self.model, self.batch), [params[n] for n in names])
        return {n: g.detach().float() for n, g in zip(names, grads)}
