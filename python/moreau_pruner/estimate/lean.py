"""The lean Moreau estimate and memory planning.

:func:`moreau_estimate_lean` computes exactly what :func:`moreau_pruner.estimate.estimator.moreau_estimate`
computes for ``group="row"`` with Philox noise (SPEC §2 and §3), with less memory:

* one work buffer per parameter (the perturbed weight, in the weight's dtype) allocated once and
  refilled every step by ``moreau_kernels.perturb_multi`` (one grouped launch per device/dtype on
  the fused backends); the clean tensor is kept aside and put back by swapping ``param.data``, so
  the weights are never copied and are bit-identical afterwards;
* gradients are consumed as they are produced: a ``register_post_accumulate_grad_hook`` on every
  parameter runs ``moreau_kernels.prox_update_`` as soon as the parameter's gradient of the step is
  complete and frees ``param.grad`` at once, so with one micro-batch and one noise sample no
  full-model gradient buffer ever exists. With micro-batches or ``n_samples > 1`` the hooks only
  act on the last backward of the step (before that ``.grad`` accumulates normally, which does hold
  every gradient until the last backward: the plan of :func:`plan_memory` says so);
* acc exists only for scored tensors; Σδ² for the ``l2`` log comes from the op's return value;
* optional activation checkpointing (``gradient_checkpointing=True``, HF models).

:func:`estimate` picks the lean path when it applies and the reference path otherwise and
records which ran in ``result.path``. :func:`plan_memory` / :func:`check_fits` estimate the peak
memory of either path from parameter shapes (a ``meta``-device model is enough) and say what to
change when it does not fit; ``python -m moreau_pruner.estimate.lean --plan llama-7b --tokens 640`` prints
the plan of a LLaMA-7B-shaped estimate without materialising the model.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

import moreau_kernels as mk

from .estimator import (EstimatorError, MoreauConfig, MoreauResult, _progress, check_finite_weights, finish_step,
                        lm_loss, moreau_estimate, sums_to_cpu, unique_named_parameters)

PATHS = ("auto", "reference", "lean", "regen")
GiB = 1024 ** 3


# ============================================================================ the lean estimate
def _score_predicate(score, named) -> Callable[[str], bool]:
    if callable(score):
        return score
    if score is None:
        return lambda name: True  # noqa: E731
    names = set(score)
    unknown = names - {n for n, _ in named}
    if unknown:
        raise ValueError(f"unknown parameter names to score: {sorted(unknown)[:5]}")
    return names.__contains__


class _LeanState:
    __slots__ = ("name", "param", "index", "clean", "work", "delta", "acc")

    def __init__(self, name: str, param: nn.Parameter, index: int, scored: bool):
        self.name, self.param, self.index = name, param, index
        self.clean = param.data  # the original tensor object, put back after every forward/backward
        self.work = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        self.delta = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        self.acc = torch.zeros_like(self.delta) if scored else None


class _Control:
    """What the gradient hooks read: whether this backward is the step's last, and their output."""

    def __init__(self, n: int):
        self.last = False
        self.accumulate = False
        self.done = [False] * n
        self.sums: list[torch.Tensor | None] = [None] * n
        self.backend = ""
        self.calls = 0  # hook calls that ran an update (tests check: one per parameter per step)

    def reset(self, accumulate: bool) -> None:
        self.last = False
        self.accumulate = accumulate
        self.done = [False] * len(self.done)
        self.sums = [None] * len(self.sums)


def _make_hook(k: int, st: _LeanState, ctl: _Control, cfg: MoreauConfig):
    def hook(param: torch.Tensor) -> None:
        if not ctl.last:  # an earlier micro-batch / sample: let .grad accumulate
            return
        if ctl.done[k]:
            raise EstimatorError(
                f"parameter {st.name} received its gradient twice in one backward (a parameter used in "
                "several reentrant-checkpointed segments?); use the reference path")
        g = param.grad
        if g is None:
            return
        if not ctl.backend:
            ctl.backend = mk.select("prox_update_", g, st.delta, st.acc)
        ctl.sums[k] = mk.prox_update_(g, st.delta, st.acc, cfg.lr, cfg.soft, cfg.lamb, cfg.prox_mode,
                                      ctl.accumulate and st.acc is not None)
        ctl.done[k] = True
        ctl.calls += 1
        param.grad = None  # consumed: no full-model gradient buffer
    return hook


