"""Policy-gradient structural pruning (SPEC §10; Gao et al., arXiv 2406.10576): which units to
remove, learned from forward passes only.

Every prunable unit u (an attention unit at the configured granularity, an MLP channel) has a
keep-probability s_u, held apart from the model's weights. Each step draws S masks
m ~ Bernoulli(s), measures the calibration loss L(m) of each masked model with a forward pass
(the S masks of a step run as one batch, ``parallel`` at a time), and moves s along the
score-function estimate of the gradient of the expected loss::

    ĝ = 1/S · Σ_i (L(m_i) − b_i) · ∇_s log p(m_i | s),    ∇_s log p(m | s) = (m − s) / (s (1 − s))

No backward pass runs through the LLM. The masks act through forward pre-hooks on the inputs of
o_proj (a query head's output) and down_proj (an MLP channel's activation): the weights are
neither copied nor changed, and a masked forward equals the forward of the pruned model.

Variance reduction, ``baseline``:

* ``moving`` (the paper's): b is a moving average of the losses, b ← β·b + (1 − β)·mean L. The
  calibration rows are cut into fixed mini-batches and each keeps its own average, so the
  difference between two batches' losses does not enter ĝ (the first visit of a mini-batch uses
  the ``loo`` baseline);
* ``loo``: b_i is the mean loss of the step's other samples on the same rows (needs S ≥ 2).

Both keep ĝ unbiased. ``parametrization='logit'`` runs the same estimator on θ = logit(s)
(∇_θ log p = m − s: bounded, where ∇_s log p grows as 1/(1 − s) for nearly certain units) and
restores the budget by one common shift of θ; it is the default because it is the one that
improves on its initialisation here (SmolLM2, Taylor init, 100 steps, 3 seeds: held-out PPL@128
below one-shot Taylor's in 3/3 seeds, where the probability form is above it in 3/3; see
benchmarks/results/policy). The paper's ``probability`` form: an Adam step on s, then s is
projected back onto the budget
set {Σ_u c_u s_u = K, 0 ≤ s ≤ 1}, c_u the unit's parameter count: s ← clip(s − ν c_u / c̄, 0, 1)
with ν found by bisection (the Euclidean projection onto that set, as probabilistic-masking
methods do). K, the expected kept parameters of the prunable units, equals what the local rule
at ``ratio`` keeps in the same layer ranges, so the layers get different widths while the total
matches the one-shot model's.

Initialisation (``init``): ``none`` gives every unit s = K / Σc (no preference); ``taylor``,
``moreau`` and ``magnitude`` rank each layer's units by that method's score (percentile q_u
within the layer, attention and MLP apart) and set s_u = σ(κ (q_u − r_l)), r_l the fraction of
those units the local rule removes, then project: the most likely mask is then the one-shot
local plan, which the policy refines, across layers included.

The calibration loss of the deterministic final mask is measured before and after the search
(``mask_loss_init``, ``mask_loss_final`` in the result): whether the search improved its own
objective, apart from how that carries to held-out text.

Final mask: units are removed in increasing s while the parameters removed stay within the
target (with ``query-heads``, one more query head from every KV group at a time, scored by the
mean s of those heads, so n_rep stays uniform). The kept model is at most one unit's parameters
larger than the target (an MLP channel, ~3·hidden, when channels are prunable) and never
smaller; it then goes through :func:`moreau_pruner.prune.apply.prune_structure` like every other plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..score import registry
from ..score.importance import LayerScores
from ..score.methods import POLICY_INITS as INITS
from . import rules
from .apply import PruneResult, prune_structure
from .config import PruneConfig
from .plan import count_parameters, local_unit_counts, unit_params
from ..model.structure import ModelStructure
from .target import PruneTarget, as_target
BASELINES = ("moving", "loo")
PARAMETRIZATIONS = ("probability", "logit")


@dataclass
class PolicyConfig:
    """Settings of the policy-gradient search (the defaults finish SmolLM2-135M on an idle 2-core
    CPU in about five minutes: 400 forwards of one 64-token sequence)."""

    steps: int = 100
    lr: float = 0.02  # Adam step on the keep-probabilities
    samples: int = 4  # masks drawn per step, S
    batch_size: int = 1  # calibration rows per step (fixed mini-batches, visited in turn)
    parallel: int | None = None  # masks per forward pass (None: all S at once)
    baseline: str = "moving"
    momentum: float = 0.9  # β of the moving baseline
    init: str = "none"
    sharpness: float = 10.0  # κ of the metric initialisation
    eps: float = 1e-3  # s is clamped to [eps, 1 - eps] inside ∇ log p
    seed: int = 0
    parametrization: str = "logit"  # Adam on the logit θ of s (default) or on s itself (the paper's)

    def __post_init__(self) -> None:
        for name in ("steps", "samples", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"policy {name} must be a positive integer, got {v!r}")
        if self.parallel is not None and (not isinstance(self.parallel, int) or self.parallel < 1):
            raise ValueError(f"policy parallel must be a positive integer or None, got {self.parallel!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"policy lr must be a positive number, got {self.lr}")
        if self.baseline not in BASELINES:
            raise ValueError(f"policy baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.baseline == "loo" and self.samples < 2:
            raise ValueError("the 'loo' baseline needs at least 2 samples per step (use baseline='moving')")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"policy momentum must be in [0, 1), got {self.momentum}")
        if self.init not in INITS:
            raise ValueError(f"--init must be one of {', '.join(INITS)} for the policy-gradient pruner, "
                             f"got {self.init!r}")
        if not self.sharpness > 0:
            raise ValueError(f"policy sharpness must be positive, got {self.sharpness}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"policy parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"policy eps must be in (0, 0.5), got {self.eps}")


@dataclass
class Segment:
    """The units of one layer and kind, at positions start .. start+n of the flat probability vector."""

    layer: int
    kind: str  # "attn" or "mlp"
    start: int
    n: int
    cost: int  # parameters of one unit
    n_kv: int = 1  # attention: KV heads; query-heads units are grouped by KV head
    n_rep: int = 1
    head_dim: int = 1
    per_group: bool = False  # query-heads granularity: units are query heads


class UnitTable:
    """Every prunable unit of the model in the configured ranges, as one flat vector."""

    def __init__(self, target: PruneTarget):
        structure, cfg, attn, mlp = target.structure, target.config, target.attn_range, target.mlp_range
        self.segments: list[Segment] = []
        pos = 0
        for ls in structure.layers:
            d = ls.head_dim
            head, kv, channel = unit_params(ls, structure.hidden_size)
            if ls.index in attn:
                if cfg.granularity == "kv-group":
                    seg = Segment(ls.index, "attn", pos, ls.n_kv_heads, ls.n_rep * head + kv, ls.n_kv_heads,
                                  ls.n_rep, d)
                else:
                    seg = Segment(ls.index, "attn", pos, ls.n_heads, head, ls.n_kv_heads, ls.n_rep, d,
                                  per_group=True)
                self.segments.append(seg)
                pos += seg.n
            if ls.index in mlp:
                self.segments.append(Segment(ls.index, "mlp", pos, ls.intermediate_size, channel))
                pos += ls.intermediate_size
        if pos == 0:
            raise ValueError("no prunable units: the attention and MLP layer ranges are both empty")
        self.size = pos
        self.cost = torch.empty(pos, dtype=torch.float64)
        for seg in self.segments:
            self.cost[seg.start:seg.start + seg.n] = float(seg.cost)
        self.total = float(self.cost.sum())

    def max_removable(self) -> int:
        """Parameters removed when every layer keeps one unit of each kind (one query head per group)."""
        out = 0
        for seg in self.segments:
            keep = seg.n_kv if seg.per_group else 1
            out += (seg.n - keep) * seg.cost
        return out


# ----------------------------------------------------------------------------- the estimator
def log_prob_grad(masks: torch.Tensor, probs: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """∇_s log p(m | s) of independent Bernoulli(s) masks ``masks`` [S, U]: (m − s) / (s (1 − s))."""
    s = probs.clamp(eps, 1 - eps)
    return (masks.to(s.dtype) - s) / (s * (1 - s))


def loo_baseline(losses: torch.Tensor) -> torch.Tensor:
    """For each sample, the mean loss of the other samples (needs S ≥ 2)."""
    n = losses.numel()
    if n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples")
    return (losses.sum() - losses) / (n - 1)


def score_function_gradient(losses: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                            baseline: torch.Tensor | float, eps: float = 1e-3) -> torch.Tensor:
    """ĝ = mean_i (L_i − b_i) ∇_s log p(m_i | s): an unbiased estimate of ∇_s E_{m~Bern(s)}[L(m)]
    when b_i does not depend on m_i."""
    adv = (losses.to(torch.float64) - torch.as_tensor(baseline, dtype=torch.float64))
    return (adv.reshape(-1, 1) * log_prob_grad(masks, probs.to(torch.float64), eps)).mean(0)


def shift_logits_to_budget(theta: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 100) -> torch.Tensor:
    """θ + t with the one shift t that makes Σ cost·σ(θ + t) = budget (bisection; Σ is increasing in t)."""
    if not 0.0 < budget < float(cost.sum()):
        raise ValueError(f"budget {budget} is outside (0, {float(cost.sum())})")
    lo, hi = -60.0, 60.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((cost * torch.sigmoid(theta + mid)).sum()) > budget:
            hi = mid
        else:
            lo = mid
    return theta + 0.5 * (lo + hi)


def project_budget(probs: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 100) -> torch.Tensor:
    """Euclidean projection of ``probs`` onto {Σ cost·s = budget, 0 ≤ s ≤ 1}: clip(s − ν cost/c̄, 0, 1)."""
    if not 0.0 <= budget <= float(cost.sum()):
        raise ValueError(f"budget {budget} is outside [0, {float(cost.sum())}]")
    w = cost / cost.mean()

    def kept(nu):
        return float((cost * (probs - nu * w).clamp(0, 1)).sum())

    lo, hi = -1.0, 1.0
    while kept(lo) < budget:
        lo *= 2
    while kept(hi) > budget:
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if kept(mid) > budget:
            lo = mid
        else:
            hi = mid
    return (probs - 0.5 * (lo + hi) * w).clamp(0, 1)


# ----------------------------------------------------------------------------- masked forward
class MaskedForward:
    """Forward pre-hooks that multiply o_proj's input by a head mask and down_proj's input by a
    channel mask, per batch row; ``losses(ids, masks)`` gives each mask's mean token loss."""

    def __init__(self, structure: ModelStructure, table: UnitTable):
        self.structure, self.table = structure, table
        self.current: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        by_layer = {ls.index: ls for ls in structure.layers}
        for seg in table.segments:
            ls = by_layer[seg.layer]
            mod = ls.o if seg.kind == "attn" else ls.down
            self.handles.append(mod.register_forward_pre_hook(self._hook((seg.layer, seg.kind))))

    def _hook(self, key):
        def fn(_mod, args):
            mask = self.current.get(key)
            if mask is None:
                return None
            x = args[0]
            return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.current = {}

    def _set(self, masks: torch.Tensor, rows: int) -> None:
        """Row-wise masks for ``masks`` [P, U] over P·rows batch rows (sample-major)."""
        for seg in self.table.segments:
            m = masks[:, seg.start:seg.start + seg.n].float()
            if seg.kind == "attn":
                if not seg.per_group:  # a KV group masks its n_rep query heads
                    m = m.repeat_interleave(seg.n_rep, dim=1)
                m = m.repeat_interleave(seg.head_dim, dim=1)
            self.current[(seg.layer, seg.kind)] = m.repeat_interleave(rows, dim=0).unsqueeze(1)

    @torch.inference_mode()
    def losses(self, ids: torch.Tensor, masks: torch.Tensor, parallel: int | None = None) -> torch.Tensor:
        """Mean next-token loss of the model under each mask of ``masks`` [S, U] on rows ``ids`` [B, T]."""
        model = self.structure.model
        out = []
        step = parallel or masks.shape[0]
        for i in range(0, masks.shape[0], step):
            chunk = masks[i:i + step]
            p, b = chunk.shape[0], ids.shape[0]
            self._set(chunk, b)
            try:
                logits = model(input_ids=ids.repeat(p, 1)).logits
            finally:
                self.current = {}
            tok = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                              ids.repeat(p, 1)[:, 1:].flatten(), reduction="none")
            out.append(tok.view(p, b, -1).mean(dim=(1, 2)).double().cpu())
        return torch.cat(out)


