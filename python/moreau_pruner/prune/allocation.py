"""Layer-wise pruning ratios: OWL, AlphaPruning and FARMS (and uniform), for both paths.

Each allocator gives every decoder layer l a ratio r_l such that the mean of the r_l weighted
by the layers' sizes s_l equals the requested ratio r: Σ s_l r_l = r Σ s_l. Sizes are the
numbers of prunable weights (unstructured: the seven Linear weights; structured: the
parameters of the layer's units in the attention / MLP ranges). Ratios are kept in
[0, ``max_ratio``]; when that clips, the shift (OWL) or scale (AlphaPruning, FARMS) is solved
again by bisection so the weighted mean still equals r.

Structured pruning removes heads in whole steps (SPEC §5: floor(n / (n_rep·d)) KV groups or
floor(n / (H_kv·d)) query heads per group), so a layer pushed past a step loses heads that the
layers below it do not give back, and "the weighted mean ratio is r" can remove noticeably more
parameters than uniform r (SmolLM2 at r = 0.3 with OWL: 84.1 % of the parameters kept against
85.8 %). With ``removal`` (:func:`structured_removal`, what the local plan really removes from a
layer at a ratio) the shift / scale is instead solved so the parameters removed equal those
uniform r removes, to within half of the largest step the solver cannot split.

OWL (Yin et al., 2023, "Outlier Weighed Layerwise sparsity"). Per layer the Wanda metric
A_ij = |W_ij|·‖X_j‖₂ of all its Linear weights together; the outlier ratio
D_l = 100 · #{A_ij > M · mean(A)} / #A (M = 5). Normalised to [0, 2λ] across layers
(λ = 0.08), the layer's *density* is (1 − r) + that value minus its mean, so
r_l = r − 2λ·(D_l − D_min)/(D_max − D_min) + mean: r_l ∈ [r − λ, r + λ], layers with more
outliers keep more weights.

AlphaPruning (Lu et al., NeurIPS 2024). Per Linear weight the power-law exponent α of the
empirical spectral density (eigenvalues λ_i = σ_i² of WᵀW) by the Hill / maximum-likelihood
estimator α = 1 + n / Σ_{i: λ_i ≥ λ_min} ln(λ_i / λ_min) over the n eigenvalues ≥ λ_min, with
λ_min chosen by ``xmin``: ``peak`` (released default, "alpha_peak"): among the eigenvalues within
[0.95, 1.5] × the peak of a 100-bin histogram of log10 λ, the λ_min whose fit has the smallest
Kolmogorov-Smirnov distance; ``mid``: the median eigenvalue. Block-wise mapping (released
default): a layer's α is the mean over its seven matrices; ratios are linear in α between
r·(1 − ε) and r·(1 + ε) (α_min → r(1 − ε)), then scaled so the weighted mean is r. Larger α
(lighter tail, less trained) → pruned more. ε = 0.3 (released default; its LLaMA-7B scripts use
0.3 for magnitude and 0.2 for Wanda/SparseGPT at 70 %).
Note: the released ``xmin_peak`` code compares λ with log10(0.95·peak), so in practice it has no
lower bound; we use the bound as written ([0.95, 1.5] × peak).

FARMS (Hu et al., ICML 2025, "Eigenspectrum Analysis of Neural Networks without Aspect Ratio
Bias"), as its released LLM-pruning code does it: each W [R, C] is covered by overlapping
w × (Q·w) windows, w = min(2000, R, C), Q = 1 (square), at ``ops`` (15) evenly spaced starts
per dimension (step = (R − w) // (ops − 1), last start clamped to R − w); the squared singular
values of all windows are pooled (the average ESD of the submatrices) and α is fitted on the
pooled spectrum with the same Hill estimator; then as AlphaPruning (block-wise mean, linear
map with ε = 0.3).

Rows (unstructured only): ``trim`` (:mod:`moreau_pruner.unstructured.trim`) goes one level down and spreads a
matrix's ratio over its output rows. It combines with a layer allocator, written
``<layer>+trim``: ``owl+trim`` = OWL gives each layer its ratio, TRIM spreads it over the rows of
each matrix; ``trim`` alone = uniform layer ratios (``uniform+trim`` is the same).
:func:`parse_allocation` splits such a name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..model.structure import ModelStructure, discover
from ..score.importance import LayerScores
from .apply import PruneReport, prune_structure
from .plan import attention_units_removed, mlp_channels_removed, unit_params
from .target import PruneTarget

METHODS = ("uniform", "owl", "alpha", "farms")  # layer allocators
ROW_METHODS = ("trim",)  # row allocators (unstructured)
#: every name --allocation takes: a layer allocator, a row allocator, or ``<layer>+<row>``
CHOICES = METHODS + ROW_METHODS + tuple(f"{m}+{r}" for m in METHODS if m != "uniform" for r in ROW_METHODS)
XMINS = ("peak", "mid")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class Allocation:
    method: str
    ratio: float
    ratios: dict[int, float]  # decoder layer → ratio
    metric: dict[int, float] = field(default_factory=dict)  # OWL: outlier %, alpha/farms: mean α
    sizes: dict[int, int] = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def weighted_ratio(self) -> float:
        total = sum(self.sizes[l] for l in self.ratios)
        return sum(self.ratios[l] * self.sizes[l] for l in self.ratios) / total

    def as_dict(self) -> dict:
        d = asdict(self)
        d["weighted_ratio"] = self.weighted_ratio
        return d


def parse_allocation(spec: str) -> tuple[str, str | None]:
    """``'owl+trim'`` -> ``('owl', 'trim')``, ``'trim'`` -> ``('uniform', 'trim')``, ``'alpha'`` -> ``('alpha', None)``;
    a ValueError that names the problem for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"allocation must be a name such as {', '.join(CHOICES)}; got {spec!r}")
    parts = [p.strip().lower() for p in spec.split("+")]
    if len(parts) == 1:
        (name,) = parts
        if name in METHODS:
            return name, None
        if name in ROW_METHODS:
            return "uniform", name
    elif len(parts) == 2:
        layer, row = parts
        if layer in METHODS and row in ROW_METHODS:
            return layer, row
        if layer in ROW_METHODS and row in METHODS:
            raise ValueError(f"allocation {spec!r}: the layer allocator comes first, the row allocator last "
                             f"({row}+{layer})")
        if layer in METHODS and row in METHODS:
            raise ValueError(f"allocation {spec!r}: {layer} and {row} both set per-layer ratios; combine one layer "
                             f"allocator ({', '.join(METHODS)}) with a row allocator ({', '.join(ROW_METHODS)})")
    raise ValueError(f"unknown allocation {spec!r}; choose a layer allocator ({', '.join(METHODS)}), a row allocator "
                     f"({', '.join(ROW_METHODS)}) or <layer>+<row> such as owl+trim")


