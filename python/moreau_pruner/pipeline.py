"""The pruning pipeline: load → calibrate → score → plan → apply → evaluate → save → report.

Each stage is a function of its own, usable alone (larger compressors build on them):

=========  =================================================================================
load       :func:`moreau_pruner.model.loading.load_model` (GGUF, HF or pruned directories)
calibrate  :func:`moreau_pruner.job.calibrate`: the calibration batch; ``evaluation_ids``: the held-out tokens
resolve    :func:`moreau_pruner.prune.target.resolve_target`: the units and layer ranges, once
score      :func:`moreau_pruner.score.registry.compute_scores` (moreau, taylor, magnitude,
           random; FSDP2 through a scoring context), or the policy-gradient search
plan/apply :func:`moreau_pruner.prune.apply.prune_structure` (local, global, uniform rules)
evaluate   :class:`Perplexity`: held-out perplexity at several window lengths
save       :func:`save`: the per-layer directory or, ``uniform``, a stock one
report     :func:`build_report`: the dict ``moreau-prune`` prints and writes
=========  =================================================================================

:func:`prune_model` is the library's one call (score → plan → apply, with per-layer allocation,
iterative rounds and the policy search); :func:`run` runs a whole :class:`PruneJob`, in one process
or on FSDP2 ranks (``job.distributed``), and is what the ``moreau-prune`` CLI calls after parsing.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import moreau_kernels as mk

from .estimate.config import MoreauConfig
from .io.target import check_space, keep_report, model_bytes
from .model.checks import check_token_ids
from .prune import rules
from .prune.allocation import allocate, allocate_structured, parse_allocation
from .prune.apply import PruneReport, PruneResult, prune_structure
from .prune.compensate import CompensateConfig, compensator
from .prune.config import PruneConfig
from .prune.plan import count_parameters, local_unit_counts, prunable_weights
from .prune.policy import PolicyConfig, policy_prune
from .prune.rounds import combine_reports, removed_units, share
from .prune.target import PruneTarget, resolve_target
from .score import methods
from .score.registry import ScoringOptions, score_units, scorer
from .job import (DataSettings, PruneJob, UnstructuredSettings, calibrate, compensation_batch, evaluation_ids,
                  half_gemm_context, half_gemm_mode)

__all__ = ["DataSettings", "Perplexity", "PruneJob", "UnstructuredSettings", "build_report", "calibrate",
           "evaluation_ids", "prune_model", "prune_target", "run", "save"]


# ============================================================================ the library's one call
def prune_model(model: nn.Module, batch: torch.Tensor | None, method: str = "moreau", prune: PruneConfig | None = None,
                *, moreau: MoreauConfig | None = None, policy: PolicyConfig | None = None, reduction: str = "sum",
                vectorize: bool = False, seed: int = 0, micro_batch_size: int | None = None, progress: bool = True,
                allocation: str = "uniform", rounds: int = 1, taylor_variant: str = "param_first",
                estimator_path: str = "auto", gradient_checkpointing: bool = False, check_memory: bool = False,
                head_score: str = "unit", target_params: int | None = None,
                compensate: CompensateConfig | None = None) -> PruneResult:
    """Score the model's units with ``method`` on ``batch`` and prune it in place.

    ``prune``: what to prune (:class:`~moreau_pruner.prune.config.PruneConfig`); ``moreau``: the
    Moreau estimate's settings; ``policy``: the policy-gradient search's
    (:class:`~moreau_pruner.prune.policy.PolicyConfig`, ``method='policy-gradient'``), whose budget
    ``target_params`` can set as a kept parameter count. The scoring options (``reduction``,
    ``vectorize``, ``seed``, ``micro_batch_size``, ``taylor_variant``, ``estimator_path``,
    ``gradient_checkpointing``, ``check_memory``, ``head_score``) are those of
    :class:`~moreau_pruner.score.registry.ScoringOptions`.

    ``allocation``: ``uniform`` (every pruned layer at ``prune.ratio``) or a per-layer allocator of
    :mod:`.prune.allocation` (``owl``, ``alpha``, ``farms``), fitted so the parameters removed match
    uniform ``prune.ratio``'s (heads go in whole steps; see :func:`.prune.allocation.structured_removal`).
    ``rounds`` K > 1 prunes iteratively: the final size is that of one-shot pruning, reached in K
    rounds that each re-score the partly pruned model and remove about 1/K of the units (local
    scope: of each layer's units to remove; global scope: of the weights to remove). The report
    covers all rounds (kept indices refer to the original model); ``scores`` and ``estimate`` are
    those of the last round, ``timings`` their sums.
    ``prune.uniform``: the same widths in every layer, a stock-config model (:mod:`.io.stock` saves it);
    refused, before any work, with a per-layer allocation or a model whose layers differ in width.
    ``compensate``: once each round's units are chosen, update the weights that stay so every pruned
    layer reproduces its dense output on the calibration activations (:mod:`.prune.compensate`, SPEC
    §11; its report is ``report.compensation``), before the next round scores.
    Every combination that cannot run is refused before any work (:mod:`.prune.rules`).
    """
    prune = prune or PruneConfig()
    rules.check(rules.Request(method, allocation=allocation, rounds=rounds, uniform=prune.uniform, scope=prune.scope,
                              round_to=prune.round_to, layer_ratios=bool(prune.layer_ratios),
                              policy=policy is not None, target_params=target_params is not None))
    options = ScoringOptions(reduction, vectorize, head_score, taylor_variant, seed, micro_batch_size, estimator_path,
                             gradient_checkpointing, check_memory)
    target = resolve_target(model, prune)
    comp = compensator(target.structure, compensate, batch, progress) if compensate is not None else None
    return prune_target(model, batch, method, target, moreau, options, allocation=allocation,
                        rounds=rounds, policy=policy, target_params=target_params, progress=progress,
                        compensate=comp)


def prune_target(model: nn.Module, batch: torch.Tensor | None, method: str, target: PruneTarget,
                 moreau: MoreauConfig | None, options: ScoringOptions, *, allocation: str = "uniform",
                 rounds: int = 1, policy: PolicyConfig | None = None, target_params: int | None = None,
                 progress: bool = True, context=None, compensate=None) -> PruneResult:
    """:func:`prune_model` with everything checked and resolved (the stage the CLI and the FSDP2 path
    share): allocation, then ``rounds`` × (score → plan → (compensate) → apply), or the policy search.
    ``compensate``: :func:`~moreau_pruner.prune.compensate.compensator`'s callable, or None."""
    if methods.get(method).search:
        policy = policy or PolicyConfig(seed=options.seed)
        score = scorer(model, batch, moreau, replace(options, seed=policy.seed), context, progress)
        res = policy_prune(model, batch, target, policy, scorer=score, target_params=target_params,
                           progress=progress, compensate=compensate)
        if res.report.compensation is not None:
            res.timings["compensate_s"] = res.report.compensation["seconds"]
        return res
    alloc = None
    timings: dict[str, float] = {}
    if allocation != "uniform":
        t0 = time.perf_counter()
        alloc = allocate_structured(model, target, allocation, batch, options.micro_batch_size)
        target = target.with_config(replace(target.config, layer_ratios=alloc.ratios))
        timings["allocation_s"] = time.perf_counter() - t0
    cfg = target.config
    final = local_unit_counts(target) if cfg.scope == "local" else None
    total0 = prunable_weights(target.structure, cfg.granularity, target.attn_range, target.mlp_range)
    before = count_parameters(model)
    reports: list[PruneReport] = []
    scores, est = [], None
    for k in range(1, rounds + 1):
        if k > 1:
            target = target.rediscover()
        counts, this = None, target
        if final is not None:  # this round's share of each layer's final removal
            done = {i: removed_units(reports, i, cfg.granularity) for i in final}
            counts = {i: tuple(None if n is None else share(n, k, rounds) - d
                               for n, d in zip(final[i], done[i])) for i in final}
        else:  # global: r of the original prunable weights, 1/K of it per round
            now = prunable_weights(target.structure, cfg.granularity, target.attn_range, target.mlp_range)
            ratio = (cfg.ratio * total0 * k / rounds - (total0 - now)) / now
            if ratio <= 0:
                continue
            this = target.with_config(replace(cfg, ratio=min(ratio, 1 - 1e-9)))
        scores, est, more = score_units(model, batch, method, this, moreau, options, context, progress)
        for key, v in more.items():
            timings[key] = timings.get(key, 0.0) + v
        t0 = time.perf_counter()
        reports.append(prune_structure(this, scores, counts=counts, compensate=compensate))
        timings["prune_s"] = timings.get("prune_s", 0.0) + time.perf_counter() - t0
    report = combine_reports(reports, cfg, before, count_parameters(model), rounds)
    if report.compensation is not None:
        timings["compensate_s"] = report.compensation["seconds"]
    return PruneResult(report, scores, method, est, timings, alloc.as_dict() if alloc else None, rounds)


# ============================================================================ a whole run (the CLI's)
def run(job: PruneJob) -> dict | None:
    """Run ``job``; returns the report (None on FSDP2 ranks other than 0). The kernel backend
    ``job.backend`` holds for the run only (the caller's choice is back afterwards)."""
    if job.distributed:
        from .distributed.fsdp import run_job

        return run_job(job, finish_sharded)
    with mk.use_backend(job.backend):
        return _run_here(job)


def _run_here(job: PruneJob) -> dict:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    from .model.loading import load_model

    model, tok = load_model(job.model, job.dtype, job.device)
    times["load_s"] = time.perf_counter() - t0
    if job.out:  # the output fits, before the long work
        check_space(job.out, model_bytes(model))
    target = resolve_target(model, job.prune)  # fail fast, before the long work
    batch = calibrate(tok, job.data, job.device)
    check_token_ids(model, batch, "the calibration text")
    comp = None
    if job.compensate is not None:
        comp_cfg = replace(job.compensate, batch=compensation_batch(tok, job, job.device))
        comp = compensator(target.structure, comp_cfg, batch, job.progress)
    eval_ids = evaluation_ids(tok, job.data)
    ppl = Perplexity(model, eval_ids, job.data, times, job.progress)
    half = half_gemm_mode(job)
    with half_gemm_context(job.dtype, half):
        dense = ppl("dense")
        if job.unstructured is not None:
            rep, extra = _unstructured(model, batch, job, times)
        else:
            result = prune_target(model, batch, job.method, target, job.moreau, job.options,
                                  allocation=job.allocation, rounds=job.rounds, policy=job.policy,
                                  progress=job.progress, compensate=comp)
            times.update(result.timings)
            rep, extra = result.report, _estimate_fields(result.estimate, result.allocation)
            if result.policy is not None:
                extra["policy"] = result.policy
        report = build_report(job, model, tok, rep, extra, batch, eval_ids, dense, ppl("pruned"), half, times)
    return finish(job, model, tok, report, times)


def _estimate_fields(est, allocation) -> dict:
    return {"moreau": est.summary() if est else None, "allocation": allocation,
            "backend": est.backend if est else mk.get_backend(), "estimator_path": getattr(est, "path", None)}


def finish_sharded(job: PruneJob, model: nn.Module, tok, batch: torch.Tensor, scores, est, times: dict,
                   half: str | None, extra: dict, device: torch.device, compensation=None) -> dict:
    """Rank 0 of an FSDP2 run: evaluate the gathered dense model, prune it with the ranks' common
    scores, evaluate it again, report and save. ``compensation``: (report, bias changes) of the
    ranks' weight compensation (:func:`moreau_pruner.distributed.compensate.compensate_fsdp`): the
    compensated weights came with the gather, the bias changes are installed here."""
    if job.data.eval_seq_lens:
        model.to(device)
    eval_ids = evaluation_ids(tok, job.data)
    ppl = Perplexity(model, eval_ids, job.data, times, job.progress)
    with half_gemm_context(job.dtype, half):
        dense = ppl("dense")
        t = time.perf_counter()
        rep = prune_structure(resolve_target(model, job.prune), scores)
        if compensation is not None:
            from .distributed.compensate import install_biases

            install_biases(model, compensation[1])
            rep.compensation, rep.params_after = compensation[0], count_parameters(model)
        times["prune_s"] = time.perf_counter() - t
        model.to(device)
        fields = {**_estimate_fields(est, None), "estimator_path": "fsdp" if est else None, **extra}
        report = build_report(job, model, tok, rep, fields, batch.cpu(), eval_ids, dense, ppl("pruned"), half, times)
    return finish(job, model, tok, report, times)


class Perplexity:
    """``ppl(tag)``: the model's perplexity at every window length of ``settings.eval_seq_lens`` on the
    first ``settings.eval_tokens`` held-out tokens (0: all), ``{str(n): ppl}``; each evaluation's
    time goes into ``times`` as ``eval_<tag>_<n>_s``."""

    def __init__(self, model: nn.Module, eval_ids, settings: DataSettings, times: dict, progress: bool):
        self.model, self.eval_ids, self.settings, self.times, self.progress = model, eval_ids, settings, times, progress

    def __call__(self, tag: str) -> dict[str, float]:
        from .evaluate import perplexity as ev

        out = {}
        for n in self.settings.eval_seq_lens:
            t = time.perf_counter()
            tokens = self.settings.eval_tokens
            out[str(n)] = ev.perplexity(self.model, None, self.eval_ids, seq_len=n,
                                        max_windows=max(1, tokens // n) if tokens else None, progress=self.progress)
            self.times[f"eval_{tag}_{n}_s"] = time.perf_counter() - t
        return out


class _UnstructuredReport:
    """The fields of a PruneReport that the report reads, for the unstructured path."""

    def __init__(self, model: nn.Module, nm):
        from .model.structure import discover

        s = discover(model)
        self.params_before = self.params_after = sum(p.numel() for p in model.parameters())
        self.kept_fraction = 1.0
        self.rounds = 1
        self.granularity = f"unstructured {nm or 'per-row'}"
        self.scope = "per-row"
        self.attn_layers = self.mlp_layers = list(range(s.num_layers))
        self.layers = s.widths()


def _unstructured(model: nn.Module, batch: torch.Tensor, job: PruneJob, times: dict):
    from .unstructured.prune import unstructured_prune

    us = job.unstructured
    layer_alloc, row_alloc = parse_allocation(us.allocation)
    ratios = None
    if layer_alloc != "uniform":
        t = time.perf_counter()
        ratios = allocate(model, job.prune.ratio, layer_alloc, batch).ratios
        times["allocation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rep = unstructured_prune(model, batch, job.method, sparsity=job.prune.ratio, nm=us.nm, layer_ratios=ratios,
                             moreau=job.moreau, seed=job.options.seed, keep_low_ratio=us.keep_low_ratio,
                             micro_batch_size=job.options.micro_batch_size, progress=job.progress,
                             sequential=not us.one_pass_activations, trim=row_alloc == "trim")
    times["unstructured_s"] = time.perf_counter() - t
    trim_rows = [{"name": r["name"], **r["trim"]} for r in rep["layers"] if "trim" in r]
    extra = {"moreau": rep.get("moreau"),
             "unstructured": {"overall": rep["overall"], "per_layer": rep["per_layer"], "layer_ratios": ratios,
                              "sequential": rep.get("sequential"), "rows": row_alloc or "uniform",
                              "trim": rep.get("trim_summary"), "trim_matrices": trim_rows or None}}
    nm = f"{us.nm[0]}:{us.nm[1]}" if us.nm else None
    return _UnstructuredReport(model, nm), extra


def _compensation_text(job: PruneJob) -> str:
    """Which text the compensation windows came from, for the report."""
    d = job.data
    if job.compensate_batch is None:
        return "the scoring batch"
    return job.compensate_calib or d.calib_file or d.calib


def build_report(job: PruneJob, model: nn.Module, tok, rep, extra: dict, batch: torch.Tensor, eval_ids, dense: dict,
                 pruned: dict, half: str | None, times: dict) -> dict:
    """The run's report: parameters, widths and kept units, perplexities, the estimate's log, the
    settings and the time of every stage."""
    from .evaluate.perplexity import generate_text
    from .io.pruned import original_size

    d = job.data
    sample = generate_text(model, tok, d.generate, max_new_tokens=24) if d.generate else None
    report = {
        "model": str(job.model or "embedded SmolLM2-135M-Instruct"),
        "method": job.method,
        **extra,
        "settings": job.settings,
        "params_before": rep.params_before,
        "params_after": rep.params_after,
        "kept_fraction": rep.kept_fraction,
        "granularity": rep.granularity,
        "scope": rep.scope,
        "rounds": rep.rounds,
        "attn_layers": [rep.attn_layers[0], rep.attn_layers[-1] + 1] if rep.attn_layers else None,
        "mlp_layers": [rep.mlp_layers[0], rep.mlp_layers[-1] + 1] if rep.mlp_layers else None,
        "layers": rep.layers,
        "uniform": getattr(rep, "uniform", None),
        **({"compensation": {**rep.compensation, "text": _compensation_text(job)}}
           if getattr(rep, "compensation", None) else {}),
        "ppl_dense": dense,
        "ppl_pruned": pruned,
        "calibration": {"source": d.calib_file or d.calib, "shape": list(batch.shape)},
        "evaluation": {"source": d.eval_file or f"{d.calib} (held-out part)",
                       "tokens": int(eval_ids.numel()) if eval_ids is not None else 0},
        "sample": sample,
        "half_gemm": half,
        "torch": torch.__version__,
        "times_s": times,
    }
    report.update(original_size(job.model, rep.params_after))  # re-pruning: also count from the original
    return report


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, report: dict | None = None, uniform: bool = False,
         overwrite: bool = False) -> Path:
    """The save stage: a stock directory (``uniform``) or the per-layer pruned format."""
    from .io.pruned import save_pruned
    from .io.stock import save_uniform

    return (save_uniform if uniform else save_pruned)(model, out, tokenizer=tokenizer, extra=report,
                                                      overwrite=overwrite)


def finish(job: PruneJob, model: nn.Module, tok, report: dict, times: dict) -> dict:
    """Save the model (``job.out``) and the report (``job.json``); returns the report."""
    from .io.atomic import write_json

    if job.out:
        t = time.perf_counter()
        with keep_report(report, job.out, job.json, model_bytes(model)):
            save(model, job.out, tok, report, job.prune.uniform, job.overwrite)
        times["save_s"] = time.perf_counter() - t
        report["out"] = str(Path(job.out).resolve())
    if job.json:
        write_json(job.json, report)
    return report