# ----------------------------------------------------------------------------- initialisation
def init_probs(table: UnitTable, budget: float, scores=None, target: PruneTarget | None = None,
               sharpness: float = 10.0) -> torch.Tensor:
    """Starting keep-probabilities (module docstring): uniform, or σ(κ (q − r_l)) from ``scores``
    (the local rule's counts in ``target`` give each layer's r_l)."""
    if scores is None:
        return torch.full((table.size,), budget / table.total, dtype=torch.float64)
    counts = local_unit_counts(target.with_config(replace(target.config, scope="local")))
    by_layer = {sc.layer: sc for sc in scores}
    s = torch.empty(table.size, dtype=torch.float64)
    for seg in table.segments:
        sc = by_layer[seg.layer]
        vals = (sc.attention if seg.kind == "attn" else sc.mlp).double().cpu()
        attn_n, mlp_n = counts[seg.layer]
        if seg.kind == "attn":
            removed = (attn_n or 0) / (seg.n_rep if seg.per_group else seg.n)
        else:
            removed = (mlp_n or 0) / seg.n
        if seg.per_group:  # rank within each KV group: the local rule removes heads per group
            vals = vals.view(seg.n_kv, seg.n_rep)
            ranks = torch.argsort(torch.argsort(vals, dim=1, stable=True), dim=1).double()
            q = ((ranks + 0.5) / seg.n_rep).flatten()
        else:
            ranks = torch.argsort(torch.argsort(vals, stable=True)).double()
            q = (ranks + 0.5) / seg.n
        s[seg.start:seg.start + seg.n] = torch.sigmoid(sharpness * (q - removed))
    return project_budget(s, table.cost, budget)


