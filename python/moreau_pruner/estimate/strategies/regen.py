"""The ``regen`` memory strategy: no perturbed copy of the large weights.

The ``lean`` strategy keeps one work buffer per parameter holding the perturbed weight
w̃ = w + ξ|c·w| + δ for the whole forward and backward. Since w̃ is a pure function of (w, δ,
seed, step, index) (Philox noise, SPEC §2), it need not be stored: here every ``nn.Linear`` whose
weight belongs to that module alone runs through :class:`RegenLinear`, an autograd function that

* in the forward, writes w̃ into a transient buffer with ``moreau_kernels.perturb_out``, computes
  ``F.linear(x, w̃, b)`` and frees the buffer; it saves only the input x (which the ordinary linear
  saves too), not w̃;
* in the backward, regenerates w̃ the same way for ``grad_input = grad_out · w̃`` and computes
  ``grad_weight = grad_outᵀ · x``, which goes straight to the prox update (the weight never gets a
  ``.grad``; with micro-batches or several noise samples per step the partial gradients are summed
  in one buffer until the step's last backward, as ``.grad`` would).

Untied ``nn.Embedding`` weights get the same treatment (:class:`RegenEmbedding`: w̃ in the
forward only, the backward needs just the ids). The peak then holds weights + δ + acc +
activations + one layer's transient w̃ and gradient: the floor of SPEC §8, up to the parameters
that are neither (norms, biases, a tied embedding / lm_head), which keep the lean strategy's work
buffers and post-accumulate-grad hooks. The arithmetic is that of the autograd of ``F.linear``
(same ``mm`` calls in the same layouts), so δ, Ĝ and the log are bit-identical to ``lean`` on the
same backend; the price is one more perturb of every linear weight per backward.

Use it through :func:`moreau_pruner.estimate.estimate` (``strategy="regen"``) or the CLI
(``--estimator-path regen``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

import moreau_kernels as mk

from ..config import EstimatorError, MoreauConfig
from ..params import unique_named_parameters
from .base import State, Updates
from .lean import Lean

__all__ = ["Regen", "RegenEmbedding", "RegenLinear", "regen_modules"]


class RegenState(State):
    """A linear or embedding weight whose perturbed copy is regenerated, never stored."""

    __slots__ = ("k", "clean", "module", "gbuf")

    def __init__(self, name: str, param: nn.Parameter, index: int, scored: bool, module: nn.Module):
        super().__init__(name, param, index, scored)
        self.k, self.module = index, module
        self.clean = param.data
        self.gbuf: torch.Tensor | None = None  # partial gradient of the step (micro-batches / samples)

    def perturbed(self, cfg: MoreauConfig, key: int) -> torch.Tensor:
        """w̃ for noise key ``key`` in a new (transient) tensor."""
        out = torch.empty(self.clean.shape, dtype=self.clean.dtype, device=self.clean.device)
        mk.perturb_out(self.clean, self.delta, None, out, cfg.std, cfg.seed, key, self.index)
        return out


class _Run:
    """What the regenerating modules read: the configuration, the noise key of this forward/backward,
    and the step's updates (whether this backward is the step's last, per-tensor Σδ²)."""

    def __init__(self, cfg: MoreauConfig, updates: Updates):
        self.cfg, self.updates, self.key = cfg, updates, 0

    def consume(self, st: RegenState, g: torch.Tensor) -> None:
        upd = self.updates
        if st.gbuf is not None:
            st.gbuf += g
            g = st.gbuf
        if not upd.last:  # an earlier micro-batch / sample: keep the partial sum
            st.gbuf = g
            return
        if upd.done[st.k]:
            raise EstimatorError(f"parameter {st.name} received its gradient twice in one backward; "
                                 "use the lean or reference path")
        upd.update(st.k, st, g)
        st.gbuf = None


class RegenLinear(torch.autograd.Function):
    """``F.linear(x, w̃, bias)`` with w̃ regenerated in the forward and the backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, st: RegenState, run: _Run):
        wt = st.perturbed(run.cfg, run.key)
        # the flag makes aten::matmul fold the batch dimensions exactly as it does for a weight
        # that requires grad (the ordinary path), so the product is the same, bit for bit
        wt.requires_grad_(True)
        y = F.linear(x, wt, bias)
        del wt
        ctx.save_for_backward(x)
        ctx.st, ctx.run, ctx.key = st, run, run.key  # a checkpoint recompute reruns this with the same key
        ctx.bias_shape = None if bias is None else bias.shape
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (x,) = ctx.saved_tensors
        st, run = ctx.st, ctx.run
        gy2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gx = None
        if ctx.needs_input_grad[0]:
            wt = st.perturbed(run.cfg, ctx.key)
            gx = gy2.mm(wt).view(x.shape)
            del wt
        gb = None
        if ctx.needs_input_grad[1]:
            if x.dim() <= 2 or (x.dim() == 3 and x.is_contiguous()):
                gb = gy2.sum(0)  # addmm's bias gradient (aten::linear flattens these inputs)
            else:
                gb = gy.sum(tuple(range(gy.dim() - 1)))
        run.consume(st, gy2.t().mm(x2))
        return gx, gb, None, None


