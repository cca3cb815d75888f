"""The memory-strategy interface of the estimate loop, and the rules of which strategy runs what.

The loop (:func:`moreau_pruner.estimate.loop.estimate`, SPEC §2/§3) is the same for every
strategy; a strategy decides two things:

* where the perturbed weight w̃ = w + ξ|c·w| + δ lives during the forward and backward
  (:meth:`Strategy.perturb` / :meth:`Strategy.restore`): a new tensor swapped into ``param.data``
  (``reference``), a work buffer allocated once (``lean``), regenerated inside an
  ``autograd.Function`` and never stored (``regen``), or the local FSDP2 shard itself (``fsdp``);
* where the gradient is consumed: after the step's backward passes (:meth:`Strategy.gradient`,
  called by the loop for every tensor not updated yet), or earlier, by calling
  :meth:`Updates.update` from a gradient hook or a custom backward (``lean``, ``regen``), which
  frees each gradient as soon as it is produced.

A strategy also names its runner (:class:`~moreau_pruner.estimate.runner.Runner`): one process,
or FSDP2 ranks. To add one, subclass :class:`Strategy`, override :meth:`~Strategy.prepare`,
:meth:`~Strategy.perturb`, :meth:`~Strategy.restore` (and :meth:`~Strategy.release` if it adds
hooks or buffers), and give its refusals in :func:`refusals`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import moreau_kernels as mk

from ..config import MoreauConfig
from ..params import local_grad
from ..runner import ONE_PROCESS, Runner

#: the strategies :func:`moreau_pruner.estimate.loop.estimate` accepts by name
NAMES = ("auto", "reference", "lean", "regen")


def refusals(name: str, config: MoreauConfig, gradient_checkpointing: bool = False) -> list[str]:
    """Why strategy ``name`` cannot run ``config`` (empty when it can): every such rule is here."""
    out = []
    if name in ("lean", "regen"):
        if config.group != "row":
            out.append(f"group={config.group!r} ({name} implements 'row')")
        if config.noise != "philox":
            out.append(f"noise={config.noise!r} ({name} regenerates Philox noise)")
    elif name == "reference":
        if gradient_checkpointing:
            out.append("gradient_checkpointing (the reference path runs the model in eval mode, where HF layers "
                       "do not checkpoint; lean and regen offer it)")
    elif name == "fsdp":
        if config.noise != "philox":
            out.append(f"noise={config.noise!r} (each rank regenerates the Philox noise of its own rows; the "
                       "published CPU generator stream would have to be drawn whole on every rank)")
        if gradient_checkpointing:
            out.append("gradient_checkpointing (not offered on FSDP2 ranks)")
    return out


class State:
    """One parameter's estimator state: δ (fp32) and, when scored, the accumulator of the last K
    iterates, both shaped like the tensor this process holds."""

    __slots__ = ("name", "param", "index", "delta", "acc")

    def __init__(self, name: str, param: nn.Parameter, index: int, scored: bool, local: torch.Tensor | None = None):
        local = param if local is None else local
        self.name, self.param, self.index = name, param, index
        self.delta = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
        self.acc = torch.zeros_like(self.delta) if scored else None

    @property
    def rows(self) -> slice:
        """The rows of the full tensor this process holds (all of them)."""
        return slice(None)

    @property
    def empty(self) -> bool:
        """This process holds no element of the tensor (an empty FSDP2 shard)."""
        return False


class Updates:
    """The prox updates of one step (SPEC §2 step 5 / §3): which tensors are done, their Σδ² as
    0-d device tensors, whether the iterates are averaged this step, and the kernel backend.

    ``last`` is True during the step's last backward: gradient hooks and custom backwards
    update only then (earlier micro-batches and noise samples accumulate)."""

    def __init__(self, cfg: MoreauConfig, n: int):
        self.cfg = cfg
        self.last = False
        self.accumulate = False
        self.done = [False] * n
        self.sums: list[torch.Tensor | None] = [None] * n
        self.backend = ""

    def reset(self, accumulate: bool) -> None:
        self.last = False
        self.accumulate = accumulate
        self.done = [False] * len(self.done)
        self.sums = [None] * len(self.sums)

    def update(self, k: int, st: State, g: torch.Tensor) -> None:
        """δ ← prox(δ − γ g) of tensor ``k`` with ``moreau_kernels.prox_update_`` (the row groups;
        ``acc += δ`` on averaged steps)."""
        cfg = self.cfg
        if st.empty:
            self.sums[k] = torch.zeros(())
        else:
            if not self.backend:
                self.backend = mk.select("prox_update_", g, st.delta, st.acc)
            self.sums[k] = mk.prox_update_(g, st.delta, st.acc, cfg.lr, cfg.soft, cfg.lamb, cfg.prox_mode,
                                           self.accumulate and st.acc is not None)
        self.done[k] = True

    def set_sum(self, k: int, st: State) -> None:
        """Record Σδ² of a tensor whose δ was updated elsewhere (a structure group)."""
        self.sums[k] = (st.delta * st.delta).sum()
        self.done[k] = True


class Strategy:
    """Where w̃ lives and where the gradient is consumed (see the module docstring)."""

    name = ""
    label = "Moreau estimate"  # the progress bar's
    runner: Runner = ONE_PROCESS

    def refusals(self, config: MoreauConfig, gradient_checkpointing: bool = False) -> list[str]:
        """Why this strategy cannot run ``config`` (see :func:`refusals`)."""
        return refusals(self.name, config, gradient_checkpointing)

    def prepare(self, model: nn.Module, named: list[tuple[str, nn.Parameter]], wanted: Callable[[str], bool],
                cfg: MoreauConfig, updates: Updates) -> list[State]:
        """Allocate the states (one per parameter of ``named``, in order) and whatever the strategy
        keeps (buffers, hooks); called with every parameter requiring grad."""
        raise NotImplementedError

    def perturb(self, key: int) -> None:
        """Put w̃ for noise key ``key`` (step × n_samples + sample) where the forward reads it."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put the clean weights back, exactly (also after a failed :meth:`perturb`)."""
        raise NotImplementedError

    def gradient(self, st: State) -> torch.Tensor:
        """The step's gradient of ``st`` not consumed yet (zeros if the loss did not reach it)."""
        return local_grad(st.param)

    def clear(self, st: State) -> None:
        """Drop the gradient of ``st`` once consumed."""
        st.param.grad = None

    def release(self) -> None:
        """Remove hooks and buffers; the model is as before :meth:`prepare`."""