# ----------------------------------------------------------------------------- final mask
def final_removal(table: UnitTable, probs: torch.Tensor, target: int) -> dict[tuple[int, str], int]:
    """Units removed per (layer, kind), lowest s first, keeping the parameters removed ≤ ``target``
    (query-heads: counts of heads taken from every KV group). Each layer keeps one unit of each kind."""
    cands = []  # (score, layer, kind order, index, cost, key)
    for seg in table.segments:
        p = probs[seg.start:seg.start + seg.n]
        key = (seg.layer, seg.kind)
        if seg.per_group:
            levels = p.view(seg.n_kv, seg.n_rep).sort(dim=1).values.mean(0)
            for j in range(seg.n_rep - 1):
                cands.append((float(levels[j]), seg.layer, 0, j, seg.cost * seg.n_kv, key))
        else:
            order = torch.argsort(p, stable=True)
            for rank, u in enumerate(order[:seg.n - 1].tolist()):
                cands.append((float(p[u]), seg.layer, 0 if seg.kind == "attn" else 1, rank, seg.cost, key))
    removed = {(seg.layer, seg.kind): 0 for seg in table.segments}
    done = 0
    for score, _layer, _kind, _idx, cost, key in sorted(cands, key=lambda c: c[:4]):
        if done + cost <= target:
            removed[key] += 1
            done += cost
    return removed


