"""Plain gradients of the calibration loss: the Taylor baseline and the diagonal Fisher.

They run the estimate's micro-batch forward/backward (:class:`~moreau_pruner.estimate.runner.Runner`),
in one process or, given the FSDP2 runner, on sharded ranks (each rank then gets its local rows of
every gradient).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .config import EstimatorError
from .params import check_finite_weights, local_grad, local_tensor, unique_named_parameters
from .runner import ONE_PROCESS, Runner, differentiable, lm_loss


def gradient(model: nn.Module, batch: torch.Tensor, score: Iterable[str] | None = None,
             micro_batch_size: int | None = None, loss_fn: Callable = lm_loss,
             runner: Runner = ONE_PROCESS) -> dict[str, torch.Tensor]:
    """The gradient of the batch-mean calibration loss (the Taylor baseline), fp32 per parameter
    in ``score`` (None: all); with the FSDP2 runner, this rank's local rows."""
    named = unique_named_parameters(model)
    check_finite_weights((n, local_tensor(p)) for n, p in named)
    wanted = set(score) if score is not None else None
    with differentiable(model, named, runner):
        runner.forward_backward(model, runner.local_rows(batch), batch.shape[0], micro_batch_size, loss_fn)
        out = {}
        for n, p in named:
            if wanted is None or n in wanted:
                g = local_grad(p)
                if not torch.isfinite(g).all():
                    raise EstimatorError(f"non-finite gradient in {n}")
                out[n] = g.float()
        return out


def per_sample_gradient_sum(model: nn.Module, batch: torch.Tensor, names: Iterable[str],
                            transform: Callable[[torch.Tensor], torch.Tensor],
                            runner: Runner = ONE_PROCESS) -> dict[str, torch.Tensor]:
    """Σ_n transform(g_n) per parameter, g_n the fp32 gradient of row n's mean token loss (one
    backward per row of ``batch``); ``transform`` may work in place on its argument. A square
    comes before the sum over rows, so rows are not split across ranks: every rank runs every row."""
    names = list(names)
    acc: dict[str, torch.Tensor] = {}
    for j in range(batch.shape[0]):
        for name, g in gradient(model, runner.replicate(batch[j:j + 1]), names, runner=runner).items():
            g = transform(g)
            if name in acc:
                acc[name].add_(g)
            else:
                acc[name] = g
    return acc


def fisher_diagonal(model: nn.Module, batch: torch.Tensor, names: Iterable[str],
                    runner: Runner = ONE_PROCESS) -> dict[str, torch.Tensor]:
    """F = (1/N) Σ_n g_n², one backward per row of ``batch`` (fp32)."""
    n = batch.shape[0]
    return per_sample_gradient_sum(model, batch, names, lambda g: g.square_().div_(n), runner)
