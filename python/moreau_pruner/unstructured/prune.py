"""Unstructured and N:M pruning: the model keeps its shapes, pruned weights become zeros.

One estimator, two consumers: the Moreau metric reads the same Ĝ as the structured path
(:func:`moreau_pruner.estimate.estimate`, called unchanged, with the memory strategy picked as
there: ``lean`` when it applies), so the two paths differ only in what they do with it.

Metrics (per weight W_ij of a Linear with output row i and input column j):

``moreau``     |Ĝ_ij · W_ij| (the published ``moreaupruner_us.py``).
``taylor``     |g_ij · W_ij|, g the plain gradient of the calibration loss (first-order Taylor, the
               baseline that tells what the Moreau estimate changes).
``magnitude``  |W_ij|.
``wanda``      |W_ij| · ‖X_j‖₂ (Sun et al., 2023), X_j the j-th input feature of the Linear
               over the calibration tokens. As in Wanda's code the squared norm is averaged
               over calibration sequences: ‖X_j‖₂ = sqrt(Σ_tokens x_j² / n_sequences).
``gblm``       GBLM-Pruner (Das et al., 2023): |W_ij| · ‖X_j‖₂ + α · |W_ij| · ‖G_ij‖_p, where
               G_ij = (g_ij^(1), …, g_ij^(N)) are the gradients of each calibration sequence's
               own mean token loss (one backward per sequence) and ‖·‖_p is the ℓ1 (Σ_n |g|)
               or ℓ2 (sqrt Σ_n g²) norm over the N sequences; α = 100 (the released code
               multiplies every gradient by ``scale`` = 100 before taking the norm, which is
               the same thing). ℓ2 is the paper's default.

Masks (True = prune), computed per matrix:

* unstructured: in every output row remove the k = int(C · r) weights with the smallest metric
  (stable sort; per-output-row comparison groups as Wanda and the published code do);
* N:M (``nm=(n, m)``): in every row and every group of m consecutive input columns remove the
  n smallest (C must be a multiple of m);
* ``keep_low_ratio`` q > 0: re-enable int(q · #masked) masked weights of each matrix, drawn
  uniformly from a generator seeded with ``seed`` (the published default is q = 0.01; ours is
  0, the plain method).

Which weights: the q/k/v/o and gate/up/down Linear weights of every decoder layer (found by
:func:`moreau_pruner.model.structure.discover`). The published script prunes every ≥2-D weight that
has a gradient, which also includes ``embed_tokens`` and ``lm_head``: ``include_embeddings=True``
reproduces that (those take the global ratio; ``wanda``/``gblm`` need activation norms and so
refuse it).

Activation norms (``wanda``, ``gblm``) are collected *sequentially* by default, as both papers'
code does: the calibration batch's hidden states enter decoder layer 0, each layer's input norms
are measured, that layer is pruned, and the layer is run again (pruned) to give the inputs of the
next one, so every layer is scored on the activations the pruned model will actually feed it.
``sequential=False`` measures every layer in one pass of the dense model instead (cheaper, and
what the first implementation did). GBLM's gradients always come from the dense model, as in its
released code (gradients are computed once, before pruning).

Rows (``trim``): by default every output row of a matrix loses the same fraction r. With
``trim=True`` (or a :class:`moreau_pruner.unstructured.trim.TrimConfig`) each row gets its own ratio, TRIM's
(:mod:`moreau_pruner.unstructured.trim`): the rows' removed counts still add up to exactly the uniform mask's
R·int(C·r) per matrix, and the metric still decides *which* weights of a row go. TRIM needs each
Linear's calibration inputs (their Gram matrix Σ x xᵀ), so with it every metric, not only
``wanda``/``gblm``, runs the layer-by-layer loop above (or the one dense pass with
``sequential=False``); it does not apply to N:M masks or to the embeddings.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from ..estimate import gradients as _gradients
from ..estimate import loop as _loop
from ..estimate.config import MoreauConfig
from ..model.layerwise import run_states, walk_layers
from ..model.structure import discover
from ..prune import rules
from ..score.methods import UNSTRUCTURED
from . import trim as _trim
from .trim import TrimConfig

METHODS = UNSTRUCTURED  # the methods with a per-weight metric
GBLM_NORMS = ("l1", "l2")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


# ----------------------------------------------------------------------------- targets
def prunable_linears(model: nn.Module, include_embeddings: bool = False, structure=None):
    """[(parameter name, decoder layer index or None, module)] of the weights to prune, in order."""
    structure = structure or discover(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for ls in structure.layers:
        for kind in KINDS:
            lin = getattr(ls, kind)
            out.append((names[id(lin.weight)], ls.index, lin))
    if include_embeddings:
        seen = {id(m.weight) for _, _, m in out}
        for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
            if mod is not None and getattr(mod, "weight", None) is not None and id(mod.weight) not in seen \
                    and mod.weight.dim() >= 2:
                seen.add(id(mod.weight))
                out.append((names[id(mod.weight)], None, mod))
    return out


# ----------------------------------------------------------------------------- statistics
@torch.no_grad()
def activation_norms(model: nn.Module, batch: torch.Tensor, modules: dict[str, nn.Module],
                     micro_batch_size: int | None = None, grams: bool = False):
    """‖X_j‖₂ per input feature of each module: sqrt(Σ_tokens x_j² / n_sequences), fp32.

    ``modules`` maps a key (usually the weight's name) to an nn.Linear; one forward pass of the
    model over ``batch`` (LongTensor [n, seq]) in micro-batches, with forward pre-hooks.
    ``grams``: return (norms, {key: InputStats}) (TRIM's statistics; at most in² floats per module).
    """
    was_training = model.training
    n = batch.shape[0]
    mbs = micro_batch_size or n
    try:
        model.eval()
        with _input_sq_sums(modules, grams) as stats:
            for start in range(0, n, mbs):
                model(input_ids=batch[start:start + mbs])
    finally:
        model.train(was_training)
    sums, gram = stats if grams else (stats, None)
    norms = {key: (s / n).sqrt_() for key, s in sums.items()}
    return (norms, gram) if grams else norms


@contextlib.contextmanager
def _input_sq_sums(modules: dict[str, nn.Module], gram: bool = False):
    """Yields {key: Σ x_j² over every token fed to the module while inside} (fp32), via forward pre-hooks;
    with ``gram``, (those sums, {key: :class:`moreau_pruner.unstructured.trim.InputStats`: the inputs, or once there are
    more of them than ``in_features`` their Gram matrix Σ x xᵀ})."""
    sums = {key: torch.zeros(mod.in_features, dtype=torch.float32, device=mod.weight.device)
            for key, mod in modules.items()}
    grams = {key: _trim.InputStats(mod.in_features, mod.weight.device) for key, mod in modules.items()} \
        if gram else None

    def hook(key):
        def fn(_mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            sums[key].add_(x.pow(2).sum(0))
            if grams is not None:
                grams[key].add(x)
        return fn

    handles = [mod.register_forward_pre_hook(hook(key)) for key, mod in modules.items()]
    try:
        yield (sums, grams) if gram else sums
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sequential_activation_norms(model: nn.Module, batch: torch.Tensor, structure, modules: dict[str, tuple[int, nn.Module]],
                                prune_layer, micro_batch_size: int | None = None, grams: bool = False) -> None:
    """Wanda's layer-by-layer loop: for each decoder layer in order, measure ‖X_j‖₂ of its modules on
    the hidden states the already pruned earlier layers produce, call ``prune_layer(index, norms)``
    ({key: norm} for that layer's modules) which prunes it, then run the pruned layer to get the next
    layer's inputs. ``modules`` maps a key to (decoder layer index, nn.Linear). ``grams``: keep the inputs
    too (:class:`moreau_pruner.unstructured.trim.InputStats`) and call ``prune_layer(index, norms, stats)``."""
    n = batch.shape[0]
    by_layer: dict[int, dict[str, nn.Module]] = {}
    for key, (layer, mod) in modules.items():
        by_layer.setdefault(layer, {})[key] = mod

    def visit(ls, states):
        mods = by_layer.get(ls.index, {})
        with _input_sq_sums(mods, grams) as stats:
            run_states(ls.layer, states)
        sums, gram = stats if grams else (stats, None)
        if mods:
            norms = {key: (sm / n).sqrt_() for key, sm in sums.items()}
            if grams:
                prune_layer(ls.index, norms, gram)
            else:
                prune_layer(ls.index, norms)

    walk_layers(model, batch, structure, visit, micro_batch_size)


def per_sample_gradient_norms(model: nn.Module, batch: torch.Tensor, names: Iterable[str], norm: str = "l2",
                              scale: float = 100.0) -> dict[str, torch.Tensor]:
    """GBLM's aggregated gradient: ℓ1 Σ_n |scale·g_n| or ℓ2 sqrt(Σ_n (scale·g_n)²), g_n the gradient
    of sequence n's mean token loss (one backward per row of ``batch``, via ``estimate.gradients.gradient``)."""
    if norm not in GBLM_NORMS:
        raise ValueError(f"gblm norm must be one of {GBLM_NORMS}, got {norm!r}")
    def term(g):
        g = g.mul_(scale)
        return g.abs_() if norm == "l1" else g.square_()

    acc = _gradients.per_sample_gradient_sum(model, batch, names, term)
    if norm == "l2":
        for a in acc.values():
            a.sqrt_()
    return acc


# ----------------------------------------------------------------------------- metrics
def metric_magnitude(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs()


def metric_moreau(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|Ĝ ⊙ W| (also the first-order Taylor metric when ``g`` is the plain gradient)."""
    return (w.detach().float() * g.float()).abs_()


def metric_wanda(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs() * act_norm.float()[None, :]


def metric_gblm(w: torch.Tensor, act_norm: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """|W|·‖X_j‖₂ + |W|·‖G‖_p (α already inside ``grad_norm``, see :func:`per_sample_gradient_norms`)."""
    a = w.detach().float().abs()
    return a * act_norm.float()[None, :] + a * grad_norm.float()


# ----------------------------------------------------------------------------- masks
def row_mask(metric: torch.Tensor, ratio: float) -> torch.Tensor:
    """True at the k = int(C·ratio) smallest entries of every row (stable order for ties)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio must be in [0, 1), got {ratio}")
    rows, cols = metric.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=metric.device)
    k = int(cols * ratio)
    if k > 0:
        idx = torch.sort(metric, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the n smallest of every m consecutive input columns of every row."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M needs integers 0 < n < m, got {n}:{m}")
    rows, cols = metric.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({cols}) to be a multiple of m")
    groups = metric.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def relax_mask(mask: torch.Tensor, keep_low_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Re-enable int(keep_low_ratio · #masked) masked entries drawn uniformly (in place; returned)."""
    if keep_low_ratio <= 0:
        return mask
    flat = mask.view(-1)
    masked = torch.nonzero(flat, as_tuple=False).squeeze(1)
    keep = int(masked.numel() * keep_low_ratio)
    if keep > 0:
        pick = torch.randperm(masked.numel(), generator=generator)[:keep].to(masked.device)
        flat[masked[pick]] = False
    return mask


# ----------------------------------------------------------------------------- driver
def unstructured_prune(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau", sparsity: float = 0.5,
                       nm: tuple[int, int] | None = None, layer_ratios: dict[int, float] | None = None,
                       moreau: MoreauConfig | None = None, seed: int = 0, keep_low_ratio: float = 0.0,
                       gblm_norm: str = "l2", gblm_scale: float = 100.0, include_embeddings: bool = False,
                       micro_batch_size: int | None = None, progress: bool = True, structure=None,
                       sequential: bool = True, grads: dict[str, torch.Tensor] | None = None,
                       trim: TrimConfig | bool | None = None) -> dict:
    """Zero weights of ``model`` in place by ``method``'s metric; returns the report (a dict).

    ``sparsity`` r is the fraction removed in every output row of every pruned matrix;
    ``layer_ratios`` {decoder layer index: r_l} overrides it per layer (from
    :mod:`moreau_pruner.prune.allocation`); ``nm=(n, m)`` replaces both by N:M sparsity.
    ``moreau`` configures the estimate (``method='moreau'``; default ``MoreauConfig(seed=seed)``).
    ``grads`` (``moreau``/``taylor``): an Ĝ already estimated by :func:`~moreau_pruner.estimate.estimate` (or the plain
    gradient) for these weights, e.g. shared by several sparsities; the estimate is then skipped.
    ``sequential`` (``wanda``/``gblm``, and every method with ``trim``): measure each layer's inputs
    on the outputs of the already pruned earlier layers (the papers' loop, default) instead of one
    dense pass.
    ``trim`` (True or a :class:`~moreau_pruner.unstructured.trim.TrimConfig`): TRIM's per-row ratios inside each
    matrix (same removed count per matrix as the uniform rows; see :mod:`moreau_pruner.unstructured.trim`).

    Report: ``layers`` (one entry per matrix: name, layer, shape, target, masked, zeros, numel,
    sparsity = zeros / numel measured after masking; with ``trim`` also ``trim``: the uniform and
    TRIM output cosines, the chosen step and the rows' removed-count range; ``trim_summary`` sums
    them up), ``per_layer`` {layer: measured sparsity of
    its matrices}, ``overall`` (zeros, numel, sparsity over the pruned matrices),
    ``model_zero_fraction`` (zeros over all parameters), ``timings`` and, for ``moreau``, the
    estimator's summary (``moreau``: config, backend, ``log``) and the memory strategy that ran
    (``estimator_path``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if nm is not None:
        if layer_ratios:
            raise ValueError("nm (N:M sparsity) fixes the ratio at n/m; do not combine it with layer_ratios")
        n_, m_ = nm
        nm_mask(torch.zeros(1, m_), n_, m_)  # validates n, m
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= keep_low_ratio < 1.0:
        raise ValueError(f"keep_low_ratio must be in [0, 1), got {keep_low_ratio}")
    for layer, r in (layer_ratios or {}).items():
        if not 0.0 <= r < 1.0:
            raise ValueError(f"layer {layer}: ratio must be in [0, 1), got {r}")
    if method in ("wanda", "gblm") and include_embeddings:
        raise ValueError(f"{method} needs input activation norms, which embeddings do not have; "
                         f"use include_embeddings=False")
    if grads is not None and method not in ("moreau", "taylor"):
        raise ValueError(f"grads (a precomputed Moreau estimate or gradient) only applies to methods 'moreau' "
                         f"and 'taylor', not {method!r}")
    if method != "magnitude" and batch is None and grads is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    trim_cfg = (TrimConfig() if trim is True else trim or None)
    if trim_cfg is not None:
        if not isinstance(trim_cfg, TrimConfig):
            raise TypeError(f"trim must be True, False/None or a TrimConfig, got {type(trim).__name__}")
        trim_cfg.validate()
        if nm is not None:
            rules.check(rules.Request(method, unstructured=True, nm=f"{nm[0]}:{nm[1]}", allocation="trim"))
        if include_embeddings:
            raise ValueError("TRIM needs each pruned matrix's input activations, which embeddings do not have; "
                             "use include_embeddings=False")
        if batch is None:
            raise ValueError("TRIM needs a calibration batch (it measures each Linear's outputs)")
        too_high = [r for r in [sparsity, *(layer_ratios or {}).values()] if r > trim_cfg.max_ratio]
        if too_high:
            raise ValueError(f"TRIM keeps every row's ratio at most {trim_cfg.max_ratio}; a layer ratio of "
                             f"{max(too_high)} is above it")

    structure = structure or discover(model)
    targets = prunable_linears(model, include_embeddings, structure)
    names = [name for name, _, _ in targets]
    timings: dict[str, float] = {}
    report: dict = {"method": method, "sparsity": sparsity if nm is None else n_ / m_, "nm": list(nm) if nm else None,
                    "layer_ratios": dict(layer_ratios) if layer_ratios else None, "keep_low_ratio": keep_low_ratio,
                    "seed": seed, "include_embeddings": include_embeddings,
                    "trim": _trim.config_dict(trim_cfg) if trim_cfg else None}

    gnorms = None
    t0 = time.perf_counter()
    if grads is not None:
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(f"grads lacks {len(missing)} pruned weight(s), e.g. {missing[0]}")
        grads = dict(grads)
        report[method] = {"precomputed": True}
    elif method == "moreau":
        cfg = moreau or MoreauConfig(seed=seed)
        if micro_batch_size and cfg.micro_batch_size is None:
            cfg = replace(cfg, micro_batch_size=micro_batch_size)
        est = _loop.estimate(model, batch, cfg, strategy="auto", score=names, progress=progress, structure=structure)
        grads = est.grads
        report["moreau"] = est.summary()
        report["estimator_path"] = est.path
    elif method == "taylor":
        grads = _gradients.gradient(model, batch, names, micro_batch_size)
        report["taylor"] = {"precomputed": False}
    if method == "gblm":  # from the dense model, before any weight is pruned
        report["gblm"] = {"norm": gblm_norm, "scale": gblm_scale}
        gnorms = per_sample_gradient_norms(model, batch, names, gblm_norm, gblm_scale)
    timings["statistics_s"] = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(seed)
    rows = []
    masking_s = 0.0
    bar = None
    if trim_cfg is not None and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(targets), desc="TRIM rows", unit="matrix")

    def prune_one(name, layer, mod, act_norm=None, gram=None):
        nonlocal masking_s
        t1 = time.perf_counter()
        w = mod.weight
        if method == "magnitude":
            metric = metric_magnitude(w)
        elif method in ("moreau", "taylor"):
            metric = metric_moreau(w, grads.pop(name))
        elif method == "wanda":
            metric = metric_wanda(w, act_norm)
        else:
            metric = metric_gblm(w, act_norm, gnorms.pop(name))
        trim_info = None
        if nm is not None:
            mask, target = nm_mask(metric, n_, m_), n_ / m_
        else:
            target = layer_ratios.get(layer, sparsity) if (layer_ratios and layer is not None) else sparsity
            if trim_cfg is not None:
                mask, res = _trim.trim_mask(w, metric, gram, target, trim_cfg)
                trim_info = res.summary()
                if bar is not None:
                    bar.update(1)
            else:
                mask = row_mask(metric, target)
        del metric
        relax_mask(mask, keep_low_ratio, gen)
        with torch.no_grad():
            w.data.masked_fill_(mask, 0)
        zeros = int((w.data == 0).sum())
        rows.append({"name": name, "layer": layer, "shape": list(w.shape), "target": target,
                     "masked": int(mask.sum()), "zeros": zeros, "numel": w.numel(), "sparsity": zeros / w.numel()})
        if trim_info is not None:
            rows[-1]["trim"] = trim_info
        masking_s += time.perf_counter() - t1

    if method in ("wanda", "gblm") or trim_cfg is not None:
        report["sequential"] = sequential
        with_grams = trim_cfg is not None
        t0 = time.perf_counter()
        if sequential:
            by_name = {name: (layer, mod) for name, layer, mod in targets}

            def prune_layer(_index, norms, grams=None):
                for name, act in norms.items():
                    layer, mod = by_name[name]
                    prune_one(name, layer, mod, act, None if grams is None else grams.pop(name))

            sequential_activation_norms(model, batch, structure, by_name, prune_layer, micro_batch_size,
                                        grams=with_grams)
        else:
            stats = activation_norms(model, batch, {name: mod for name, _, mod in targets}, micro_batch_size,
                                     grams=with_grams)
            acts, grams = stats if with_grams else (stats, {})
            for name, layer, mod in targets:
                prune_one(name, layer, mod, acts.pop(name), grams.pop(name, None))
        timings["activations_s"] = time.perf_counter() - t0 - masking_s
        order = {name: i for i, (name, _, _) in enumerate(targets)}
        rows.sort(key=lambda r: order[r["name"]])
    else:
        for name, layer, mod in targets:
            prune_one(name, layer, mod)
    timings["masking_s"] = masking_s
    if bar is not None:
        bar.close()

    per_layer: dict[int, dict] = {}
    for r in rows:
        if r["layer"] is None:
            continue
        d = per_layer.setdefault(r["layer"], {"zeros": 0, "numel": 0})
        d["zeros"] += r["zeros"]
        d["numel"] += r["numel"]
    zeros = sum(r["zeros"] for r in rows)
    numel = sum(r["numel"] for r in rows)
    all_zeros = sum(int((p.data == 0).sum()) for p in model.parameters())
    all_numel = sum(p.numel() for p in model.parameters())
    if trim_cfg is not None:
        got = [r["trim"] for r in rows if "trim" in r]
        report["trim_summary"] = {
            "matrices": len(got), "improved": sum(g["quality"] > g["quality_uniform"] for g in got),
            "quality_uniform_mean": sum(g["quality_uniform"] for g in got) / max(1, len(got)),
            "quality_mean": sum(g["quality"] for g in got) / max(1, len(got)),
            "evaluations": sum(g["evaluations"] for g in got)}
    report.update(layers=rows, per_layer={k: v["zeros"] / v["numel"] for k, v in per_layer.items()},
                  overall={"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0},
                  model_zero_fraction=all_zeros / all_numel, timings=timings)
    return report
