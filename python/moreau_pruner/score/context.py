"""Where the scores are computed: in this process, or on FSDP2 shards.

A scoring context gives the scoring methods of :mod:`moreau_pruner.score.registry` the four things
that differ between one process and several ranks: the Moreau estimate, the plain gradient, the
Fisher diagonal (Taylor's second order) and the weights those multiply, and the saliency that
turns weights and gradients into channel scores. :class:`LocalScoring` is the one-process
context; the FSDP2 one lives in :mod:`moreau_pruner.distributed`.
"""
from __future__ import annotations

import torch
from torch import nn


class LocalScoring:
    """Scores in this process, on whole tensors."""

    def estimate(self, model: nn.Module, batch: torch.Tensor, config, target, options, progress: bool):
        """The Moreau estimate of ``target``'s scored weights on the strategy ``options`` names."""
        from ..estimate.loop import estimate

        return estimate(model, batch, config, options.estimator_path, score=target.scored_names, progress=progress,
                        structure=target.structure, gradient_checkpointing=options.gradient_checkpointing,
                        check_memory=options.check_memory)

    def gradient(self, model: nn.Module, batch: torch.Tensor, names: list[str],
                 micro_batch_size: int | None) -> dict[str, torch.Tensor]:
        from ..estimate.gradients import gradient

        return gradient(model, batch, names, micro_batch_size)

    def fisher(self, model: nn.Module, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """F = (1/N) Σ_n g_n², one backward per row of ``batch`` (fp32)."""
        from ..estimate.gradients import fisher_diagonal

        return fisher_diagonal(model, batch, names)

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights the gradients belong to (whole tensors here)."""
        return dict(model.named_parameters())

    def saliency(self, grads: dict[str, torch.Tensor] | None):
        """None: :func:`moreau_pruner.score.importance.layer_scores`' own one-process saliency."""
        return None

    def timings(self) -> dict[str, float]:
        return {}
