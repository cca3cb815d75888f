"""Closed-form weight compensation after structured pruning (SPEC §11).

Removing MLP channels or attention heads removes input columns S of ``down_proj`` / ``o_proj``
(W: out × in; K the kept columns). With X the layer's calibration inputs (in × n tokens) and
G = X Xᵀ (fp32, summed over micro-batches and, under FSDP, over ranks), the kept columns that best
reproduce the dense output solve min ‖W X − W'_K X_K‖². With damping λ:

    W'_K = W_K + W_S G[S, K] (G[K, K] + λI)⁻¹                                    (``weights``)

the minimiser of ‖W X − W'_K X_K‖² + λ‖W'_K − W_K‖²: the damping pulls towards the unchanged
weights, so with nothing removed W' = W exactly, whatever λ. At λ = 0 it equals SPEC §11's
W G[:, K] G[K, K]⁻¹; the undamped-form variant W G[:, K] (G[K, K] + λI)⁻¹ would shrink the kept
weights towards zero instead. λ = ``damping`` · mean(diag G[K, K]) (30 % by default; SparseGPT uses 1 %).
The solve is a Cholesky factorisation in float64; when it fails (a singular G[K, K] with
``damping=0``: zero or duplicated input columns) or gives a non-finite or worse-than-nothing
answer, the damping is raised tenfold (from at least 1e-8) until it works, and the damping used
is reported; past :data:`MAX_DAMPING` it is an error naming the layer.

``bias`` is FLAP's bias-only version, the best constant in place of the removed inputs:
b' = b + W_S mean(X_S), kept weights unchanged. ``weights+bias`` fits both at once (least squares
with an intercept): the update above on the centred Gram matrix G − n μμᵀ (μ = mean X), then
b' = b + W μ − W'_K μ_K. Its calibration error is never above either of the others'.

Where the models can take a bias: Llama's config has switches that give o_proj (``attention_bias``,
with q/k/v) and down_proj (``mlp_bias``, with gate/up) a bias; Mistral and Qwen2 build both without
one, whatever the config, so the bias modes refuse them. A bias mode turns the switch on and gives
every linear it covers, in every layer, a bias (zero where nothing is compensated), so the saved
model is what ``from_pretrained`` builds from that config: the per-layer format of
:func:`moreau_pruner.io.pruned.save_pruned` and the stock export of ``--uniform`` both reload it.
Those biases add parameters (per layer: hidden + the kept q/k/v rows for attention, hidden + twice the
kept channels for the MLP), counted in the pruned model's parameters; the report names the switches.

Order (:func:`compensate_model`): the calibration batch enters decoder layer 0 and the layers are
visited in order (:func:`moreau_pruner.model.layerwise.walk_layers`): the dense layer l runs on the
outputs of the already pruned and compensated layers 0..l−1, hooks accumulate the Gram matrices of
the inputs of its o_proj and down_proj, both are compensated, and the layer, now computing what the
pruned layer computes, makes the next layer's inputs. The layer is pruned by zeroing the removed
columns (W' has zeros at S) rather than by reshaping it; the units are removed afterwards, by
index-select (:func:`.plan.apply_plan`), which drops exactly those zero columns. A kept head's output
does not depend on the removed heads, so X_K from the dense layer is the pruned layer's. Memory: the
hidden states of the batch and one layer's Gram matrices (in² floats per compensated linear).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..model.layerwise import run_states, walk_layers
from ..model.structure import ModelStructure
from .plan import LayerPlan

MODES = ("weights", "bias", "weights+bias")
#: the damping fraction past which a failing solve is an error
MAX_DAMPING = 1e4
#: config switches that give o_proj / down_proj a bias, and the linears each switch covers
BIAS_SWITCHES = {"o": ("attention_bias", ("q", "k", "v", "o")), "down": ("mlp_bias", ("gate", "up", "down"))}
#: model types whose config switches add those biases (Mistral and Qwen2 build o_proj/down_proj without one)
BIAS_MODEL_TYPES = ("llama",)
MODULE_NAMES = {"o": "o_proj", "down": "down_proj"}


@dataclass
class CompensateConfig:
    """Weight compensation after structured pruning (module docstring).

    ``mode``: ``weights`` (the least-squares update of the kept columns), ``bias`` (FLAP's
    mean-activation bias) or ``weights+bias`` (both, fitted together). ``damping``: λ as a fraction
    of mean(diag G[K, K]), >= 0 (0.3: chosen on a held-out split of the mixed calibration text for
    SmolLM2 among 0.01-1, ``benchmarks/compensation.py tune``; 0.1 was the best on pydoc's alone;
    SparseGPT uses 0.01). ``micro_batch_size``:
    calibration rows per layer forward. ``batch``: the calibration token ids [rows, tokens] whose
    activations are fitted (None: the batch the units were scored on). Give it thousands of tokens:
    fitted on the 640 tokens of a usual scoring batch the update overfits them and held-out perplexity
    got worse, not better, while 8k tokens (``moreau-prune --compensate``'s default: 64 x 128) carried
    over to held-out text."""

    mode: str = "weights"
    damping: float = 0.3
    micro_batch_size: int | None = None
    batch: torch.Tensor | None = field(default=None, repr=False)

    def validate(self) -> "CompensateConfig":
        if self.mode not in MODES:
            raise ValueError(f"compensation mode must be one of {MODES}, got {self.mode!r}")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"compensation damping must be a finite number >= 0 (a fraction of the mean diagonal "
                             f"of the Gram matrix), got {d!r}")
        m = self.micro_batch_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"compensation micro_batch_size must be a positive integer, got {m!r}")
        if self.batch is not None:
            check_batch(self.batch)
        return self

    def summary(self) -> dict:
        return {"mode": self.mode, "damping": self.damping, "micro_batch_size": self.micro_batch_size}


def check_batch(batch) -> None:
    """Calibration token ids for the Gram matrices: an integer tensor [rows >= 1, tokens >= 1]."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.numel() == 0 or batch.is_floating_point():
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"compensation needs calibration token ids [rows, tokens] (an integer tensor), got {shape}")


