"""The ``regen`` memory strategy of the Moreau estimate: no perturbed copy of the large weights.

The lean path (:mod:`moreau_pruner.estimate.lean`) keeps one work buffer per parameter holding the
perturbed weight w̃ = w + ξ|c·w| + δ for the whole forward and backward. Since w̃ is a pure
function of (w, δ, seed, step, index) (Philox noise, SPEC §2), it need not be stored: here every
``nn.Linear`` whose weight is scored by the estimate and used by that module alone runs through
:class:`RegenLinear`, an autograd function that

* in the forward, writes w̃ into a transient buffer with ``moreau_kernels.perturb_out``, computes
  ``F.linear(x, w̃, b)`` and frees the buffer; it saves only the input x (which the ordinary linear
  saves too), not w̃;
* in the backward, regenerates w̃ the same way for ``grad_input = grad_out · w̃`` and computes
  ``grad_weight = grad_outᵀ · x``, which goes straight to ``moreau_kernels.prox_update_`` (the
  weight never gets a ``.grad``; with micro-batches or several noise samples per step the partial
  gradients are summed in one buffer until the step's last backward, as ``.grad`` would).

Untied ``nn.Embedding`` weights get the same treatment (:class:`RegenEmbedding`: w̃ in the
forward only, the backward needs just the ids). The peak then holds weights + δ + acc +
activations + one layer's transient w̃ and gradient: the floor of SPEC §8, up to the parameters
that are neither (norms, biases, a tied embedding / lm_head), which keep the lean path's work
buffers and post-accumulate-grad hooks. The arithmetic is that of
the autograd of ``F.linear`` (same ``mm`` calls in the same layouts), so δ, Ĝ and the log are
bit-identical to the lean path on the same backend; the price is one more perturb of every linear
weight per backward.

Use it through :func:`moreau_pruner.estimate.lean.estimate` (``path="regen"``) or the CLI
(``--estimator-path regen``).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import moreau_kernels as mk

from .estimator import (EstimatorError, MoreauConfig, MoreauResult, _progress, check_finite_weights, finish_step,
                        lm_loss, sums_to_cpu, unique_named_parameters)
from .lean import _Control, _LeanState, _make_hook, _perturb_all, _score_predicate, activation_checkpointing

__all__ = ["RegenEmbedding", "RegenLinear", "moreau_estimate_regen", "regen_modules"]


class _RegenState:
    """A linear or embedding weight whose perturbed copy is regenerated, never stored."""

    __slots__ = ("name", "param", "index", "clean", "delta", "acc", "module", "k", "gbuf")

    def __init__(self, name: str, param: nn.Parameter, index: int, scored: bool, module: nn.Module, k: int):
        self.name, self.param, self.index, self.module, self.k = name, param, index, module, k
        self.clean = param.data
        self.delta = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        self.acc = torch.zeros_like(self.delta) if scored else None
        self.gbuf: torch.Tensor | None = None  # partial gradient of the step (micro-batches / samples)

    def perturbed(self, cfg: MoreauConfig, key: int) -> torch.Tensor:
        """w̃ for noise key ``key`` in a new (transient) tensor."""
        out = torch.empty(self.clean.shape, dtype=self.clean.dtype, device=self.clean.device)
        mk.perturb_out(self.clean, self.delta, None, out, cfg.std, cfg.seed, key, self.index)
        return out


class _Run:
    """What the regenerating modules read: the configuration, the noise key of this forward/backward,
    and the shared update control (whether this backward is the step's last, per-tensor Σδ²)."""

    def __init__(self, cfg: MoreauConfig, ctl: _Control):
        self.cfg, self.ctl, self.key = cfg, ctl, 0

    def consume(self, st: _RegenState, g: torch.Tensor) -> None:
        ctl, cfg = self.ctl, self.cfg
        if st.gbuf is not None:
            st.gbuf += g
            g = st.gbuf
        if not ctl.last:  # an earlier micro-batch / sample: keep the partial sum
            st.gbuf = g
            return
        if ctl.done[st.k]:
            raise EstimatorError(f"parameter {st.name} received its gradient twice in one backward; "
                                 "use the lean or reference path")
        if not ctl.backend:
            ctl.backend = mk.select("prox_update_", g, st.delta, st.acc)
        ctl.sums[st.k] = mk.prox_update_(g, st.delta, st.acc, cfg.lr, cfg.soft, cfg.lamb, cfg.prox_mode,
                                         ctl.accumulate and st.acc is not None)
        ctl.done[st.k] = True
        ctl.calls += 1
        st.gbuf = None


class RegenLinear(torch.autograd.Function):
    """``F.linear(x, w̃, bias)`` with w̃ regenerated in the forward and the backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, st: _RegenState, run: _Run):
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
    def forward(ctx, ids: torch.Tensor, anchor: torch.Tensor, st: _RegenState, run: _Run, padding_idx: int,
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


def _regen_forward(module: nn.Module, st: _RegenState, run: _Run, input: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        pad = module.padding_idx if module.padding_idx is not None else -1
        anchor = torch.empty(0, device=st.clean.device, requires_grad=True)
        return RegenEmbedding.apply(input, anchor, st, run, pad, module.scale_grad_by_freq)
    return RegenLinear.apply(input, module.bias, st, run)


def regen_modules(model: nn.Module, named: list[tuple[str, nn.Parameter]] | None = None) -> dict[int, nn.Module]:
    """``id(weight) -> module`` for every plain ``nn.Linear`` and dense ``nn.Embedding`` (no
    ``max_norm``, not sparse) whose weight belongs to that module alone (tied weights, such as an
    lm_head tied to the embeddings, are left to the lean path)."""
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


def moreau_estimate_regen(model: nn.Module, batch: torch.Tensor, config: MoreauConfig | None = None,
                          score: Callable[[str], bool] | Iterable[str] | None = None, progress: bool = True,
                          loss_fn: Callable = lm_loss,
                          on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                          gradient_checkpointing: bool = False) -> MoreauResult:
    """The proximal loop of SPEC §2/§3 (``group='row'``, Philox noise) with regenerated linear weights.

    Same arguments and result as :func:`~moreau_pruner.estimate.lean.moreau_estimate_lean` (identical δ, Ĝ
    and log on the same backend); ``result.path == "regen"``.
    """
    cfg = (config or MoreauConfig()).validate()
    if cfg.group != "row":
        raise ValueError("the regen path implements group='row' only; use path='reference' for group='structure'")
    if cfg.noise != "philox":
        raise ValueError("the regen path regenerates noise from Philox keys; noise='torch' (the published CPU "
                         "generator stream) needs path='reference'")
    named = unique_named_parameters(model)
    if not named:
        raise EstimatorError("the model has no parameters")
    check_finite_weights(named)
    wanted = _score_predicate(score, named)
    linears = regen_modules(model, named)
    grad_flags = [p.requires_grad for _, p in named]
    was_training = model.training
    log: list[dict] = []
    K = min(cfg.avg_last, cfg.iters)
    ctl = _Control(len(named))
    run = _Run(cfg, ctl)
    handles = []
    states: list = []
    patched: list[nn.Linear] = []
    n = batch.shape[0]
    mbs = cfg.micro_batch_size or n
    starts = list(range(0, n, mbs))
    try:
        for i, (nm, p) in enumerate(named):
            if id(p) in linears:
                states.append(_RegenState(nm, p, i, wanted(nm), linears[id(p)], i))
            else:
                states.append(_LeanState(nm, p, i, wanted(nm)))
        lean_states = [st for st in states if isinstance(st, _LeanState)]
        model.eval()
        for st in states:
            st.param.grad = None
            st.param.requires_grad_(isinstance(st, _LeanState))  # regenerated weights stay off the graph
        for k, st in enumerate(states):
            if isinstance(st, _LeanState):
                handles.append(st.param.register_post_accumulate_grad_hook(_make_hook(k, st, ctl, cfg)))
            else:
                st.module.forward = functools.partial(_regen_forward, st.module, st, run)
                patched.append(st.module)
        with activation_checkpointing(model, gradient_checkpointing):
            bar = _progress(range(cfg.iters), progress, "Moreau estimate (regen)")
            sumsq = torch.zeros(len(named), dtype=torch.float64)
            for t in bar:
                t0 = time.perf_counter()
                l2 = 0.5 * float(sumsq.sum()) / cfg.lamb
                loss = 0.0
                ctl.reset(t >= cfg.iters - K)
                for s in range(cfg.n_samples):
                    run.key = t * cfg.n_samples + s
                    _perturb_all(lean_states, cfg, run.key)
                    for st in lean_states:
                        st.param.data = st.work
                    try:
                        for j, start in enumerate(starts):
                            part = batch[start:start + mbs]
                            lv = loss_fn(model, part)
                            if not torch.isfinite(lv):
                                raise EstimatorError(f"the loss is {lv.item()} (non-finite) on calibration rows "
                                                     f"{start}..{start + len(part) - 1}")
                            ctl.last = s == cfg.n_samples - 1 and j == len(starts) - 1
                            (lv * (len(part) / n) * (1.0 / cfg.n_samples)).backward()
                            loss += lv.item() * len(part) / n
                    finally:
                        ctl.last = False
                        for st in lean_states:
                            st.param.data = st.clean
                for k, st in enumerate(states):  # parameters the loss did not reach: zero gradient
                    if not ctl.done[k]:
                        if isinstance(st, _RegenState):
                            g = st.gbuf if st.gbuf is not None else torch.zeros_like(st.param)
                            st.gbuf = None
                        else:
                            g = st.param.grad if st.param.grad is not None else torch.zeros_like(st.param)
                            st.param.grad = None
                        ctl.sums[k] = mk.prox_update_(g, st.delta, st.acc, cfg.lr, cfg.soft, cfg.lamb,
                                                      cfg.prox_mode, ctl.accumulate and st.acc is not None)
                sumsq = sums_to_cpu(ctl.sums)
                log.append(finish_step(t, states, sumsq, loss, l2, t0, on_step, bar))
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
        for st in states:
            st.param.data = st.clean
            if isinstance(st, _LeanState):
                st.work = None
            else:
                st.gbuf = None
        for (_, p), flag in zip(named, grad_flags):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    if not ctl.backend and states:
        st0 = states[0]
        ctl.backend = mk.select("prox_update_", st0.delta, st0.delta, st0.acc)
    grads = {st.name: st.acc.div_(K) for st in states if st.acc is not None}
    result = MoreauResult(grads=grads, log=log, config=cfg, backend=ctl.backend)
    result.path = "regen"
    result.gradient_checkpointing = gradient_checkpointing
    return result
