"""The parameters an estimate works on: listing, the local tensor of a (possibly sharded)
parameter and of its gradient, the finite-weight check and the choice of scored tensors."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .config import EstimatorError


def unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters with tied ones listed once, in ``model.parameters()`` order."""
    return list(model.named_parameters())


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This process's part of ``p``: the local shard of an FSDP2 (DTensor) parameter, else ``p``."""
    return p.to_local() if hasattr(p, "to_local") else p


def local_grad(p: nn.Parameter) -> torch.Tensor:
    """The gradient of ``p``'s local part; zeros when the parameter did not reach the loss."""
    g = p.grad
    if g is None:
        return torch.zeros_like(local_tensor(p))
    return g.to_local() if hasattr(g, "to_local") else g


def check_finite_weights(params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN or inf weights, naming the tensor (tensors on ``meta`` have no values to check)."""
    for name, p in params:
        if p.device.type != "meta" and not torch.isfinite(p).all():
            raise EstimatorError(f"parameter {name} contains NaN or inf values")


def score_predicate(score: Callable[[str], bool] | Iterable[str] | None,
                    named: list[tuple[str, nn.Parameter]]) -> Callable[[str], bool]:
    """``score`` (a predicate, parameter names, or None for all) as a predicate; unknown names are refused."""
    if callable(score):
        return score
    if score is None:
        return lambda name: True  # noqa: E731
    names = set(score)
    unknown = names - {n for n, _ in named}
    if unknown:
        raise ValueError(f"unknown parameter names to score: {sorted(unknown)[:5]}")
    return names.__contains__