def _perturb_all(states: list[_LeanState], cfg: MoreauConfig, key: int) -> None:
    """Fill every work buffer with w + ξ|c·w| + δ: grouped launches per (device, dtype)."""
    groups: dict[tuple, list[_LeanState]] = {}
    for st in states:
        if st.clean.is_contiguous():
            groups.setdefault((st.clean.device, st.clean.dtype), []).append(st)
        else:  # perturb_multi needs contiguous weights; perturb_out copies
            mk.perturb_out(st.clean, st.delta, None, st.work, cfg.std, cfg.seed, key, st.index)
    for members in groups.values():
        mk.perturb_multi([st.clean for st in members], [st.delta for st in members], [st.work for st in members],
                         cfg.std, cfg.seed, key, [st.index for st in members])


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """Enable HF activation checkpointing (non-reentrant) for the block; restore it afterwards.

    HF layers checkpoint only in training mode, so the checkpointed layers (and only they, not
    their sub-modules: no dropout is switched on) get ``training=True``; the caller's
    ``model.train(was_training)`` resets the flags.
    """
    if not enabled:
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable",
                                                                               None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing=True needs a Hugging Face model that supports it; "
                         f"{type(model).__name__} does not")
    was_on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    had_input_hook = hasattr(model, "_require_grads_hook")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enable.__name__ == "activation_checkpointing_enable":
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True
        yield
    finally:
        if not was_on:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                disable()
            if not had_input_hook and hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()


def moreau_estimate_lean(model: nn.Module, batch: torch.Tensor, config: MoreauConfig | None = None,
                         score: Callable[[str], bool] | Iterable[str] | None = None, progress: bool = True,
                         loss_fn: Callable = lm_loss,
                         on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                         gradient_checkpointing: bool = False) -> MoreauResult:
    """The proximal loop of SPEC §2/§3 (``group='row'``, Philox noise) with lean memory.

    Same arguments and result as :func:`~moreau_pruner.estimate.estimator.moreau_estimate` (the log, δ and
    Ĝ are identical on the same backend); ``result.path == "lean"``.
    """
    cfg = (config or MoreauConfig()).validate()
    if cfg.group != "row":
        raise ValueError("the lean path implements group='row' only; use path='reference' for group='structure'")
    if cfg.noise != "philox":
        raise ValueError("the lean path regenerates noise from Philox keys; noise='torch' (the published CPU "
                         "generator stream) needs path='reference'")
    named = unique_named_parameters(model)
    if not named:
        raise EstimatorError("the model has no parameters")
    check_finite_weights(named)
    wanted = _score_predicate(score, named)
    grad_flags = [p.requires_grad for _, p in named]
    was_training = model.training
    log: list[dict] = []
    K = min(cfg.avg_last, cfg.iters)
    sumsq = torch.zeros(len(named), dtype=torch.float64)
    ctl = _Control(len(named))
    handles = []
    states: list[_LeanState] = []
    n = batch.shape[0]
    mbs = cfg.micro_batch_size or n
    starts = list(range(0, n, mbs))
    try:
        states = [_LeanState(nm, p, i, wanted(nm)) for i, (nm, p) in enumerate(named)]
        model.eval()
        for _, p in named:
            p.requires_grad_(True)
            p.grad = None
        for k, st in enumerate(states):
            handles.append(st.param.register_post_accumulate_grad_hook(_make_hook(k, st, ctl, cfg)))
        with activation_checkpointing(model, gradient_checkpointing):
            bar = _progress(range(cfg.iters), progress, "Moreau estimate (lean)")
            for t in bar:
                t0 = time.perf_counter()
                l2 = 0.5 * float(sumsq.sum()) / cfg.lamb
                loss = 0.0
                ctl.reset(t >= cfg.iters - K)
                for s in range(cfg.n_samples):
                    _perturb_all(states, cfg, t * cfg.n_samples + s)
                    for st in states:
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
                        for st in states:  # the original tensor objects: exact restore
                            st.param.data = st.clean
                for k, st in enumerate(states):  # parameters whose hook did not run (unused by the loss)
                    if not ctl.done[k]:
                        g = st.param.grad if st.param.grad is not None else torch.zeros_like(st.param)
                        ctl.sums[k] = mk.prox_update_(g, st.delta, st.acc, cfg.lr, cfg.soft, cfg.lamb,
                                                      cfg.prox_mode, ctl.accumulate and st.acc is not None)
                        st.param.grad = None
                sumsq = sums_to_cpu(ctl.sums)
                log.append(finish_step(t, states, sumsq, loss, l2, t0, on_step, bar))
    finally:
        for h in handles:
            h.remove()
        for st in states:
            st.param.data = st.clean
            st.work = None
        for (_, p), flag in zip(named, grad_flags):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    if not ctl.backend and states:
        st0 = states[0]
        ctl.backend = mk.select("prox_update_", st0.delta, st0.delta, st0.acc)
    grads = {st.name: st.acc.div_(K) for st in states if st.acc is not None}
    result = MoreauResult(grads=grads, log=log, config=cfg, backend=ctl.backend)
    result.path = "lean"
    result.gradient_checkpointing = gradient_checkpointing
    return result


