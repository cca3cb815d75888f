"""TRIM: one sparsity ratio per output row, adjusted by the rows' output quality.

TRIM (Beck, Rudman & Eickhoff, 2025, "TRIM: Achieving Extreme Sparsity with Targeted Row-wise
Iterative Metric-driven Pruning", arXiv 2505.16743) replaces "remove the fraction r of every
output row" by a ratio x_i per output row i of a matrix W [R, C] whose mean stays the matrix's
ratio r. It works on top of any per-weight metric (the rows' sort order is the metric's) and of
any layer-wise allocation (which gives r).

Quality. With X the calibration inputs of the Linear (one column per token), Y = W X the dense
output and Ŷ = Ŵ X the pruned one:

* per output dimension, q_i = cos(Y_i, Ŷ_i), the cosine similarity over the calibration tokens
  (drives the update);
* per matrix, Q = cos(vec Y, vec Ŷ), the cosine similarity of the whole flattened outputs
  (selects the result).

Both only need the Gram matrix G = X Xᵀ = Σ_tokens x xᵀ [C, C], which is what we accumulate:
with P = W ⊙ mask (the removed part), A = W G, |Y_i|² = Σ_j W_ij A_ij, Y_i·Ŷ_i = |Y_i|² − Σ_j P_ij A_ij
and |Ŷ_i|² = |Y_i|² − 2 Σ_j P_ij A_ij + Σ_j P_ij (P G)_ij. While there are fewer calibration tokens
n than input features C, the inputs themselves stand in for G (|P_i X|² directly, R·C·n per mask
instead of R·C²; :class:`InputStats`); the memory is at most C² per matrix whatever n.

Adjustment step (one iteration, step size η; :func:`trim_step`):

    d_i = 2η · (q_i − min q) / (max q − min q);   d ← d − mean(d);   x ← Π(x + d)

Rows that kept more of their output (high q_i) are pruned more, the others less, so the rows'
quality evens out. Π projects onto {lo ≤ x_i ≤ hi, mean(x) = r}: x_i ← clip(x_i + t, lo, hi)
with the shift t that makes the mean r (:func:`project_mean`).

Search (:func:`trim_rows`), as in the paper's released code: start from the uniform ratios,
run ``iterations`` (10) steps for each step size η of (0.01, 0.02, 0.04, 0.08, 0.12, 0.16), each
run restarting from the uniform ratios and keeping its best iterate by Q; the step sizes are
tried in increasing order and the search stops at the first one whose best Q is not higher than
the previous one's. When no positive η beats the uniform ratios, η = −0.01, −0.02, −0.04 are tried
the same way. The result is the iterate with the highest Q overall, the uniform ratios
included, so on the inputs it was fitted on TRIM's Q is never below its base metric's.

From the paper / its code: the two cosine metrics, the min-max normalised update with
amplitude 2η and zero mean, 10 iterations, the step-size ladder and its early stop, the
negative step sizes, the ratio bounds [0, 0.95], best-iterate selection by Q, and the inputs
of each decoder layer taken from the already pruned earlier layers (the sequential loop of
:mod:`moreau_pruner.unstructured.prune`), measured before any matrix of the layer is pruned.

Our choices:

* bounds by exact projection (shift then clip, the shift solved to 1e-12) instead of the code's
  clip-then-recentre, which can leave ratios slightly outside [0, 0.95];
* whole weights per row by largest remainder (:func:`row_counts`): the real quotas
  u_i = int(C·r) + C·(x_i − r) sum to K = R·int(C·r), exactly what the uniform row mask removes;
  k_i = ⌊u_i⌋ (clipped to [0, C]) and the K − Σ k_i rows with the largest remainders get one
  more (ties by row index). So each matrix keeps *exactly* as many weights as the uniform mask
  (the paper's code truncates C·x_i per row, whose total can differ from the uniform one by up
  to R − 1 weights either way), every k_i is within 1 of its quota (unless clipped at 0 or C),
  and the uniform ratios give exactly the uniform mask;
* a zero-range q (all rows equally good) gives no step; a row whose dense output is zero
  counts as q_i = 1 (nothing to lose);
* the Gram-matrix form above (the paper multiplies W and Ŵ by the stored inputs; same numbers).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

POSITIVE_STEPS = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
NEGATIVE_STEPS = (-0.01, -0.02, -0.04)


@dataclass(frozen=True)
class TrimConfig:
    """TRIM's search (defaults: the paper's)."""
    iterations: int = 10
    steps: tuple[float, ...] = POSITIVE_STEPS
    negative_steps: tuple[float, ...] = NEGATIVE_STEPS  # () to forbid them
    min_ratio: float = 0.0
    max_ratio: float = 0.95

    def validate(self) -> "TrimConfig":
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ValueError(f"TRIM iterations must be an integer >= 1, got {self.iterations!r}")
        if not self.steps or any(s <= 0 for s in self.steps):
            raise ValueError(f"TRIM steps must be positive step sizes, got {self.steps!r}")
        if any(s >= 0 for s in self.negative_steps):
            raise ValueError(f"TRIM negative_steps must be negative, got {self.negative_steps!r}")
        if not 0.0 <= self.min_ratio < self.max_ratio < 1.0:
            raise ValueError(f"TRIM needs 0 <= min_ratio < max_ratio < 1, got [{self.min_ratio}, {self.max_ratio}]")
        return self


@dataclass
class TrimResult:
    counts: torch.Tensor  # [R] weights removed per row (Σ = R·int(C·r))
    ratios: torch.Tensor  # [R] the real-valued row ratios x that gave ``counts``
    quality_uniform: float  # Q of the uniform row mask
    quality: float  # Q of the chosen counts
    step: float | None  # step size of the chosen iterate (None: the uniform ratios)
    iteration: int  # its iteration (0: the uniform ratios)
    evaluations: int  # masks scored

    def summary(self) -> dict:
        c = self.counts.float()
        return {"quality_uniform": self.quality_uniform, "quality": self.quality, "step": self.step,
                "iteration": self.iteration, "evaluations": self.evaluations,
                "row_removed_min": int(c.min()), "row_removed_max": int(c.max()),
                "row_removed_std": float(c.std()) if c.numel() > 1 else 0.0}


# ----------------------------------------------------------------------------- the pieces
def project_mean(x: torch.Tensor, target: float, lo: float, hi: float, tol: float = 1e-12,
                 max_iter: int = 200) -> torch.Tensor:
    """clip(x + t, lo, hi) with the shift t such that its mean is ``target`` (lo ≤ target ≤ hi).

    The mean is piecewise linear and nondecreasing in t, so Newton steps (slope: the share of entries
    strictly inside the bounds) reach it in a few iterations; a step leaving the bracket [t_lo, t_hi]
    is replaced by bisection."""
    if not lo <= target <= hi:
        raise ValueError(f"target ratio {target} is outside the bounds [{lo}, {hi}]")
    x = x.double()
    t_lo, t_hi = lo - float(x.max()), hi - float(x.min())  # mean = lo at t_lo, = hi at t_hi
    t = target - float(x.mean())  # exact when nothing clips
    for _ in range(max_iter):
        y = x + t
        gap = float(y.clamp(lo, hi).mean()) - target
        if abs(gap) <= tol:
            break
        if gap > 0:
            t_hi = t
        else:
            t_lo = t
        inside = float(((y > lo) & (y < hi)).double().mean())
        t_new = t - gap / inside if inside > 0 else 0.5 * (t_lo + t_hi)
        t = t_new if t_lo < t_new < t_hi else 0.5 * (t_lo + t_hi)
    return (x + t).clamp(lo, hi)


def trim_step(ratios: torch.Tensor, quality: torch.Tensor, step: float, target: float, lo: float = 0.0,
              hi: float = 0.95) -> torch.Tensor:
    """One adjustment: x ← Π(x + d), d = 2η·(q − min q)/(max q − min q) centred (module docstring)."""
    q = quality.double()
    spread = float(q.max() - q.min())
    if spread <= 0.0:
        return ratios.double().clone()
    d = (q - q.min()) / spread * (2.0 * step)
    return project_mean(ratios.double() + (d - d.mean()), target, lo, hi)


def row_counts(ratios: torch.Tensor, cols: int, target: float) -> torch.Tensor:
    """Whole weights to remove per row: largest-remainder rounding of u_i = int(C·r) + C·(x_i − r)
    to integers in [0, C] summing to R·int(C·r) (the uniform mask's count)."""
    rows = ratios.numel()
    base = int(cols * target)
    total = rows * base
    quota = (base + cols * (ratios.double() - target)).clamp(0.0, float(cols))
    counts = quota.floor().long()
    rem = quota - counts
    order = torch.argsort(-rem, stable=True)  # largest remainder first, ties by row index
    diff = total - int(counts.sum())
    while diff:  # |diff| < R unless the clamp bit; loop for that case
        if diff > 0:
            room = order[counts[order] < cols][:diff]
            counts[room] += 1
            diff -= room.numel()
        else:
            back = order.flip(0)
            back = back[counts[back] > 0][:-diff]
            counts[back] -= 1
            diff += back.numel()
    return counts


def mask_from_counts(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """True at the first counts[i] entries of ``order[i]`` (a row's indices, smallest metric first)."""
    rows, cols = order.shape
    take = torch.arange(cols, device=order.device)[None, :] < counts.to(order.device)[:, None]
    return torch.zeros(rows, cols, dtype=torch.bool, device=order.device).scatter_(1, order, take)


class OutputQuality:
    """q (per output row) and Q (whole matrix) of a mask of ``weight`` on inputs with Gram matrix ``gram``,
    or with ``factor`` L [C, ρ] such that G = L Lᵀ (e.g. the inputs themselves, L = X, when there are
    fewer calibration tokens than input features: SmolLM2's down_proj sees 640 tokens of width 1536).

    Each call costs one product of the removed part P [R, C] with G (R·C²) or with L (R·C·ρ).
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor | None = None, factor: torch.Tensor | None = None):
        if (gram is None) == (factor is None):
            raise ValueError("give the inputs' Gram matrix or a factor of it, not both or neither")
        self.w = weight.detach().float()
        self.g = None if gram is None else gram.float().to(self.w.device)
        self.factor = None if factor is None else factor.float().to(self.w.device)
        self.a = self.w @ self.g if self.g is not None else (self.w @ self.factor) @ self.factor.T  # A = W G
        self.yy = (self.w * self.a).sum(1, dtype=torch.float64)  # |Y_i|²

    def __call__(self, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self.combine(*self.terms(self.w * mask))

    def terms(self, p: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_j P_ij A_ij, |P_i X|²) of removed parts ``p`` (the rows ``rows`` of the matrix, or all), fp64."""
        a = self.a if rows is None else self.a[rows]
        cross = (p * a).sum(1, dtype=torch.float64)
        if self.factor is not None:
            err = (p @ self.factor).square().sum(1, dtype=torch.float64)  # |P_i L|² = |P_i X|²
        else:
            err = (p * (p @ self.g)).sum(1, dtype=torch.float64)
        return cross, err

    def combine(self, cross: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(q, Q) from every row's terms."""
        dot = self.yy - cross  # Y_i · Ŷ_i
        hat = (self.yy - 2 * cross + err).clamp_min(0.0)  # |Ŷ_i|²
        denom = (self.yy * hat).sqrt()
        q = torch.where(self.yy > 0, dot / denom.clamp_min(1e-300), torch.ones_like(dot)).clamp(-1.0, 1.0)
        total = float((self.yy.sum() * hat.sum()).sqrt())
        flat = float(dot.sum()) / total if total > 0 else 1.0
        return q, flat


class _CountQuality:
    """(q, Q) of per-row removal counts, remembering each row's terms per count: a row's terms only
    depend on its own count, and the search revisits counts often (every run starts from the uniform
    ones, small steps move few rows), so only rows at a count not seen before are computed."""

    def __init__(self, quality: OutputQuality, order: torch.Tensor):
        self.quality, self.order = quality, order
        rows, cols = order.shape
        self.cross = torch.full((rows, cols + 1), float("nan"), dtype=torch.float64)
        self.err = torch.full((rows, cols + 1), float("nan"), dtype=torch.float64)
        self.computed = 0  # rows computed (the cost)

    def __call__(self, counts: torch.Tensor) -> tuple[torch.Tensor, float]:
        idx = torch.arange(counts.numel())
        cross, err = self.cross[idx, counts], self.err[idx, counts]
        todo = torch.nonzero(torch.isnan(err)).flatten()
        if todo.numel():
            sub = self.quality.w[todo] * mask_from_counts(self.order[todo], counts[todo])
            c, e = self.quality.terms(sub, todo)
            self.cross[todo, counts[todo]], self.err[todo, counts[todo]] = c, e
            cross[todo], err[todo] = c, e
            self.computed += todo.numel()
        return self.quality.combine(cross, err)


# ----------------------------------------------------------------------------- the search
def trim_rows(weight: torch.Tensor, metric: torch.Tensor, gram: torch.Tensor | None, target: float,
              config: TrimConfig | None = None, factor: torch.Tensor | None = None) -> TrimResult:
    """TRIM's row counts for one matrix: ``metric`` orders each row (smallest removed first, stable),
    ``gram`` = Σ x xᵀ over the calibration inputs (or ``factor`` L with L Lᵀ = Σ x xᵀ, e.g. the inputs
    [C, tokens]), ``target`` the matrix's ratio r."""
    cfg = (config or TrimConfig()).validate()
    rows, cols = weight.shape
    if not cfg.min_ratio <= target <= cfg.max_ratio:
        raise ValueError(f"TRIM keeps row ratios in [{cfg.min_ratio}, {cfg.max_ratio}]; the layer ratio {target} "
                         "is outside (raise TrimConfig.max_ratio or lower the ratio)")
    order = torch.sort(metric, dim=1, stable=True).indices
    quality = _CountQuality(OutputQuality(weight, gram, factor), order)
    uniform = torch.full((rows,), float(target), dtype=torch.float64)
    counts0 = row_counts(uniform, cols, target)
    q0, flat0 = quality(counts0)
    evaluations = 1
    best = (flat0, counts0, uniform, None, 0)
    if rows < 2 or int(cols * target) == 0:
        return TrimResult(counts0, uniform, flat0, flat0, None, 0, evaluations)

    def run(step):
        nonlocal evaluations
        x, q = uniform, q0
        run_best = (flat0, counts0, uniform, step, 0)
        for it in range(1, cfg.iterations + 1):
            x = trim_step(x, q, step, target, cfg.min_ratio, cfg.max_ratio)
            counts = row_counts(x, cols, target)
            q, flat = quality(counts)
            evaluations += 1
            if flat > run_best[0]:
                run_best = (flat, counts, x, step, it)
        return run_best

    for ladder in (cfg.steps, cfg.negative_steps):
        previous = float("-inf")
        for step in ladder:
            got = run(step)
            if got[0] > best[0]:
                best = got
            if got[0] <= previous:
                break
            previous = got[0]
        if best[3] is not None:  # a positive step improved on uniform: no negative ones
            break
    flat, counts, x, step, it = best
    return TrimResult(counts, x.float(), flat0, flat, step, it, evaluations)


def trim_mask(weight: torch.Tensor, metric: torch.Tensor, inputs, target: float,
              config: TrimConfig | None = None) -> tuple[torch.Tensor, TrimResult]:
    """(mask, result): True at the weights TRIM removes (:func:`trim_rows`). ``inputs``: the Gram matrix
    [C, C], or an :class:`InputStats`."""
    gram, factor = (inputs.gram, inputs.factor) if isinstance(inputs, InputStats) else (inputs, None)
    res = trim_rows(weight, metric, gram, target, config, factor)
    order = torch.sort(metric, dim=1, stable=True).indices
    return mask_from_counts(order, res.counts), res


class InputStats:
    """What TRIM keeps of a Linear's calibration inputs (rows x of width C, fed in chunks by :meth:`add`):
    the inputs themselves while there are fewer than C of them (``factor`` = Xᵀ [C, n], G = X Xᵀ), then
    only the Gram matrix Σ x xᵀ [C, C]. Either way at most C² floats; evaluating a mask costs
    R·C·min(n, C)."""

    def __init__(self, cols: int, device=None):
        self.cols, self.n = cols, 0
        self._rows: list[torch.Tensor] = []
        self._gram: torch.Tensor | None = None
        self.device = device

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.cols).float()
        self.n += x.shape[0]
        if self._gram is None and self.n < self.cols:
            self._rows.append(x.clone())
            return
        if self._gram is None:
            self._gram = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=x.device)
            for r in self._rows:
                self._gram.addmm_(r.T, r)
            self._rows = []
        self._gram.addmm_(x.T, x)

    @property
    def gram(self) -> torch.Tensor | None:
        return self._gram

    @property
    def factor(self) -> torch.Tensor | None:
        if self._gram is not None:
            return None
        if not self._rows:
            return torch.zeros(self.cols, 1, device=self.device)
        return torch.cat(self._rows).T


def config_dict(config: TrimConfig) -> dict:
    d = asdict(config)
    d["steps"], d["negative_steps"] = list(config.steps), list(config.negative_steps)
    return d