# ----------------------------------------------------------------------------- sizes
def unstructured_sizes(structure: ModelStructure, layers=None) -> dict[int, int]:
    """Prunable weights per decoder layer on the unstructured path (the seven Linear weights)."""
    return {ls.index: sum(getattr(ls, k).weight.numel() for k in KINDS) for ls in structure.layers
            if layers is None or ls.index in layers}


def structured_sizes(target: PruneTarget) -> dict[int, int]:
    """Parameters of the prunable units per layer in the target's attention / MLP ranges."""
    attn, mlp = target.attn_range, target.mlp_range
    out = {}
    for ls in target.structure.layers:
        n = 0
        if ls.index in attn:
            n += sum(p.numel() for p in ls.attention_params())
        if ls.index in mlp:
            n += sum(p.numel() for p in ls.mlp_params())
        if n:
            out[ls.index] = n
    return out


def structured_removal(target: PruneTarget):
    """removal(layer, r) -> parameters :func:`moreau_pruner.prune.plan.plan_local` removes from that layer at
    ratio r (its own unit-count rules: the heads' floor rule and ``round_to`` included), for the layers
    in the target's ranges. The widths are read now: pruning the model afterwards does not change the
    function."""
    structure, cfg, attn, mlp = target.structure, target.config, target.attn_range, target.mlp_range
    dims = {}
    for ls in structure.layers:
        head, kv, channel = unit_params(ls, structure.hidden_size)
        # parameters of one unit: a KV group (its query heads + k, v rows) or one query head in every group
        unit = ls.n_rep * head + kv if cfg.granularity == "kv-group" else ls.n_kv_heads * head
        dims[ls.index] = (ls.n_heads, ls.head_dim, ls.n_kv_heads, ls.intermediate_size, unit, channel)

    def removal(layer: int, r: float) -> int:
        n_heads, d, n_kv, c, unit, channel = dims[layer]
        out = 0
        if layer in attn:
            out += attention_units_removed(n_heads, d, n_kv, r, cfg.granularity) * unit
        if layer in mlp:
            out += mlp_channels_removed(c, r, cfg.round_to) * channel
        return out

    return removal