def lean_applies(config: MoreauConfig) -> list[str]:
    """Reasons the lean path cannot run ``config`` (empty when it can)."""
    out = []
    if config.group != "row":
        out.append(f"group={config.group!r} (lean implements 'row')")
    if config.noise != "philox":
        out.append(f"noise={config.noise!r} (lean regenerates Philox noise)")
    return out


def estimate(model: nn.Module, batch: torch.Tensor, config: MoreauConfig | None = None, path: str = "auto",
             score: Callable[[str], bool] | Iterable[str] | None = None, progress: bool = True,
             loss_fn: Callable = lm_loss, structure=None,
             on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
             gradient_checkpointing: bool = False, check_memory: bool = False) -> MoreauResult:
    """The Moreau estimate on the lean path when it applies (``group='row'``, Philox noise), else
    the reference path; ``path`` forces one. ``result.path`` says which ran.

    ``path="regen"`` (:mod:`moreau_pruner.estimate.regen`) is the lean path without the perturbed copy of the
    linear weights (regenerated inside their forward and backward): the least memory, the same
    δ and Ĝ, one more perturb of each linear weight per backward.

    ``check_memory=True`` plans the peak memory first and raises :class:`MemoryPlanError` with
    advice when it does not fit the free memory of the model's device.
    """
    cfg = (config or MoreauConfig()).validate()
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    why = lean_applies(cfg)
    if path == "auto":
        path = "reference" if why else "lean"
    elif path in ("lean", "regen") and why:
        raise ValueError(f"the {path} path cannot run this configuration: {'; '.join(why)}; use path='reference'")
    if path == "reference" and gradient_checkpointing:
        raise ValueError("gradient_checkpointing is offered on the lean and regen paths only (the reference path "
                         "runs the model in eval mode, where HF layers do not checkpoint)")
    if check_memory:
        dev = next(model.parameters()).device
        plan = plan_memory(model, tuple(batch.shape), cfg, path, dev, score=score,
                           gradient_checkpointing=gradient_checkpointing)
        check_fits(plan, dev, weights_loaded=True)
    if path == "regen":
        from .regen import moreau_estimate_regen

        return moreau_estimate_regen(model, batch, cfg, score=score, progress=progress, loss_fn=loss_fn,
                                     on_step=on_step, gradient_checkpointing=gradient_checkpointing)
    if path == "lean":
        return moreau_estimate_lean(model, batch, cfg, score=score, progress=progress, loss_fn=loss_fn,
                                    on_step=on_step, gradient_checkpointing=gradient_checkpointing)
    result = moreau_estimate(model, batch, cfg, score=score, progress=progress, loss_fn=loss_fn,
                             structure=structure, on_step=on_step)
    result.path = "reference"
    result.gradient_checkpointing = False
    return result


# ============================================================================ memory planning
# Activation model (bytes = elements x activation element size), per decoder layer and token:
#   ACT_HIDDEN x hidden + ACT_INTERMEDIATE x intermediate elements saved for backward:
#   two RMSNorms (input, fp32 upcast, output: ~3h each), q/k/v/o inputs and outputs with rotary
#   (~6h), SDPA inputs/output (~4h): ~16h; MLP gate/up outputs, SiLU input/output, product: ~5i.
# Eager attention adds the softmax probabilities: heads x seq per token (x2 with its input).
# Logits: tokens x vocab x (activation size + 12): the fp32 upcast, log-softmax and its gradient.
# With checkpointing only each layer's input (hidden per token) is kept, plus one layer recomputed.
# This is an estimate to decide "fits / does not fit", not an allocator model; the CUDA plan adds
# a fixed reserve for the context and allocator fragmentation.
ACT_HIDDEN = 16
ACT_INTERMEDIATE = 5
LOGIT_EXTRA_BYTES = 12
CUDA_RESERVE = int(1.5 * GiB)
GRAD_LIVE_TENSORS = 3  # lean path, one backward per step: gradients alive at once (the largest ones)


