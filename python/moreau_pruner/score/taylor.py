"""LLM-Pruner's Taylor importance variants for the structured path (Ma et al., 2023).

LLM-Pruner's ``TaylorImportance(taylor=...)`` computes, per weight of each Linear, a salience

``param_first``   s = W ⊙ g                         (first order; = ``taylor`` in importance.py)
``param_second``  s = W ⊙ F ⊙ W                     (second order, diagonal Fisher F ≈ Hessian)
``param_mix``     s = W ⊙ g − ½ · W ⊙ F ⊙ W         (both terms of the expansion of ΔL)
``vectorize``     s = W ⊙ g, combined per channel as |Σ s| instead of Σ |s|

with g the gradient of the mean calibration loss over the whole batch and
F = (1/N) Σ_n g_n ⊙ g_n the Fisher accumulator, g_n the gradient of calibration sequence n's own
mean token loss (LLM-Pruner runs the N samples one at a time and accumulates ``grad² / N`` in
``acc_grad``). A channel's score is Σ|s| over its row (output channel) or column (input
channel), or |Σ s| for ``vectorize``; channel scores are then grouped into heads / MLP channels
and combined across matrices exactly as :mod:`moreau_pruner.score.importance` does (``reduction``,
default ``sum`` as LLM-Pruner's ``group_reduction``).

Every variant is W ⊙ G_eff for some effective gradient (G_eff = g, F ⊙ W, or g − ½ F ⊙ W), so
the scores come from :func:`moreau_pruner.score.importance.model_scores` with ``method='taylor'``
unchanged, in the same :class:`LayerScores` format that :func:`moreau_pruner.prune.apply.prune_structure`
consumes.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..prune.target import PruneTarget, as_target
from .context import LocalScoring
from .importance import LayerScores, model_scores

VARIANTS = ("param_first", "param_second", "param_mix", "vectorize")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def effective_gradients(weights: dict[str, torch.Tensor] | nn.Module, variant: str,
                        grads: dict[str, torch.Tensor] | None,
                        fisher: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """G_eff with s = W ⊙ G_eff for ``variant`` (see the module docstring); ``weights`` maps names to
    the weights (a model: its parameters)."""
    check_variant(variant)
    if variant in ("param_first", "vectorize"):
        if grads is None:
            raise ValueError(f"{variant} needs the gradient")
        return grads
    if fisher is None or (variant == "param_mix" and grads is None):
        raise ValueError(f"{variant} needs the Fisher accumulator" + (" and the gradient" if variant == "param_mix"
                                                                        else ""))
    params = dict(weights.named_parameters()) if isinstance(weights, nn.Module) else weights
    out = {}
    for name, f in fisher.items():
        fw = f * params[name].detach().float()
        out[name] = fw if variant == "param_second" else grads[name].float() - 0.5 * fw
    return out


def taylor_scores(model: nn.Module, batch: torch.Tensor, variant: str = "param_first", target=None,
                  reduction: str = "sum", micro_batch_size: int | None = None, structure=None,
                  head_score: str = "unit", context=None) -> tuple[list[LayerScores], dict]:
    """Unit scores of the layers ``target`` prunes (others get None), and timings.

    ``target``: a :class:`~moreau_pruner.prune.target.PruneTarget`, or a
    :class:`~moreau_pruner.prune.config.PruneConfig` resolved against ``structure`` (or the model).
    ``batch``: LongTensor [n, seq]; the second-order variants run n extra backward passes of one
    row each. Feed the scores to :func:`moreau_pruner.prune.apply.prune_structure`.
    ``head_score``: how attention units combine their channels (:data:`.importance.HEAD_SCORES`).
    ``context``: where the gradients are computed (:class:`~.context.LocalScoring` by default; the
    FSDP2 path passes its own).
    """
    check_variant(variant)
    if batch is None:
        raise ValueError("the Taylor variants need a calibration batch")
    target = target if isinstance(target, PruneTarget) else as_target(structure or model, target)
    ctx = context or LocalScoring()
    names = target.scored_names
    info: dict = {"variant": variant}
    t0 = time.perf_counter()
    grads = fisher = None
    if variant != "param_second":
        grads = ctx.gradient(model, batch, names, micro_batch_size)
    if variant in ("param_second", "param_mix"):
        fisher = ctx.fisher(model, batch, names)
    eff = effective_gradients(ctx.weights(model), variant, grads, fisher)
    info["importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model_scores(target.structure, "taylor", eff, reduction, variant == "vectorize",
                          target.config.granularity, 0, target.layers, saliency=ctx.saliency(eff),
                          head_score=head_score)
    info["scoring_s"] = time.perf_counter() - t0
    return scores, info