def keep_mask(table: UnitTable, probs: torch.Tensor, removed: dict[tuple[int, str], int]) -> torch.Tensor:
    """The deterministic keep mask [U] of :func:`final_removal`'s counts: in each layer and kind the
    lowest-s units go (query-heads: the lowest in every KV group), as prune_structure removes them."""
    keep = torch.ones(table.size, dtype=torch.bool)
    for seg in table.segments:
        n = removed[(seg.layer, seg.kind)]
        p = probs[seg.start:seg.start + seg.n]
        if seg.per_group:
            for g, row in enumerate(p.view(seg.n_kv, seg.n_rep)):
                for j in torch.argsort(row, stable=True)[:n].tolist():
                    keep[seg.start + g * seg.n_rep + j] = False
        else:
            keep[seg.start + torch.argsort(p, stable=True)[:n]] = False
    return keep


def removal_target(target: PruneTarget, table: UnitTable, target_params: int | None) -> int:
    """Parameters to remove: the local rule's at the target's ratio, or down to ``target_params`` kept."""
    from .allocation import structured_removal

    cfg = target.config
    before = count_parameters(target.structure.model)
    if target_params is None:
        removal = structured_removal(target.with_config(replace(cfg, scope="local")))
        layers = sorted({seg.layer for seg in table.segments})
        goal = sum(removal(layer, cfg.ratio) for layer in layers)
    else:
        goal = before - int(target_params)
    most = table.max_removable()
    if goal <= 0:
        raise ValueError(f"the budget removes nothing (target {before - goal:,} of {before:,} parameters kept); "
                         "raise the ratio or lower target_params")
    if goal > most:
        raise ValueError(f"the prunable units cannot meet the budget: it asks to remove {goal:,} parameters but "
                         f"removing every unit but one per layer and kind removes {most:,} "
                         f"(at least {before - most:,} of {before:,} parameters stay); lower the ratio or widen "
                         "the layer ranges")
    return goal