def allocate_structured(model: nn.Module, target: PruneTarget, method: str, batch: torch.Tensor | None = None,
                        micro_batch_size: int | None = None, **options) -> Allocation:
    """:func:`allocate` for the structured path: the layers and sizes of the target's ranges, fitted so the
    parameters removed match uniform ratio's (:func:`structured_removal`)."""
    return allocate(model, target.config.ratio, method, batch, sizes=structured_sizes(target),
                    structure=target.structure, micro_batch_size=micro_batch_size,
                    removal=structured_removal(target), **options)


# ----------------------------------------------------------------------------- ratio fitting
def _fit_total(raw: dict[int, float], sizes: dict[int, int], ratio: float, mode: str,
               max_ratio: float, removal=None) -> dict[int, float]:
    """Shift (mode 'add') or scale ('mul') ``raw`` so Σ s·clip(r) = ratio·Σ s, r clipped to [0, max_ratio];
    with ``removal(layer, r)``, so Σ removal(l, r_l) = Σ removal(l, ratio) as closely as the steps allow."""
    keys = list(raw)
    total = sum(sizes[k] for k in keys)

    def apply(t):
        return {k: min(max_ratio, max(0.0, raw[k] + t if mode == "add" else raw[k] * t)) for k in keys}

    if removal is not None:
        target = sum(removal(k, ratio) for k in keys)

        def excess(t):
            r = apply(t)
            return (sum(removal(k, r[k]) for k in keys) - target) / total
    else:
        def excess(t):
            r = apply(t)
            return sum(sizes[k] * r[k] for k in keys) / total - ratio

    if mode == "add":
        t = ratio - sum(sizes[k] * raw[k] for k in keys) / total  # exact when nothing clips
        lo, hi = -1.0 - max(raw.values()), 1.0 - min(raw.values())
    else:
        mean = sum(sizes[k] * raw[k] for k in keys) / total
        if mean <= 0:
            return {k: ratio for k in keys}
        t = ratio / mean
        lo, hi = 0.0, max(1.0, max_ratio) / max(min(v for v in raw.values() if v > 0), 1e-12)
    if abs(excess(t)) <= 1e-12:
        return apply(t)
    for _ in range(200):  # the weighted mean (and the removal) is monotone in t
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            hi = mid
        else:
            lo = mid
    if removal is not None:  # a step function: take the closer side of the step
        return apply(min((lo, hi), key=lambda x: abs(excess(x))))
    return apply(0.5 * (lo + hi))


def owl_ratios(outliers: dict[int, float], ratio: float, sizes: dict[int, int], lam: float = 0.08,
               max_ratio: float = 0.99, removal=None) -> dict[int, float]:
    """OWL's map: r_l = r − 2λ·(D_l − D_min)/(D_max − D_min), shifted so the weighted mean is r."""
    d_min, d_max = min(outliers.values()), max(outliers.values())
    if d_max - d_min <= 0:
        return {k: ratio for k in outliers}
    raw = {k: -2.0 * lam * (d - d_min) / (d_max - d_min) for k, d in outliers.items()}
    return _fit_total(raw, sizes, ratio, "add", max_ratio, removal)


def alpha_ratios(alphas: dict[int, float], ratio: float, sizes: dict[int, int], epsilon: float = 0.3,
                 max_ratio: float = 0.99, removal=None) -> dict[int, float]:
    """AlphaPruning's map: r_l ∝ (1 − ε) + 2ε·(α_l − α_min)/(α_max − α_min), scaled so the weighted mean is r."""
    a_min, a_max = min(alphas.values()), max(alphas.values())
    if a_max - a_min <= 0 or not all(math.isfinite(a) for a in alphas.values()):
        return {k: ratio for k in alphas}
    raw = {k: (1 - epsilon) + 2 * epsilon * (a - a_min) / (a_max - a_min) for k, a in alphas.items()}
    return _fit_total(raw, sizes, ratio, "mul", max_ratio, removal)


