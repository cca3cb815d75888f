"""Unit scores by method name: one function per scoring method (:mod:`.methods` lists them), shared by
the one-process and the FSDP2 paths through a scoring context (:mod:`.context`).

:func:`compute_scores` is the scoring stage of the pipeline; the library's ``prune_model``, the
sharded launcher and the policy-gradient search (whose metric initialisation receives a scorer
built here) all score through it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from ..estimate.config import MoreauConfig, MoreauResult
from ..prune.target import PruneTarget, as_target
from . import methods
from .context import LocalScoring
from .importance import HEAD_SCORES, REDUCTIONS, LayerScores, model_scores
from .taylor import VARIANTS, taylor_scores

ESTIMATOR_PATHS = ("auto", "reference", "lean", "regen")


@dataclass(frozen=True)
class ScoringOptions:
    """How a method's estimate becomes unit scores (checked when made).

    reduction        how the per-matrix parts of a unit combine (``sum``, the published default, ...)
    vectorize        |Σ W⊙G| per channel instead of Σ|W⊙G|
    head_score       how an attention unit's channels combine (:data:`.importance.HEAD_SCORES`)
    taylor_variant   LLM-Pruner's Taylor variant (``taylor``)
    seed             seed of the ``random`` scores and of the default Moreau noise
    micro_batch_size rows per forward/backward (None: the whole batch)
    estimator_path   memory strategy of the Moreau estimate (``auto``, ``reference``, ``lean``, ``regen``)
    gradient_checkpointing, check_memory: see :func:`moreau_pruner.estimate.estimate`
    """

    reduction: str = "sum"
    vectorize: bool = False
    head_score: str = "unit"
    taylor_variant: str = "param_first"
    seed: int = 0
    micro_batch_size: int | None = None
    estimator_path: str = "auto"
    gradient_checkpointing: bool = False
    check_memory: bool = False

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.head_score not in HEAD_SCORES:
            raise ValueError(f"head_score must be one of {HEAD_SCORES}, got {self.head_score!r}")
        if self.taylor_variant not in VARIANTS:
            raise ValueError(f"taylor variant must be one of {VARIANTS}, got {self.taylor_variant!r}")
        if self.estimator_path not in ESTIMATOR_PATHS:
            raise ValueError(f"estimator path must be one of {ESTIMATOR_PATHS}, got {self.estimator_path!r}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")

    @property
    def effective_taylor_variant(self) -> str:
        """``vectorize`` with the first-order variant is LLM-Pruner's vector-wise variant."""
        return "vectorize" if self.vectorize and self.taylor_variant == "param_first" else self.taylor_variant


Scored = tuple[list[LayerScores], MoreauResult | None, dict[str, float]]


def _scores(target: PruneTarget, method: str, grads, opts: ScoringOptions, ctx) -> list[LayerScores]:
    return model_scores(target.structure, method, grads, opts.reduction, opts.vectorize, target.config.granularity,
                        opts.seed, target.layers, saliency=ctx.saliency(grads), head_score=opts.head_score)


def _moreau(model, batch, target, moreau, opts, ctx, progress) -> Scored:
    t0 = time.perf_counter()
    cfg = moreau or MoreauConfig(seed=opts.seed)
    if opts.micro_batch_size and cfg.micro_batch_size is None:
        cfg = replace(cfg, micro_batch_size=opts.micro_batch_size)
    est = ctx.estimate(model, batch, cfg, target, opts, progress)
    timings = {"importance_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    scores = _scores(target, "moreau", est.grads, opts, ctx)
    timings["scoring_s"] = time.perf_counter() - t0
    return scores, est, timings


def _taylor(model, batch, target, moreau, opts, ctx, progress) -> Scored:
    scores, info = taylor_scores(model, batch, opts.effective_taylor_variant, target, opts.reduction,
                                 opts.micro_batch_size, head_score=opts.head_score, context=ctx)
    return scores, None, {k: v for k, v in info.items() if k.endswith("_s")}


def _weights_only(method: str):
    def score(model, batch, target, moreau, opts, ctx, progress) -> Scored:
        t0 = time.perf_counter()
        scores = _scores(target, method, None, opts, ctx)
        return scores, None, {"scoring_s": time.perf_counter() - t0}
    return score


SCORERS: dict[str, Callable[..., Scored]] = {"moreau": _moreau, "taylor": _taylor,
                                             "magnitude": _weights_only("magnitude"),
                                             "random": _weights_only("random")}


def score_units(model: nn.Module, batch: torch.Tensor | None, method: str, target: PruneTarget,
                moreau: MoreauConfig | None, options: ScoringOptions, context=None, progress: bool = True) -> Scored:
    """The scoring stage with everything resolved: (scores of ``target``'s layers, the Moreau estimate
    or None, timings)."""
    m = methods.get(method)
    if method not in SCORERS:
        what = "chooses the units itself (use prune_model)" if m.search else "scores single weights (unstructured)"
        raise ValueError(f"method {method!r} {what}; unit scores come from {', '.join(SCORERS)}")
    if m.needs_batch and batch is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    ctx = context or LocalScoring()
    scores, est, timings = SCORERS[method](model, batch, target, moreau, options, ctx, progress)
    return scores, est, {**timings, **ctx.timings()}


def compute_scores(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau", target=None,
                   moreau: MoreauConfig | None = None, *, reduction: str = "sum", vectorize: bool = False,
                   seed: int = 0, micro_batch_size: int | None = None, progress: bool = True, structure=None,
                   taylor_variant: str = "param_first", estimator_path: str = "auto",
                   gradient_checkpointing: bool = False, check_memory: bool = False,
                   head_score: str = "unit", context=None) -> Scored:
    """Unit scores of the layers to prune; returns (scores, MoreauResult or None, timings).

    ``target``: a :class:`~moreau_pruner.prune.target.PruneTarget`, or a
    :class:`~moreau_pruner.prune.config.PruneConfig` (None: the default one) resolved against
    ``structure`` or the model. The options are those of :class:`ScoringOptions`; ``context``: where
    the scores are computed (:class:`~.context.LocalScoring` by default).
    """
    methods.get(method)
    options = ScoringOptions(reduction, vectorize, head_score, taylor_variant, seed, micro_batch_size, estimator_path,
                             gradient_checkpointing, check_memory)
    target = target if isinstance(target, PruneTarget) else as_target(structure or model, target)
    return score_units(model, batch, method, target, moreau, options, context, progress)


def scorer(model: nn.Module, batch: torch.Tensor | None, moreau: MoreauConfig | None, options: ScoringOptions,
           context=None, progress: bool = True) -> Callable[[str, PruneTarget], Scored]:
    """``score(method, target)`` for ``model`` and ``batch``: what the policy-gradient search calls to
    start from a method's scores (a method that needs no batch gets none)."""
    def score(method: str, target: PruneTarget) -> Scored:
        use = batch if methods.get(method).needs_batch else None
        return score_units(model, use, method, target, moreau, options, context, progress)
    return score
