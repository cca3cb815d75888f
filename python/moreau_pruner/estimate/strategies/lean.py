"""The ``lean`` memory strategy: reused work buffers, gradients consumed as they are produced.

The same δ, Ĝ and log as ``reference`` for ``group='row'`` with Philox noise (bit-identical on
the same backend), with less memory:

* one work buffer per parameter (the perturbed weight, in the weight's dtype) allocated once and
  refilled every step by ``moreau_kernels.perturb_multi`` (one grouped launch per device/dtype on
  the fused backends); the clean tensor is kept aside and put back by swapping ``param.data``, so
  the weights are never copied and are bit-identical afterwards;
* a ``register_post_accumulate_grad_hook`` on every parameter runs the prox update as soon as the
  parameter's gradient of the step is complete and frees ``param.grad`` at once, so with one
  micro-batch and one noise sample no full-model gradient buffer ever exists. With micro-batches
  or ``n_samples > 1`` the hooks only act on the last backward of the step (before that ``.grad``
  accumulates normally, which does hold every gradient until the last backward: the memory plan
  says so).
"""
from __future__ import annotations

import torch
from torch import nn

import moreau_kernels as mk

from ..config import EstimatorError, MoreauConfig
from .base import State, Strategy, Updates


class LeanState(State):
    """A parameter with its clean tensor and the work buffer its w̃ is written into."""

    __slots__ = ("clean", "work")

    def __init__(self, name: str, param: nn.Parameter, index: int, scored: bool):
        super().__init__(name, param, index, scored)
        self.clean = param.data  # the original tensor object, put back after every forward/backward
        self.work = torch.empty(param.shape, dtype=param.dtype, device=param.device)


def perturb_into_work(states: list[LeanState], cfg: MoreauConfig, key: int) -> None:
    """Fill every work buffer with w + ξ|c·w| + δ: grouped launches per (device, dtype)."""
    groups: dict[tuple, list[LeanState]] = {}
    for st in states:
        if st.clean.is_contiguous():
            groups.setdefault((st.clean.device, st.clean.dtype), []).append(st)
        else:  # perturb_multi needs contiguous weights; perturb_out copies
            mk.perturb_out(st.clean, st.delta, None, st.work, cfg.std, cfg.seed, key, st.index)
    for members in groups.values():
        mk.perturb_multi([st.clean for st in members], [st.delta for st in members], [st.work for st in members],
                         cfg.std, cfg.seed, key, [st.index for st in members])


class Lean(Strategy):
    name = "lean"
    label = "Moreau estimate (lean)"

    def prepare(self, model, named, wanted, cfg, updates):
        self.cfg, self.updates = cfg, updates
        self.handles = []
        self.states = []
        self.buffered: list[LeanState] = []  # the states whose w̃ lives in a work buffer
        for k, (n, p) in enumerate(named):
            st = self.make_state(k, n, p, wanted(n))
            self.states.append(st)
            if isinstance(st, LeanState):
                self.buffered.append(st)
        for k, st in enumerate(self.states):
            if isinstance(st, LeanState):
                self.handles.append(st.param.register_post_accumulate_grad_hook(self._hook(k, st)))
        return self.states

    def make_state(self, k: int, name: str, param: nn.Parameter, scored: bool) -> State:
        return LeanState(name, param, k, scored)

    def _hook(self, k: int, st: LeanState):
        upd: Updates = self.updates

        def hook(param: torch.Tensor) -> None:
            if not upd.last:  # an earlier micro-batch / sample: let .grad accumulate
                return
            if upd.done[k]:
                raise EstimatorError(
                    f"parameter {st.name} received its gradient twice in one backward (a parameter used in "
                    "several reentrant-checkpointed segments?); use the reference path")
            g = param.grad
            if g is None:
                return
            upd.update(k, st, g)
            param.grad = None  # consumed: no full-model gradient buffer
        return hook

    def perturb(self, key):
        perturb_into_work(self.buffered, self.cfg, key)
        for st in self.buffered:
            st.param.data = st.work

    def restore(self):
        for st in self.buffered:  # the original tensor objects: exact restore
            st.param.data = st.clean

    def release(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for st in self.buffered:
            st.param.data = st.clean
            st.work = None