# ----------------------------------------------------------------------------- heavy-tail exponent
def hill_alpha(eigs: torch.Tensor, xmin: str = "peak", bins: int = 100, max_candidates: int = 512,
               chunk: int = 64) -> float:
    """Power-law exponent α of the density of ``eigs`` by the Hill estimator (see the module docstring).

    ``peak``: the KS distance is evaluated for at most ``max_candidates`` λ_min candidates, evenly
    spaced through the window (all of them when there are fewer); each costs O(N), and FARMS's pooled
    spectra hold 10⁵ eigenvalues and more.
    """
    if xmin not in XMINS:
        raise ValueError(f"xmin must be one of {XMINS}, got {xmin!r}")
    e = torch.sort(eigs.detach().double().flatten()).values
    e = e[e > 0]
    n_all = e.numel()
    if n_all < 3:
        return float("nan")
    loge = e.log()
    suffix = loge.flip(0).cumsum(0).flip(0)  # Σ_{k ≥ i} ln λ_k
    counts = torch.arange(n_all, 0, -1, dtype=torch.float64)  # n_i = N − i

    def alpha_at(i):
        return 1.0 + counts[i] / (suffix[i] - counts[i] * loge[i])

    if xmin == "mid":
        return float(alpha_at(torch.tensor(n_all // 2)))
    h = torch.log10(e)
    lo, hi = float(h.min()), float(h.max())
    if hi - lo <= 0:
        return float("nan")
    hist = torch.histc(h.float(), bins=bins, min=lo, max=hi)
    peak = 10 ** (lo + int(torch.argmax(hist)) * (hi - lo) / bins)
    cand = torch.nonzero((e[:-1] >= 0.95 * peak) & (e[:-1] <= 1.5 * peak)).flatten()
    if cand.numel() == 0:
        cand = torch.arange(n_all - 1)
    if cand.numel() > max_candidates:
        cand = cand[torch.linspace(0, cand.numel() - 1, max_candidates).round().long()]
    best_d, best_a = math.inf, float("nan")
    pos = torch.arange(n_all, dtype=torch.float64)
    for s in range(0, cand.numel(), chunk):
        idx = cand[s:s + chunk]
        a = alpha_at(idx)  # [c]
        k = pos[None, :] - idx[:, None].double()  # k − i
        valid = k >= 0
        model_cdf = 1 - ((loge[None, :] - loge[idx][:, None]) * (1 - a[:, None])).exp()
        dist = (model_cdf - k / counts[idx][:, None]).abs().masked_fill(~valid, 0).amax(1)
        dist = torch.where(a > 1, dist, torch.ones_like(dist))
        j = int(torch.argmin(dist))
        if float(dist[j]) < best_d:
            best_d, best_a = float(dist[j]), float(a[j])
    return best_a


def esd(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW (squared singular values), fp32."""
    return torch.linalg.svdvals(w.detach().float()).square()


def farms_esd(w: torch.Tensor, window: int = 2000, q_ratio: float = 1.0, ops: int = 15) -> torch.Tensor:
    """Pooled squared singular values of FARMS's fixed-aspect-ratio windows of ``w``."""
    rows, cols = w.shape
    wr = min(window, rows, cols)
    wc = min(cols, max(1, int(wr * q_ratio)))
    out = []
    w = w.detach().float()

    def starts(size, win):
        if ops <= 1:
            return [0]
        step = max(1, (size - win) // (ops - 1))
        count = min(ops, max(1, (size - win) // step + 1))
        return [min(i * step, size - win) for i in range(count)]

    for r0 in starts(rows, wr):
        for c0 in starts(cols, wc):
            out.append(torch.linalg.svdvals(w[r0:r0 + wr, c0:c0 + wc]).square())
    return torch.cat(out)


def layer_alphas(structure: ModelStructure, layers=None, estimator: str = "full", xmin: str = "peak",
                 farms_window: int = 2000, farms_q: float = 1.0, farms_ops: int = 15) -> dict[int, float]:
    """Mean α over each decoder layer's seven Linear weights (block-wise, as AlphaPruning maps)."""
    out = {}
    for ls in structure.layers:
        if layers is not None and ls.index not in layers:
            continue
        vals = []
        for k in KINDS:
            w = getattr(ls, k).weight
            eig = esd(w) if estimator == "full" else farms_esd(w, farms_window, farms_q, farms_ops)
            vals.append(hill_alpha(eig, xmin))
        finite = [v for v in vals if math.isfinite(v)]
        out[ls.index] = sum(finite) / len(finite) if finite else float("nan")
    return out


# ----------------------------------------------------------------------------- outliers (OWL)
def owl_outlier_ratios(model: nn.Module, batch: torch.Tensor, layers=None, m: float = 5.0,
                       micro_batch_size: int | None = None, structure: ModelStructure | None = None,
                       act_norms: dict[str, torch.Tensor] | None = None) -> dict[int, float]:
    """D_l in percent: weights of layer l whose Wanda metric exceeds ``m`` × the layer's mean metric."""
    from ..unstructured.prune import activation_norms, metric_wanda

    structure = structure or discover(model)
    names = {id(p): n for n, p in model.named_parameters()}
    mods = {names[id(getattr(ls, k).weight)]: getattr(ls, k) for ls in structure.layers
            if layers is None or ls.index in layers for k in KINDS}
    if act_norms is None:
        if batch is None:
            raise ValueError("OWL needs a calibration batch (activation norms)")
        act_norms = activation_norms(model, batch, mods, micro_batch_size)
    out = {}
    for ls in structure.layers:
        if layers is not None and ls.index not in layers:
            continue
        metrics = [metric_wanda(getattr(ls, k).weight, act_norms[names[id(getattr(ls, k).weight)]]).flatten()
                   for k in KINDS]
        a = torch.cat(metrics)
        out[ls.index] = 100.0 * float((a > m * a.mean()).sum()) / a.numel()
    return out


# ----------------------------------------------------------------------------- driver
def allocate(model: nn.Module, ratio: float, method: str = "owl", batch: torch.Tensor | None = None,
             sizes: dict[int, int] | None = None, structure: ModelStructure | None = None,
             owl_m: float = 5.0, owl_lambda: float = 0.08, epsilon: float = 0.3, xmin: str = "peak",
             farms_window: int = 2000, farms_q: float = 1.0, farms_ops: int = 15, max_ratio: float = 0.99,
             micro_batch_size: int | None = None, removal=None) -> Allocation:
    """Per-layer ratios with size-weighted mean ``ratio`` over the layers in ``sizes``.

    ``sizes`` {layer: prunable weights}: :func:`unstructured_sizes` (default, all layers) or
    :func:`structured_sizes` (a PruneConfig's ranges); only those layers get a ratio.
    ``batch`` is needed by ``owl`` only. ``removal`` (:func:`structured_removal`): fit the ratios so the
    parameters removed match uniform ``ratio``'s instead of the weighted mean ratio (see the module
    docstring); ``params['matched']`` says which.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    structure = structure or discover(model)
    sizes = sizes if sizes is not None else unstructured_sizes(structure)
    layers = set(sizes)
    if not layers:
        raise ValueError("no layers to allocate")
    params: dict = {}
    metric: dict[int, float] = {}
    if method == "uniform":
        ratios = {l: ratio for l in sorted(layers)}
    elif method == "owl":
        params = {"M": owl_m, "lambda": owl_lambda}
        metric = owl_outlier_ratios(model, batch, layers, owl_m, micro_batch_size, structure)
        ratios = owl_ratios(metric, ratio, sizes, owl_lambda, max_ratio, removal)
    else:
        params = {"epsilon": epsilon, "xmin": xmin, "mapping": "block_wise"}
        if method == "farms":
            params.update(window=farms_window, q_ratio=farms_q, ops_per_dim=farms_ops)
        metric = layer_alphas(structure, layers, "full" if method == "alpha" else "farms", xmin,
                              farms_window, farms_q, farms_ops)
        ratios = alpha_ratios(metric, ratio, sizes, epsilon, max_ratio, removal)
    if method != "uniform":
        params["matched"] = "parameters removed" if removal is not None else "weighted mean ratio"
    return Allocation(method, ratio, dict(sorted(ratios.items())), metric, {l: sizes[l] for l in sorted(layers)},
                      params)


# ----------------------------------------------------------------------------- structured use
def prune_structure_allocated(target: PruneTarget, scores: list[LayerScores],
                              layer_ratios: dict[int, float]) -> PruneReport:
    """Local structural pruning with ratio ``layer_ratios[l]`` in layer l (the target's ratio elsewhere):
    :func:`~moreau_pruner.prune.apply.prune_structure` with ``PruneConfig.layer_ratios`` set; each layer
    entry of the report carries its ``ratio``.
    """
    return prune_structure(target.with_config(replace(target.config, layer_ratios=dict(layer_ratios))), scores)