class RegenEmbedding(torch.autograd.Function):
    """``F.embedding(ids, w̃)`` with w̃ regenerated in the forward; the backward needs only the ids."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, anchor: torch.Tensor, st: RegenState, run: _Run, padding_idx: int,
                scale_grad_by_freq: bool):
        # ``anchor`` (an empty tensor that requires grad) puts this node on the graph: nothing else
        # it receives is differentiable
        wt = st.perturbed(run.cfg, run.key)
        y = F.embedding(ids, wt, padding_idx, None, 2.0, scale_grad_by_freq, False)
        del wt
        ctx.save_for_backward(ids)
        ctx.st, ctx.run = st, run
        ctx.args = (st.clean.shape[0], padding_idx, scale_grad_by_freq)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (ids,) = ctx.saved_tensors
        n, padding_idx, scale = ctx.args
        # what autograd computes for nn.Embedding's weight (dense)
        ctx.run.consume(ctx.st, torch.ops.aten.embedding_backward(gy, ids, n, padding_idx, scale, False))
        return None, None, None, None, None, None


def _regen_forward(module: nn.Module, st: RegenState, run: _Run, input: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        pad = module.padding_idx if module.padding_idx is not None else -1
        anchor = torch.empty(0, device=st.clean.device, requires_grad=True)
        return RegenEmbedding.apply(input, anchor, st, run, pad, module.scale_grad_by_freq)
    return RegenLinear.apply(input, module.bias, st, run)


def regen_modules(model: nn.Module, named: list[tuple[str, nn.Parameter]] | None = None) -> dict[int, nn.Module]:
    """``id(weight) -> module`` for every plain ``nn.Linear`` and dense ``nn.Embedding`` (no
    ``max_norm``, not sparse) whose weight belongs to that module alone (tied weights, such as an
    lm_head tied to the embeddings, are left to the lean work buffers)."""
    named = named if named is not None else unique_named_parameters(model)
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    ids = {id(p) for _, p in named}
    out = {}
    for m in model.modules():
        ok = (type(m) is nn.Linear) or (type(m) is nn.Embedding and m.max_norm is None and not m.sparse)
        if ok and id(m.weight) in ids and owners.get(id(m.weight)) == 1 and "forward" not in m.__dict__ \
                and m.weight.dim() == 2:
            out[id(m.weight)] = m
    return out


class Regen(Lean):
    """``lean`` for the parameters that are not regenerated; the linear and embedding weights are
    regenerated in their forward and backward and updated from their custom backward."""

    name = "regen"
    label = "Moreau estimate (regen)"

    def prepare(self, model, named, wanted, cfg, updates):
        self.linears = regen_modules(model, named)
        self.run = _Run(cfg, updates)
        self.patched: list[nn.Module] = []
        states = super().prepare(model, named, wanted, cfg, updates)
        for st in states:
            if isinstance(st, RegenState):
                st.param.requires_grad_(False)  # regenerated weights stay off the graph
                st.module.forward = functools.partial(_regen_forward, st.module, st, self.run)
                self.patched.append(st.module)
        return states

    def make_state(self, k, name, param, scored):
        module = self.linears.get(id(param))
        if module is None:
            return super().make_state(k, name, param, scored)
        return RegenState(name, param, k, scored, module)

    def perturb(self, key):
        self.run.key = key
        super().perturb(key)

    def gradient(self, st):
        if isinstance(st, RegenState):
            return st.gbuf if st.gbuf is not None else torch.zeros_like(st.param)
        return super().gradient(st)

    def clear(self, st):
        if isinstance(st, RegenState):
            st.gbuf = None
        else:
            super().clear(st)

    def release(self):
        super().release()
        for m in self.patched:
            del m.forward
        self.patched = []
        for st in self.states:
            if isinstance(st, RegenState):
                st.param.data = st.clean
                st.gbuf = None
