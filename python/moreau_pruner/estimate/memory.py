"""Memory plans of a one-process Moreau estimate, from parameter shapes (a ``meta`` model is enough).

:func:`plan_memory` adds up the peak bytes of an estimate on the ``lean``, ``regen`` or
``reference`` strategy (or the published code's pattern) by component, :func:`check_fits`
compares a plan with the free memory of the device and says what to change when it does not fit
(``estimate(..., check_memory=True)`` runs both before any work). The per-rank plans of FSDP2 and
the planning CLI are in :mod:`moreau_pruner.estimate.plans`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .config import MoreauConfig
from .params import score_predicate, unique_named_parameters
from .strategies.base import refusals
from .strategies.regen import regen_modules

GiB = 1024 ** 3

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
    cfg = config or MoreauConfig()
    if path == "auto":
        path = "reference" if refusals("lean", cfg) else "lean"
    if path not in ("lean", "regen", "reference", "published"):
        raise ValueError(f"path must be lean, regen, reference, published or auto, got {path!r}")
    named = unique_named_parameters(model)
    wanted = score_predicate(score, named)
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
        advice.append("the lean path (strategy='lean': gradients freed as they are produced)")
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
