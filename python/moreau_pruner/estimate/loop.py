"""The Moreau-envelope gradient estimate (SPEC §2 and §3), written once.

``estimate(model, batch, MoreauConfig(...))`` returns, for every scored parameter, the average of
the last ``avg_last`` proximal iterates δ (fp32), which replaces the gradient in the first-order
importance. Each step, for each noise sample, the weights are perturbed to w̃ = w + ξ|c·w| + δ,
the calibration loss is backpropagated (over micro-batches), and δ takes a proximal step on the
gradient; the weights are never modified (the model is bit-identical at the end).

Where w̃ lives and where the gradient is consumed is the memory strategy's business
(:mod:`.strategies`: ``reference``, ``lean``, ``regen``, ``fsdp``); how the batch is split and
which sums are reduced across processes is its runner's (:mod:`.runner`). The elementwise work
runs through the ``moreau_kernels`` ops, so the backend (pure PyTorch ``reference``, C++ ``cpu``,
``cuda``, ``triton``) is chosen by :mod:`moreau_kernels.dispatch`; ``result.backend`` says which.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
from torch import nn

import moreau_kernels as mk

from ..model.structure import discover
from .checkpointing import activation_checkpointing
from .config import EstimatorError, MoreauConfig, MoreauResult
from .groups import structure_groups, structure_prox
from .memory import check_fits, plan_memory
from .params import check_finite_weights, local_tensor, score_predicate, unique_named_parameters
from .runner import differentiable, lm_loss
from .strategies import STRATEGIES
from .strategies.base import NAMES, Strategy, Updates, refusals


def resolve(strategy: str | Strategy, config: MoreauConfig, gradient_checkpointing: bool = False) -> Strategy:
    """The strategy object for ``strategy`` (a name of :data:`NAMES` or a :class:`Strategy`);
    ``auto`` is ``lean`` when it can run ``config``, else ``reference``. Raises ``ValueError``
    with the reasons when the strategy cannot run ``config``."""
    if isinstance(strategy, str):
        if strategy not in NAMES:
            raise ValueError(f"strategy must be one of {NAMES} or a Strategy object, got {strategy!r}")
        if strategy == "auto":
            strategy = "reference" if refusals("lean", config) else "lean"
        strategy = STRATEGIES[strategy]()
    elif not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a name or a Strategy object, got {type(strategy).__name__}")
    why = strategy.refusals(config, gradient_checkpointing)
    if why:
        instead = _INSTEAD.get(strategy.name, "")
        raise ValueError(f"the {strategy.name} path cannot run this configuration: {'; '.join(why)}"
                         + (f"; use {instead}" if instead else ""))
    return strategy


#: what to use when a strategy refuses a configuration
_INSTEAD = {"lean": "strategy='reference'", "regen": "strategy='reference'",
            "reference": "strategy='lean' or 'regen'"}


def estimate(model: nn.Module, batch: torch.Tensor, config: MoreauConfig | None = None,
             strategy: str | Strategy = "auto", *, score: Callable[[str], bool] | Iterable[str] | None = None,
             progress: bool = True, loss_fn: Callable = lm_loss, structure=None,
             on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
             gradient_checkpointing: bool = False, check_memory: bool = False) -> MoreauResult:
    """Run the proximal loop of SPEC §2/§3 on ``batch`` (LongTensor [n, seq]) and return Ĝ.

    ``strategy``: ``auto`` (``lean`` when it applies: ``group='row'``, Philox noise; else
    ``reference``), ``reference``, ``lean``, ``regen`` (lean without the perturbed copy of the
    linear weights: the least memory, one more perturb of each linear weight per backward), or a
    strategy object (``FsdpStrategy(runner)`` on FSDP2 ranks, where ``batch`` is the whole batch and
    each rank runs its rows). Every strategy gives the same δ, Ĝ and log on the same backend;
    ``result.path`` says which ran.

    ``score`` selects the parameters whose Ĝ is returned (names, or a predicate; None = all):
    only those keep an accumulator. ``structure`` (a :class:`~moreau_pruner.model.structure.ModelStructure`)
    is used by ``group='structure'`` (discovered when None). ``on_step(t, {name: delta})`` is called
    after every update with the live fp32 iterates δ_{t+1} (for diagnostics; do not modify them).
    ``gradient_checkpointing`` (lean, regen): HF activation checkpointing. ``check_memory=True``
    plans the peak memory first and raises :class:`~moreau_pruner.estimate.memory.MemoryPlanError`
    with advice when it does not fit the free memory of the model's device.
    """
    cfg = config or MoreauConfig()
    strat = resolve(strategy, cfg, gradient_checkpointing)
    if check_memory:
        if strat.name not in STRATEGIES:
            raise ValueError(f"check_memory plans the one-process strategies ({', '.join(STRATEGIES)}), not "
                             f"{strat.name!r}; for FSDP2 ranks see python -m moreau_pruner.estimate.plans")
        dev = next(model.parameters()).device
        plan = plan_memory(model, tuple(batch.shape), cfg, strat.name, dev, score=score,
                           gradient_checkpointing=gradient_checkpointing)
        check_fits(plan, dev, weights_loaded=True)
    return _run(model, batch, cfg, strat, score, progress, loss_fn, structure, on_step, gradient_checkpointing)


def _run(model, batch, cfg: MoreauConfig, strategy: Strategy, score, progress, loss_fn, structure, on_step,
         gradient_checkpointing) -> MoreauResult:
    named = unique_named_parameters(model)
    if not named:
        raise EstimatorError("the model has no parameters")
    check_finite_weights((n, local_tensor(p)) for n, p in named)
    wanted = score_predicate(score, named)
    runner = strategy.runner
    readable = named[0][1].device.type != "meta"  # meta (memory tracking): shapes only, no values to read
    rows = runner.local_rows(batch)
    K = min(cfg.avg_last, cfg.iters)
    upd = Updates(cfg, len(named))
    log: list[dict] = []
    sumsq = None
    states = []

    def before_backward(last_micro_batch: bool) -> None:
        upd.last = last_sample and last_micro_batch

    with differentiable(model, named, runner):
        try:
            states = strategy.prepare(model, named, wanted, cfg, upd)
            groups = None
            if cfg.group == "structure":
                groups = structure_groups(structure if structure is not None else discover(model), states)
            with activation_checkpointing(model, gradient_checkpointing):
                bar = _progress(range(cfg.iters), progress and runner.rank == 0, strategy.label)
                for t in bar:
                    t0 = time.perf_counter()
                    l2 = 0.0 if sumsq is None else 0.5 * float(sumsq.sum()) / cfg.lamb
                    loss = 0.0
                    upd.reset(t >= cfg.iters - K)
                    for s in range(cfg.n_samples):
                        last_sample = s == cfg.n_samples - 1
                        try:
                            strategy.perturb(t * cfg.n_samples + s)
                            loss = runner.forward_backward(model, rows, batch.shape[0], cfg.micro_batch_size, loss_fn,
                                                           1.0 / cfg.n_samples, loss, before_backward)
                        finally:
                            upd.last = False
                            strategy.restore()
                    if groups is not None:
                        structure_prox(groups, cfg, upd, strategy)
                    for k, st in enumerate(states):  # gradients not consumed during the backward
                        if not upd.done[k]:
                            upd.update(k, st, strategy.gradient(st))
                            strategy.clear(st)
                    if readable:
                        loss = runner.sum_loss(loss)
                        sumsq = runner.sum_sumsq(sums_to_cpu(upd.sums))
                        log.append(finish_step(t, states, sumsq, loss, l2, t0, on_step, bar))
        finally:
            strategy.release()
    if not upd.backend and states:
        st0 = states[0]
        upd.backend = mk.select("prox_update_", st0.delta, st0.delta, st0.acc)
    grads = {st.name: st.acc.div_(K) for st in states if st.acc is not None}
    return MoreauResult(grads=grads, log=log, config=cfg, backend=upd.backend, path=strategy.name,
                        gradient_checkpointing=gradient_checkpointing)


def sums_to_cpu(sums: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor Σδ² (0-d device tensors) as float64 on the CPU: one transfer per device per
    step, instead of a host sync per parameter."""
    out = torch.empty(len(sums), dtype=torch.float64)
    by_dev: dict[torch.device, list[int]] = {}
    for k, s in enumerate(sums):
        by_dev.setdefault(s.device, []).append(k)
    for ks in by_dev.values():
        out[ks] = torch.stack([sums[k].reshape(()).float() for k in ks]).cpu().double()
    return out


def finish_step(t: int, states, sumsq: torch.Tensor, loss: float, l2: float, t0: float, on_step, bar) -> dict:
    """End of step t: refuse non-finite iterates (naming the parameters), call ``on_step``,
    update the progress bar, and return the log record."""
    bad = [states[k].name for k in torch.nonzero(~torch.isfinite(sumsq)).flatten().tolist()]
    if bad:
        raise EstimatorError(f"non-finite gradient or δ at step {t} in {', '.join(bad[:5])}")
    rec = {"step": t, "loss": loss, "l2": l2, "delta_sq": float(sumsq.sum()), "seconds": time.perf_counter() - t0}
    if on_step is not None:
        on_step(t, {st.name: st.delta for st in states})
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{loss:.4f}", l2=f"{l2:.4g}")
    return rec


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