class MemoryPlanError(MemoryError):
    """The planned peak memory does not fit the free memory of the device."""


@dataclass
class MemoryPlan:
    """Planned peak bytes of one estimate, by component (``items``), with the assumptions made."""

    path: str
    device: str
    items: dict[str, int]
    notes: list[str] = field(default_factory=list)
    n_params: int = 0
    n_scored: int = 0
    tokens: int = 0
    overlap: int = 0  # bytes of gradients and activations that need not coexist (see notes)

    @property
    def total(self) -> int:
        """Planned peak (an upper bound: every item counted as live at once)."""
        return int(sum(self.items.values()))

    @property
    def lower_total(self) -> int:
        """Peak when all-gradient buffers only replace activations already freed."""
        return self.total - self.overlap

    def format(self) -> str:
        w = max(len(k) for k in self.items)
        lines = [f"{self.path} path on {self.device}: {self.n_params / 1e9:.3f}e9 parameters, "
                 f"{self.n_scored / 1e9:.3f}e9 scored, {self.tokens} tokens per backward"]
        for k, v in self.items.items():
            lines.append(f"  {k:<{w}}  {v / GiB:9.2f} GiB")
        lines.append(f"  {'total':<{w}}  {self.total / GiB:9.2f} GiB  ({self.total / 1e9:.1f} GB)")
        lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def _hf_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return getattr(cfg, "text_config", None) if getattr(cfg, "hidden_size", None) is None else cfg


def activation_bytes(model: nn.Module, rows: int, seq: int, act_dtype: torch.dtype,
                     gradient_checkpointing: bool = False) -> tuple[int, str]:
    """Rough activation bytes of one forward+backward on ``rows x seq`` tokens (see the model above)."""
    c = _hf_config(model)
    if c is None or getattr(c, "hidden_size", None) is None:
        return 0, "activations not estimated (no Hugging Face config)"
    b = torch.empty((), dtype=act_dtype).element_size()
    h, L = c.hidden_size, c.num_hidden_layers
    inter = getattr(c, "intermediate_size", 4 * h)
    heads = getattr(c, "num_attention_heads", 1)
    vocab = getattr(c, "vocab_size", 0)
    tokens = rows * seq
    eager = getattr(c, "_attn_implementation", None) in (None, "eager")
    per_layer = tokens * b * (ACT_HIDDEN * h + ACT_INTERMEDIATE * inter)
    if eager:
        per_layer += tokens * b * 2 * heads * seq
    logits = tokens * vocab * (b + LOGIT_EXTRA_BYTES)
    if gradient_checkpointing:
        total = L * tokens * h * b + per_layer + logits
        how = "checkpointed: layer inputs + one layer recomputed"
    else:
        total = L * per_layer + logits
        how = f"{L} layers x {tokens} tokens x ({ACT_HIDDEN}h+{ACT_INTERMEDIATE}i) x {b} B"
    how += (", eager attention probabilities" if eager else "") + ", logits"
    return int(total), how