def check_bias_support(structure: ModelStructure, mode: str) -> None:
    """The bias modes need o_proj and down_proj to have, or be able to take, a bias (module docstring)."""
    if mode == "weights":
        return
    for kind, (switch, _) in BIAS_SWITCHES.items():
        has = all(getattr(ls, kind).bias is not None for ls in structure.layers)
        if not has and structure.model_type not in BIAS_MODEL_TYPES:
            raise ValueError(f"compensation mode {mode!r} adds a bias to {MODULE_NAMES[kind]}, which a "
                             f"{structure.model_type} model cannot take (its {MODULE_NAMES[kind]} is built without a "
                             f"bias whatever the config; only Llama's '{switch}' switch adds one): use mode 'weights'")


def enable_bias(model: nn.Module, structure: ModelStructure, kind: str) -> str:
    """Turn on the config switch that gives ``kind``'s linear (``o`` or ``down``) a bias and give every
    linear that switch covers, in every layer, a zero bias where it has none; returns the switch's name."""
    switch, kinds = BIAS_SWITCHES[kind]
    setattr(model.config, switch, True)
    for ls in structure.layers:
        for k in kinds:
            lin = getattr(ls, k)
            if lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)
    return switch


# ----------------------------------------------------------------------------- the math
class InputGram:
    """Σ x xᵀ (fp32), Σ x and the number of rows x fed to a Linear (``add``, from a forward pre-hook)."""

    def __init__(self, cols: int, device=None):
        self.gram = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.gram.shape[0]).float()
        self.gram.addmm_(x.T, x)
        self.sum += x.sum(0, dtype=torch.float64)
        self.n += x.shape[0]


@dataclass
class Compensation:
    """One linear's compensation, for the rows of W it was given."""

    weight: torch.Tensor  # [rows, in] float64: the compensated kept columns, zeros at the removed ones
    bias: torch.Tensor | None  # [rows] float64 to add to the bias (None: mode 'weights')
    damping: float  # the fraction used (raised from the configured one when the solve failed)
    energy: float  # ‖W X‖² over these rows
    error_before: float  # ‖W X − W_K X_K‖² (the removed columns simply dropped)
    error_after: float  # ‖W X − W'_K X_K − Δb‖²


