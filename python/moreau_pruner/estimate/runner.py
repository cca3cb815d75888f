"""How the estimate loop sees its work: the calibration rows, the loss, and the sums to reduce.

The loop (:mod:`.loop`) and the plain gradients (:mod:`.gradient`) run every forward/backward
through a runner. :class:`Runner` is the one-process one: the whole batch, whole tensors, nothing
to reduce. The FSDP2 runner (``moreau_pruner.distributed.context.DataParallel``) overrides the
hooks below: this rank's block of rows, the loss weighted so FSDP2's averaging reduce-scatter gives
the batch mean, gradient sync on the last micro-batch only, and all-reduced loss, Σδ² and
structure-group norms.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .config import EstimatorError


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of a causal LM on ``ids`` (labels = ids, every token counts)."""
    return model(input_ids=ids, labels=ids).loss


class Runner:
    """One process: the whole calibration batch and whole tensors."""

    world = 1
    rank = 0
    rows_name = "calibration rows"

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The rows of ``batch`` this process runs."""
        return batch

    def replicate(self, row: torch.Tensor) -> torch.Tensor:
        """A batch in which every process runs ``row`` (a per-sample gradient: the reduce then
        averages equal gradients)."""
        return row.expand(self.world, -1)

    def set_gradient_sync(self, model: nn.Module, on: bool) -> None:
        """Whether the next backward reduces gradients across processes (nothing to reduce here)."""

    def finish(self, model: nn.Module) -> None:
        """Undo what the runner changed on the model (gradient sync)."""

    def sum_loss(self, loss: float) -> float:
        return loss

    def sum_sumsq(self, sumsq: torch.Tensor) -> torch.Tensor:
        return sumsq

    def unit_norms(self, pieces: list[tuple[torch.Tensor, torch.Tensor]], n_units: int) -> torch.Tensor:
        """Per-unit squared norms of one structure group from ``(unit_of_index, squares)`` pieces
        (one per tensor of the group): each tensor's sums, added tensor by tensor."""
        norm2 = None
        for unit, sq in pieces:
            part = torch.zeros(n_units, dtype=torch.float32, device=sq.device).index_add_(0, unit, sq)
            norm2 = part if norm2 is None else norm2 + part
        return norm2

    def sum_unit_norms(self, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """The groups' norms over every process."""
        return norms

    def forward_backward(self, model: nn.Module, rows: torch.Tensor, n_total: int, micro_batch_size: int | None,
                         loss_fn: Callable = lm_loss, scale: float = 1.0, total: float = 0.0,
                         before_backward: Callable[[bool], None] | None = None) -> float:
        """Backward of this process's share of the mean loss of an ``n_total``-row batch, over
        micro-batches of ``rows``; returns ``total`` plus that share of the mean loss.

        Every row has the same length, so weighting each micro-batch by world·rows/n_total gives
        the mean over the whole batch (one process: rows/n; FSDP2 then averages over ranks).
        ``before_backward(last)`` runs before each backward, ``last`` on the final micro-batch.
        On the ``meta`` device (memory tracking) there is no value to check, weigh or read.
        """
        n = rows.shape[0]
        mbs = micro_batch_size or n
        starts = range(0, n, mbs)
        for i, start in enumerate(starts):
            part = rows[start:start + mbs]
            last = i == len(starts) - 1
            self.set_gradient_sync(model, last)
            loss = loss_fn(model, part)
            if loss.device.type == "meta":
                if before_backward is not None:
                    before_backward(last)
                loss.backward()
                continue
            if not torch.isfinite(loss):
                raise EstimatorError(f"the loss is {loss.item()} (non-finite) on {self.rows_name} "
                                     f"{start}..{start + len(part) - 1}")
            if before_backward is not None:
                before_backward(last)
            (loss * (len(part) * self.world / n_total) * scale).backward()
            total += loss.item() * len(part) / n_total
        return total


ONE_PROCESS = Runner()


def forward_backward(model: nn.Module, batch: torch.Tensor, micro_batch_size: int | None,
                     loss_fn: Callable = lm_loss, scale: float = 1.0) -> float:
    """Backward of the batch's mean loss in one process, over micro-batches; returns the loss value."""
    return ONE_PROCESS.forward_backward(model, batch, batch.shape[0], micro_batch_size, loss_fn, scale)


@contextlib.contextmanager
def differentiable(model: nn.Module, named: list[tuple[str, nn.Parameter]], runner: Runner = ONE_PROCESS):
    """Inside: the model in eval mode, every parameter requiring grad, no ``.grad``. Afterwards
    ``.grad`` is cleared and each parameter's ``requires_grad``, the model's mode and the runner's
    gradient sync are as before."""
    flags = [p.requires_grad for _, p in named]
    was_training = model.training
    try:
        model.eval()
        for _, p in named:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for (_, p), flag in zip(named, flags):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
        runner.finish(model)