def plan_memory(model: nn.Module, batch_shape: tuple[int, int], config: MoreauConfig | None, path: str,
                device: str | torch.device | None = None,
                score: Callable[[str], bool] | Iterable[str] | None = None, gradient_checkpointing: bool = False,
                fused: bool | None = None) -> MemoryPlan:
    """Planned peak bytes of an estimate of ``model`` (may live on the ``meta`` device).

    ``path``: ``lean``, ``regen`` (lean without the perturbed copy of the linear weights),
    ``reference`` (this package's reference path), ``published`` (the original code: w, grad, δ,
    noise, acc for every parameter in fp32) or ``auto``. ``fused``: the
    ops run on a fused backend (no per-tensor fp32 temporaries); default: True on CUDA, else
    whether the native CPU extension is loaded.
    """
    cfg = (config or MoreauConfig()).validate()
    if path == "auto":
        path = "reference" if lean_applies(cfg) else "lean"
    if path not in ("lean", "regen", "reference", "published"):
        raise ValueError(f"path must be lean, regen, reference, published or auto, got {path!r}")
    named = unique_named_parameters(model)
    wanted = _score_predicate(score, named)
    dev = torch.device(device) if device is not None else (named[0][1].device if named else torch.device("cpu"))
    if fused is None:
        if dev.type == "cuda":
            fused = True
        else:
            from moreau_kernels import _native
            fused = not _native.load_error()
    numels = [p.numel() for _, p in named]
    wbytes = [p.numel() * p.element_size() for _, p in named]
    n_params = sum(numels)
    n_scored = sum(p.numel() for nm, p in named if wanted(nm))
    largest = max(numels) if numels else 0
    rows, seq = batch_shape
    mrows = min(rows, cfg.micro_batch_size or rows)
    n_backward = math.ceil(rows / mrows) * cfg.n_samples
    dtypes = [p.dtype for _, p in named if p.is_floating_point()]
    act_dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    items: dict[str, int] = {}
    notes: list[str] = []
    W = sum(wbytes)
    if path == "published":
        items["weights (fp32)"] = 4 * n_params
        items["grad (fp32)"] = 4 * n_params
        items["delta (fp32)"] = 4 * n_params
        items["noise (fp32)"] = 4 * n_params
        items["acc (fp32)"] = 4 * n_params
        notes.append("published code: 5 fp32 copies of every parameter (SPEC §8)")
        act_dtype = torch.float32
    elif path == "regen":
        from .regen import regen_modules

        lin = regen_modules(model, named)
        small = [b for (_, p), b in zip(named, wbytes) if id(p) not in lin]
        big = [b for (_, p), b in zip(named, wbytes) if id(p) in lin]
        items["weights"] = W
        items["work buffers (parameters not regenerated)"] = sum(small)
        items["delta (fp32)"] = 4 * n_params
        items["acc (fp32, scored)"] = 4 * n_scored
        items["transient perturbed weight + its gradient (largest regenerated)"] = 2 * max(big, default=0)
        if n_backward > 1:
            items["gradient partial sums (all)"] = W
            notes.append(f"{n_backward} backward passes per step (micro-batches x samples): the partial "
                         "gradients are held until the last one")
        else:
            items[f"gradients of parameters not regenerated (largest {GRAD_LIVE_TENSORS})"] = \
                sum(sorted(small)[-GRAD_LIVE_TENSORS:])
        if not fused:
            items["op temporaries (fp32, largest tensor)"] = 4 * 4 * largest
            notes.append("pure-PyTorch ops: ~4 fp32 temporaries of the largest tensor")
        notes.append(f"regen: {len(lin)} linear / embedding weights regenerated in forward and backward, never stored")
    else:
        items["weights"] = W
        items["perturbed weights" if path == "reference" else "work buffers"] = W
        items["delta (fp32)"] = 4 * n_params
        items["acc (fp32, scored)"] = 4 * n_scored
        if path == "reference" or n_backward > 1:
            items["gradients (all)"] = W
            if path == "lean":
                notes.append(f"{n_backward} backward passes per step (micro-batches x samples): every gradient "
                             "is held until the last one; one backward per step frees them as they come")
        else:
            items[f"gradients (largest {GRAD_LIVE_TENSORS})"] = sum(sorted(wbytes)[-GRAD_LIVE_TENSORS:])
        if path == "reference" and cfg.noise == "torch":
            items["noise (fp32, largest tensor)"] = 4 * largest
        if not fused:
            items["op temporaries (fp32, largest tensor)"] = 4 * 4 * largest
            notes.append("pure-PyTorch ops: ~4 fp32 temporaries of the largest tensor")
    act, how = activation_bytes(model, mrows, seq, act_dtype, gradient_checkpointing and path in ("lean", "regen"))
    items["activations"] = act
    notes.append(f"activations: {how}")
    if dev.type == "cuda":
        items["CUDA context + allocator reserve"] = CUDA_RESERVE
    overlap = 0
    grads_all = items.get("gradients (all)", items.get("grad (fp32)", items.get("gradient partial sums (all)", 0)))
    if grads_all:
        overlap = min(grads_all, act)
        notes.append(f"the backward frees activations while the gradients grow: the peak lies between "
                     f"total - {overlap / GiB:.2f} GiB and the total (an upper bound)")
    return MemoryPlan(path=path, device=str(dev), items=items, notes=notes, n_params=n_params, n_scored=n_scored,
                      tokens=mrows * seq, overlap=overlap)