def _residual(m: torch.Tensor, gram: torch.Tensor, col_sum: torch.Tensor, n: int, bias: torch.Tensor | None) -> float:
    """‖M X − b 1ᵀ‖² = tr(M G Mᵀ) − 2 bᵀ M Σx + n ‖b‖², from the Gram matrix."""
    e = float(((m @ gram) * m).sum())
    if bias is not None:
        e += -2.0 * float(bias @ (m @ col_sum)) + n * float(bias @ bias)
    return e


def _damped_update(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, damping: float,
                   where: str, reduce: Callable) -> tuple[torch.Tensor, float]:
    """W_K + W_S G[S, K] (G[K, K] + λI)⁻¹ with λ = damping · mean(diag G[K, K]) (Cholesky, float64), the
    damping raised tenfold while the factorisation fails or the answer fits worse than W_K itself
    (which it never does in exact arithmetic: W_K is feasible and the damping only pulls towards it).
    ``reduce`` sums the fit over the processes holding other rows of W, so they all take the same step."""
    w_k, w_s = w[:, keep], w[:, drop]
    g_kk = gram[keep][:, keep]
    scale = float(g_kk.diagonal().mean()) if len(keep) else 0.0
    if scale <= 0:  # no kept input, or all of them zero: no W'_K does better than W_K
        return w_k.clone(), damping
    rhs = (gram[keep][:, drop] @ w_s.T).T  # W_S G[S, K]
    unchanged = float(((w_s @ gram[drop][:, drop]) * w_s).sum())  # the error of W'_K = W_K
    eye = torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    f = damping
    while True:
        chol, info = torch.linalg.cholesky_ex(g_kk + (f * scale) * eye)
        if int(info) == 0:  # the same on every process (the same G)
            z = torch.cholesky_solve(rhs.T, chol).T  # W'_K − W_K
            bad = 0.0 if bool(torch.isfinite(z).all()) else 1.0
            change = float(((z @ g_kk) * z).sum()) - 2.0 * float((z * rhs).sum()) if not bad else 0.0
            bad, change, base = reduce(torch.tensor([bad, change, unchanged], dtype=torch.float64)).tolist()
            if not bad and change <= 1e-6 * base:  # error(W'_K) − error(W_K), over all rows
                return w_k + z, f
        f = max(10 * f, 1e-8)
        if f > MAX_DAMPING:
            raise ValueError(f"{where}: the damped least-squares solve failed up to damping {MAX_DAMPING:g} (is the "
                             "calibration input finite?)")


def compensate_linear(weight: torch.Tensor, gram: torch.Tensor, col_sum: torch.Tensor, n: int, keep: torch.Tensor,
                      mode: str = "weights", damping: float = 0.01, where: str = "linear",
                      reduce: Callable | None = None) -> Compensation:
    """The compensation of a Linear with weight rows ``weight`` [rows, in] whose input columns ``keep``
    stay, from its inputs' Gram matrix ``gram`` = Σ x xᵀ [in, in], their sum ``col_sum`` [in] and count
    ``n`` (module docstring). ``where`` names the linear in errors. ``reduce`` sums a tensor over the
    processes that hold the other rows of W (FSDP; default: these are all the rows)."""
    if n < 1:
        raise ValueError(f"{where}: no calibration tokens reached it")
    w = weight.detach().double()
    g = gram.detach().double()
    s = col_sum.detach().double()
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(s).all())):
        raise ValueError(f"{where}: the Gram matrix of its calibration inputs is not finite")
    keep = keep.to(device=w.device, dtype=torch.long)
    mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    mask[keep] = False
    drop = mask.nonzero().squeeze(1)
    used = damping
    if mode == "bias":
        v = w[:, keep]
    else:
        fit = g - torch.outer(s, s) / n if mode == "weights+bias" else g
        v, used = _damped_update(w, fit, keep, drop, damping, where, reduce or (lambda t: t))
    new = torch.zeros_like(w)
    new[:, keep] = v
    mu = s / n
    bias = (w @ mu - v @ mu[keep]) if mode != "weights" else None
    return Compensation(new, bias, used, energy=_residual(w, g, s, n, None),
                        error_before=_residual(w[:, drop], g[drop][:, drop], s[drop], n, None),
                        error_after=_residual(w - new, g, s, n, bias))


