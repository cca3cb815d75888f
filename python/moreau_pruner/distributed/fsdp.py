"""The Moreau estimate and structured pruning on several ranks with PyTorch FSDP2 (SPEC §9).

Launch::

    torchrun --nproc-per-node N -m moreau_pruner.cli --distributed fsdp [every other option]

Every rank loads its shards of the model (:mod:`.loading`), runs the estimate and the scores on them
(:mod:`.scoring`: the ``fsdp`` memory strategy of :mod:`moreau_pruner.estimate` with the
data-parallel runner of :mod:`.context`), then rank 0 gathers the full model, prunes it with the
plan every rank computed alike, evaluates and saves it in the usual format.

Evaluation (``--eval-seq-lens``) and the sample generation run on rank 0 on the gathered model;
pass ``--no-eval`` when the dense model does not fit one device.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import moreau_kernels as mk

from ..estimate.config import MoreauConfig
from .context import DistributedError, check_environment, init
from .loading import gather_to_rank0, load_sharded
from .scoring import compute_scores_fsdp


# ============================================================================ whole pipeline (CLI)
UNSUPPORTED = (
    ("unstructured", lambda a: a.unstructured, "--unstructured has no distributed path yet (structured methods only)"),
    ("allocation", lambda a: a.allocation != "uniform",
     "--allocation {value} has no distributed path yet (only uniform)"),
    ("noise", lambda a: a.noise != "philox", "--noise torch has no distributed path yet (use philox)"),
    ("method", lambda a: a.method in ("wanda", "gblm"), "--method {value} is unstructured; no distributed path yet"),
    ("method", lambda a: a.method == "policy-gradient",
     "--method policy-gradient has no distributed path yet (its masked forwards run in one process)"),
    ("rounds", lambda a: a.rounds != 1, "--rounds {value} has no distributed path yet (one-shot only)"),
)


def check_options(args) -> None:
    """Refuse, before any work, the options that have no distributed path yet (naming each)."""
    problems = [msg.format(value=getattr(args, key)) for key, bad, msg in UNSUPPORTED if bad(args)]
    if problems:
        raise DistributedError("; ".join(problems))


def run(args) -> dict | None:
    """The one-process CLI pipeline on FSDP2 ranks; rank 0 returns the report, the others None.

    Every rank runs the estimate and the scores on its shards; rank 0 gathers the full model,
    prunes it with the common plan, evaluates and saves. An error on rank 0 after the gather is
    sent to every rank so none is left waiting.
    """
    from ..cli.prune import _check_out, _check_uniform_args, _eval_lens
    from ..prune.plan import PruneConfig

    check_options(args)
    if args.uniform:
        _check_uniform_args(args)
    check_environment()
    lens = _eval_lens(args.eval_seq_lens) if args.eval else []
    _check_out(args)
    prune_cfg = PruneConfig(ratio=args.ratio, attn_layers=args.attn_layers,
                            mlp_layers=args.mlp_layers or args.attn_layers, scope=args.scope,
                            granularity=args.granularity, round_to=args.round_to, uniform=args.uniform)
    moreau_cfg = MoreauConfig(mode=args.mode, std=args.std, lamb=args.lamb, lr=args.lr, soft=args.soft,
                              iters=args.iters, avg_last=args.avg_last, group=args.group,
                              n_samples=args.noise_samples, noise=args.noise, seed=args.seed,
                              micro_batch_size=args.micro_batch_size).validate()
    if not 0 < args.ratio < 1:
        raise ValueError(f"--ratio must be in (0, 1), got {args.ratio}")
    mk.set_backend(args.backend)
    ctx = init(args.device)
    try:
        return _run(args, ctx, lens, prune_cfg, moreau_cfg)
    finally:
        dist.destroy_process_group()


def _run(args, ctx, lens, prune_cfg, moreau_cfg):
    from .. import data
    from ..cli.prune import _half_gemm
    from ..model.precision import fp32_accumulate_gemms
    from ..model.structure import discover

    times: dict = {}
    t0 = time.perf_counter()
    sm = load_sharded(args.model, args.dtype, ctx)
    times["load_s"] = time.perf_counter() - t0
    model, tok = sm.model, sm.tokenizer
    prune_cfg.validate(discover(model).num_layers)
    calib_text = data.load_text(args.calib_file) if args.calib_file else data.calibration_text(args.calib)
    batch = data.calibration_batch(tok, calib_text, args.num_examples, args.seq_len, args.seed).to(ctx.device)
    progress = not args.quiet
    half = _half_gemm(args)
    gemms = (fp32_accumulate_gemms((getattr(torch, args.dtype),)) if half == "fp32-accumulate"
             else contextlib.nullcontext())
    with gemms:
        scores, est, more = compute_scores_fsdp(model, batch, ctx, args.method, prune_cfg, moreau_cfg,
                                                args.reduction, args.vectorize, args.seed, args.micro_batch_size,
                                                progress, args.taylor_variant, args.head_score)
    times.update(more)
    t0 = time.perf_counter()
    plain = gather_to_rank0(sm, ctx)
    times["gather_s"] = time.perf_counter() - t0
    report, error = None, None
    if ctx.is_main:
        try:
            report = _rank0_finish(args, plain, tok, batch, lens, prune_cfg, moreau_cfg, scores, est, times, half,
                                   progress, ctx, sm, gemms)
        except Exception as e:  # noqa: BLE001 - sent to every rank, then raised
            error = e
    status = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise DistributedError(f"rank 0 failed: {status[0][0]}: {status[0][1]}")
    return report


def _rank0_finish(args, plain, tok, batch, lens, prune_cfg, moreau_cfg, scores, est, times, half, progress, ctx,
                  sm, gemms):
    import json

    from .. import data
    from ..cli.prune import _prune_and_report, perplexity_report
    from ..io.pruned import save_pruned
    from ..prune.plan import prune_structure
    from ..model.structure import discover

    device = ctx.device
    if lens:
        plain.to(device)
    eval_text = data.load_text(args.eval_file) if args.eval_file else data.heldout_text(args.calib)
    eval_ids = data.tokenize_text(tok, eval_text) if lens else None

    ppl = perplexity_report(plain, eval_ids, lens, args.eval_tokens, times, progress)

    def structured(model):
        t = time.perf_counter()
        rep = prune_structure(discover(model), scores, prune_cfg)
        times["prune_s"] = time.perf_counter() - t
        model.to(device)
        extra = {"moreau": est.summary() if est else None, "allocation": None,
                 "backend": est.backend if est else mk.get_backend(), "estimator_path": "fsdp" if est else None,
                 "distributed": {"mode": "fsdp", "world_size": ctx.world, "device": str(device),
                                 "sliced_loading": sm.sliced_loading,
                                 "pruned_on": "rank 0, gathered full model (CPU)"}}
        return rep, extra

    with gemms:
        report = _prune_and_report(args, plain, tok, batch.cpu(), eval_ids, ppl, prune_cfg, moreau_cfg, None,
                                   times, progress, half, structured=structured)
    if args.out:
        from ..io.stock import save_uniform

        t = time.perf_counter()
        save = save_uniform if args.uniform else save_pruned
        save(plain, args.out, tokenizer=tok, extra=report, overwrite=args.overwrite)
        times["save_s"] = time.perf_counter() - t
        report["out"] = str(Path(args.out).resolve())
    if args.json:
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, args.json)
    return report