def free_bytes(device: str | torch.device) -> int:
    """Free memory now: ``torch.cuda.mem_get_info`` on a GPU, MemAvailable on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(plan: MemoryPlan, device: str | torch.device | None = None, available: int | None = None,
               weights_loaded: bool = False) -> int:
    """Raise :class:`MemoryPlanError` when ``plan`` needs more than the free memory; return the margin.

    ``available``: bytes to plan against (default: :func:`free_bytes` of ``device``).
    ``weights_loaded``: the model already sits on the device, so its weights are not part of the
    free figure and are not counted again.
    """
    dev = torch.device(device if device is not None else plan.device)
    free = free_bytes(dev) if available is None else int(available)
    need = plan.total
    if weights_loaded:
        need -= plan.items.get("weights", 0)
    if need <= free:
        return free - need
    advice = []
    if plan.path != "lean":
        advice.append("the lean path (path='lean': gradients freed as they are produced)")
    if "gradients (all)" in plan.items and plan.path == "lean":
        advice.append("one backward per step (micro_batch_size=None, n_samples=1) frees gradients as they come")
    act = plan.items.get("activations", 0)
    advice.append(f"a smaller micro_batch_size, or gradient_checkpointing=True on the lean path (activations: "
                  f"{act / GiB:.2f} GiB)")
    if plan.items.get("acc (fp32, scored)", 0):
        advice.append("scoring fewer layers (score=...; only pruned layers need an accumulator)")
    advice.append("bf16 weights (dtype='bfloat16': halves weights, work buffers and gradients; δ stays fp32)")
    raise MemoryPlanError(
        f"the {plan.path} Moreau estimate needs about {need / GiB:.2f} GiB on {dev} but only "
        f"{free / GiB:.2f} GiB is free.\n{plan.format()}\nTo reduce it: " + "; ".join(advice) + ".")


# ============================================================================ named shapes / CLI
SHAPES = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
PUBLISHED_LAYERS = {"llama-7b": (4, 30), "llama-3-8b": (4, 30), "smollm2-135m": (4, 28)}


def meta_model(name: str, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa"):
    """A LLaMA-shaped model on the ``meta`` device (no memory), for planning."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    cfg = LlamaConfig(**SHAPES[name])
    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def layer_score(first: int, stop: int) -> Callable[[str], bool]:
    """Score the attention and MLP projection weights of layers first..stop-1 (what pruning reads)."""
    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def wanted(name: str) -> bool:
        parts = name.split(".")
        if "layers" not in parts or not name.endswith(".weight"):
            return False
        i = parts.index("layers")
        return first <= int(parts[i + 1]) < stop and parts[-2] in projs
    return wanted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moreau_pruner.estimate.lean",
                                 description="Print the planned peak memory of a Moreau estimate without "
                                             "materialising the model.")
    ap.add_argument("--plan", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=640, help="calibration tokens (rows x seq; seq=--seq)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda", help="cuda (adds the context reserve) or cpu")
    ap.add_argument("--score", default="published",
                    help="'published' (the pruned layers only), 'all', or FIRST-LAST (inclusive layer range)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (lean path)")
    ap.add_argument("--budget-gib", type=float, default=79.2,
                    help="memory to compare against, GiB (default 79.2: what an 80 GB H100/A100 reports as total)")
    args = ap.parse_args(argv)
    model = meta_model(args.plan, getattr(torch, args.dtype))
    if args.score == "all":
        score = None
    elif args.score == "published":
        score = layer_score(*PUBLISHED_LAYERS[args.plan])
    else:
        a, b = args.score.split("-")
        score = layer_score(int(a), int(b) + 1)
    rows = max(1, args.tokens // args.seq)
    cfg = MoreauConfig(micro_batch_size=args.micro_batch_size)
    budget = int(args.budget_gib * GiB)
    for path in ("lean", "reference", "published"):
        plan = plan_memory(model, (rows, args.seq), cfg, path, args.device, score=score,
                           gradient_checkpointing=args.checkpointing, fused=True)
        fits = plan.total <= budget
        print(plan.format())
        if plan.overlap:
            print(f"  lower bound {plan.lower_total / GiB:.2f} GiB: "
                  f"{'fits' if plan.lower_total <= budget else 'does NOT fit either'}")
        print(f"  => {'fits' if fits else 'does NOT fit'} in {args.budget_gib:g} GiB "
              f"(margin {(budget - plan.total) / GiB:+.2f} GiB)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