# ----------------------------------------------------------------------------- which columns stay
def kept_columns(ls, plan: LayerPlan) -> dict[str, torch.Tensor]:
    """{'o': kept o_proj input columns, 'down': kept down_proj input columns} of the linears ``plan``
    removes columns from (as :func:`.plan.apply_plan` removes them)."""
    out = {}
    d, n_rep = ls.head_dim, ls.n_rep
    heads = None
    if plan.kv_keep is not None and len(plan.kv_keep) < ls.n_kv_heads:
        heads = [g * n_rep + j for g in plan.kv_keep for j in range(n_rep)]
    elif plan.q_keep is not None and len(plan.q_keep[0]) < n_rep:
        heads = [g * n_rep + j for g, keep in enumerate(plan.q_keep) for j in keep]
    if heads is not None:
        out["o"] = (torch.tensor(heads, dtype=torch.long)[:, None] * d + torch.arange(d)).reshape(-1)
    if plan.mlp_keep is not None and len(plan.mlp_keep) < ls.intermediate_size:
        out["down"] = torch.tensor(plan.mlp_keep, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- the layer walk
class OneProcess:
    """Where :func:`compensate_model` reads and writes: the whole model in this process. The FSDP2
    path (:mod:`moreau_pruner.distributed.compensate`) sums over ranks and updates each rank's rows."""

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the processes holding calibration rows (here: one)."""
        return t

    def rows(self, lin: nn.Linear) -> torch.Tensor:
        """The rows of ``lin.weight`` this process updates."""
        return lin.weight.data

    def add_bias(self, model: nn.Module, structure: ModelStructure, ls, kind: str, delta: torch.Tensor) -> str | None:
        """Add ``delta`` (for :meth:`rows`' rows) to ``kind``'s bias in layer ``ls``; returns the config
        switch this turned on (None when the linear had a bias)."""
        lin = getattr(ls, kind)
        switch = enable_bias(model, structure, kind) if lin.bias is None else None
        lin.bias.data += delta.to(lin.bias.dtype)
        return switch


def compensate_model(structure: ModelStructure, plans: list[LayerPlan], batch: torch.Tensor,
                     cfg: CompensateConfig, progress: bool = False, ranks: OneProcess | None = None) -> dict:
    """Compensate o_proj and down_proj of every layer ``plans`` removes units from, layer by layer
    (module docstring), on ``batch`` (token ids [rows, tokens]; under FSDP this rank's rows). The
    removed columns are left at zero; :func:`.plan.apply_plan` removes them afterwards. Returns the
    report: per compensated linear the removed/kept columns, the damping used and the relative
    calibration errors ‖W X − W'X‖² / ‖W X‖² before (columns dropped) and after compensation."""
    cfg = cfg.validate()
    ranks = ranks or OneProcess()
    check_batch(batch)
    check_bias_support(structure, cfg.mode)
    t0 = time.perf_counter()
    model = structure.model
    targets = {ls.index: kept_columns(ls, plan) for ls, plan in zip(structure.layers, plans)}
    targets = {i: t for i, t in targets.items() if t}
    rows: list[dict] = []
    switches: set[str] = set()
    bar = _progress(len(targets), progress)

    def visit(ls, states):
        cols = targets.get(ls.index)
        if not cols:
            return
        stats = {kind: InputGram(getattr(ls, kind).in_features, getattr(ls, kind).weight.device) for kind in cols}
        hooks = [getattr(ls, kind).register_forward_pre_hook(_accumulate(stats[kind])) for kind in cols]
        try:
            run_states(ls.layer, states)
        finally:
            for h in hooks:
                h.remove()
        for kind, keep in cols.items():
            rows.append(_compensate_one(model, structure, ls, kind, keep, stats.pop(kind), cfg, ranks, switches))
        if bar is not None:
            bar.update(1)

    try:
        if targets:
            walk_layers(model, batch, structure, visit, cfg.micro_batch_size, last=max(targets))
    finally:
        if bar is not None:
            bar.close()
    n_tokens = int(ranks.reduce(torch.tensor([batch.numel()], dtype=torch.float64))[0])
    return {**cfg.summary(), "tokens": n_tokens, "bias_switches": sorted(switches), "layers": rows,
            "max_damping_used": max((r["damping"] for r in rows), default=cfg.damping),
            "error_before_mean": _mean(r["error_before"] for r in rows),
            "error_after_mean": _mean(r["error_after"] for r in rows),
            "seconds": time.perf_counter() - t0}


def _compensate_one(model, structure, ls, kind, keep, stats: InputGram, cfg, ranks, switches: set) -> dict:
    """Solve, write the rows (and the bias) of ``kind``'s linear in layer ``ls``; its report row."""
    lin = getattr(ls, kind)
    gram, col_sum = ranks.reduce(stats.gram), ranks.reduce(stats.sum)
    n = int(ranks.reduce(torch.tensor([stats.n], dtype=torch.float64))[0])
    where = f"layer {ls.index} {MODULE_NAMES[kind]}"
    w = ranks.rows(lin)
    c = compensate_linear(w, gram, col_sum, n, keep, cfg.mode, cfg.damping, where, ranks.reduce)
    w.copy_(c.weight.to(w.dtype))
    if c.bias is not None:
        switch = ranks.add_bias(model, structure, ls, kind, c.bias)
        if switch:
            switches.add(switch)
    energy, before, after = ranks.reduce(torch.tensor([c.energy, c.error_before, c.error_after],
                                                      dtype=torch.float64)).tolist()
    rel = (lambda e: e / energy) if energy > 0 else (lambda e: 0.0)
    return {"layer": ls.index, "module": MODULE_NAMES[kind], "removed": lin.in_features - len(keep),
            "kept": len(keep), "damping": c.damping, "error_before": rel(before), "error_after": rel(after)}


def _accumulate(stats: InputGram):
    def hook(_mod, args):
        stats.add(args[0])
    return hook


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _progress(total: int, enabled: bool):
    if not enabled or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compensation", unit="layer")


def compensator(structure: ModelStructure, cfg: CompensateConfig, batch: torch.Tensor | None,
                progress: bool = False) -> Callable[[ModelStructure, list[LayerPlan]], dict]:
    """``prune_structure``'s ``compensate`` callable for ``cfg``, checked now (before any scoring):
    the config, the batch (``cfg.batch``, else ``batch``, the scoring batch) and the bias support."""
    cfg = cfg.validate()
    tokens = cfg.batch if cfg.batch is not None else batch
    if tokens is None:
        raise ValueError("compensation needs a calibration batch (the activations it fits): pass one, or set "
                         "CompensateConfig.batch")
    check_batch(tokens)
    check_bias_support(structure, cfg.mode)

    def run(s: ModelStructure, plans: list[LayerPlan]) -> dict:
        return compensate_model(s, plans, tokens, cfg, progress)

    return run


def merge_reports(reports: list[dict | None]) -> dict | None:
    """One compensation report for several pruning rounds: the rows of every round (tagged ``round``),
    the summary fields of the first, the sums of tokens and seconds, the bias switches turned on."""
    got = [(k, r) for k, r in enumerate(reports, 1) if r is not None]
    if not got:
        return None
    if len(got) == 1 and len(reports) == 1:
        return got[0][1]
    rows = [{**row, "round": k} for k, r in got for row in r["layers"]]
    first = got[0][1]
    return {**first, "layers": rows, "rounds": len(reports),
            "bias_switches": sorted({s for _, r in got for s in r["bias_switches"]}),
            "seconds": sum(r["seconds"] for _, r in got),
            "max_damping_used": max(r["max_damping_used"] for _, r in got),
            "error_before_mean": _mean(row["error_before"] for row in rows),
            "error_after_mean": _mean(row["error_after"] for row in rows)}