# ----------------------------------------------------------------------------- the pruner
def policy_prune(model: nn.Module, batch: torch.Tensor, target: PruneTarget | PruneConfig | None = None,
                 policy: PolicyConfig | None = None, *, scorer=None, target_params: int | None = None,
                 progress: bool = True, compensate=None) -> PruneResult:
    """Learn keep-probabilities by policy gradient and prune ``model`` in place to the budget.

    ``target`` (a :class:`~moreau_pruner.prune.target.PruneTarget`, or a PruneConfig resolved against
    the model) gives the layer ranges, granularity and ratio (the budget: the parameters the local
    rule removes at that ratio; ``target_params`` sets the kept parameter count instead).
    ``scorer(method, target) -> (scores, estimate, timings)`` gives the metric initialisation's scores
    (:func:`moreau_pruner.score.registry.scorer`; default: that of ``model`` and ``batch`` with the
    default Moreau settings and ``policy.seed``). ``compensate``: ``prune_structure``'s weight
    compensation of the final mask (:func:`moreau_pruner.prune.compensate.compensator`). Returns a
    :class:`~moreau_pruner.prune.apply.PruneResult` whose ``policy`` dict holds the loss curve, the forward/backward counts and the budget."""
    policy = policy or PolicyConfig()
    target = target if isinstance(target, PruneTarget) else as_target(model, target)
    prune = target.config
    rules.check(rules.Request("policy-gradient", uniform=prune.uniform, scope=prune.scope, round_to=prune.round_to,
                              layer_ratios=bool(prune.layer_ratios)))
    if batch is None or batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError("the policy-gradient pruner needs a calibration batch of token ids [rows, tokens >= 2]")
    structure = target.structure
    table = UnitTable(target)
    before = count_parameters(model)
    goal = removal_target(target, table, target_params)
    budget = table.total - goal
    timings: dict[str, float] = {}
    backward_seq = forward_seq = 0
    t0 = time.perf_counter()
    scores = None
    if policy.init != "none":
        score = scorer or registry.scorer(model, batch, None, registry.ScoringOptions(seed=policy.seed),
                                          progress=progress)
        scores, est, more = score(policy.init, target.with_config(replace(prune, scope="local")))
        timings.update({f"init_{k}": v for k, v in more.items()})
        if policy.init == "taylor":
            forward_seq += batch.shape[0]
            backward_seq += batch.shape[0]
        elif policy.init == "moreau":
            steps = est.config.iters * est.config.n_samples
            forward_seq += steps * batch.shape[0]
            backward_seq += steps * batch.shape[0]
    probs = init_probs(table, budget, scores, target, policy.sharpness)
    timings["init_s"] = time.perf_counter() - t0

    hooks = MaskedForward(structure, table)
    was_training = model.training
    model.eval()

    def mask_loss(p):  # calibration loss of the deterministic final mask of probabilities p
        keep = keep_mask(table, p, final_removal(table, p, goal)).unsqueeze(0)
        return float(torch.cat([hooks.losses(rows, keep) for rows in torch.split(batch, policy.batch_size)]).mean())

    gen = torch.Generator().manual_seed(policy.seed)
    chunks = list(torch.split(batch, policy.batch_size))
    logit = policy.parametrization == "logit"
    if logit:
        s = shift_logits_to_budget(torch.logit(probs.clamp(1e-6, 1 - 1e-6)), table.cost, budget)
        s.requires_grad_(True)
    else:
        s = probs.clone().requires_grad_(True)
    opt = torch.optim.Adam([s], lr=policy.lr)
    base: dict[int, float] = {}
    history = []
    t0 = time.perf_counter()
    bar = _progress(policy.steps, progress)
    try:
        init_loss = mask_loss(probs)
        forward_seq += batch.shape[0]
        for step in range(policy.steps):
            j = step % len(chunks)
            rows = chunks[j]
            with torch.no_grad():
                p = torch.sigmoid(s.detach()) if logit else s.detach()
                masks = torch.rand(policy.samples, table.size, generator=gen, dtype=torch.float64) < p
            losses = hooks.losses(rows, masks, policy.parallel)
            forward_seq += policy.samples * rows.shape[0]
            if policy.baseline == "loo" or (j not in base and policy.samples > 1):
                b = loo_baseline(losses)
            else:
                b = torch.full_like(losses, base.get(j, float(losses.mean())))
            if logit:  # ∇_θ log p(m | σ(θ)) = m − σ(θ)
                adv = (losses - b).reshape(-1, 1)
                grad = (adv * (masks.double() - p)).mean(0)
            else:
                grad = score_function_gradient(losses, masks, p, b, policy.eps)
            mean = float(losses.mean())
            base[j] = mean if j not in base else policy.momentum * base[j] + (1 - policy.momentum) * mean
            opt.zero_grad(set_to_none=False)
            s.grad = grad.to(s.dtype)
            opt.step()
            with torch.no_grad():
                if logit:
                    s.copy_(shift_logits_to_budget(s.detach(), table.cost, budget))
                else:
                    s.copy_(project_budget(s.detach(), table.cost, budget))
                p = torch.sigmoid(s.detach()) if logit else s.detach()
            kept = (before - table.total + float((table.cost * p).sum())) / before
            history.append({"step": step, "loss": mean, "expected_kept": kept})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.3f}", kept=f"{100 * kept:.2f}%")
        probs = torch.sigmoid(s.detach()) if logit else s.detach()
        final_loss = mask_loss(probs)
        forward_seq += batch.shape[0]
    finally:
        hooks.remove()
        if bar is not None:
            bar.close()
        model.train(was_training)
    timings["policy_s"] = time.perf_counter() - t0

    removed = final_removal(table, probs, goal)
    layer_scores, counts = [], {}
    segs = {(seg.layer, seg.kind): seg for seg in table.segments}
    for ls in structure.layers:
        a, m = segs.get((ls.index, "attn")), segs.get((ls.index, "mlp"))
        layer_scores.append(LayerScores(ls.index,
                                        probs[a.start:a.start + a.n].float() if a else None,
                                        probs[m.start:m.start + m.n].float() if m else None))
        counts[ls.index] = (removed[(ls.index, "attn")] if a else None, removed[(ls.index, "mlp")] if m else None)
    t0 = time.perf_counter()
    report = prune_structure(target.with_config(replace(prune, scope="local")), layer_scores, counts=counts,
                             compensate=compensate)
    report.scope = "global"
    timings["prune_s"] = time.perf_counter() - t0
    info = {"config": asdict(policy), "target_removed": goal, "removed": before - report.params_after,
            "budget_gap": goal - (before - report.params_after), "units": table.size,
            "forward_sequences": forward_seq, "backward_sequences": backward_seq,
            "final_loss": history[-1]["loss"] if history else None,
            "loss_first": history[0]["loss"] if history else None,
            "mask_loss_init": init_loss, "mask_loss_final": final_loss, "history": history}
    return PruneResult(report, layer_scores, "policy-gradient", None, timings, None, 1, policy=info)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="policy gradient", unit="step")
