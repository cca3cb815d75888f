"""The Moreau estimate and structured pruning on several ranks with PyTorch FSDP2 (SPEC §9).

Launch::

    torchrun --nproc-per-node N -m moreau_pruner.cli --distributed fsdp [every other option]

Every rank loads its shards of the model (:mod:`.loading`), runs the estimate and the scores on them
(:mod:`.scoring`: the ``fsdp`` memory strategy of :mod:`moreau_pruner.estimate` with the
data-parallel runner of :mod:`.context`), then rank 0 gathers the full model, prunes it with the
plan every rank computed alike, evaluates and saves it in the usual format.

Evaluation (``--eval-seq-lens``) and the sample generation run on rank 0 on the gathered model;
pass ``--no-eval`` when the dense model does not fit one device.

As in one process, the free space for the output is checked once the model is loaded, before the
scoring (rank 0 checks, every rank stops), and a save that still fails keeps the report
(:func:`moreau_pruner.pipeline.finish`).
"""
from __future__ import annotations

import time

import torch.distributed as dist

import moreau_kernels as mk

from ..io.target import OutputError, check_space, model_bytes
from .context import Context, DistributedError, check_environment, init
from .loading import gather_to_rank0, load_sharded
from .scoring import FsdpScoring


# ============================================================================ a whole run
def run_job(job, finish_rank0) -> dict | None:
    """A :class:`moreau_pruner.job.PruneJob` on the FSDP2 ranks of a torchrun job; rank 0 returns
    the report, the others None.

    Every rank loads its shards, draws the calibration batch and scores its shards (the scores are
    the same on every rank); rank 0 gathers the full model and ``finish_rank0`` prunes it with those
    scores, evaluates, reports and saves. An error on rank 0 after the gather is sent to every rank so
    none is left waiting.
    """
    check_environment()
    ctx = init(job.device)
    try:
        with mk.use_backend(job.backend):
            return _run_job(job, ctx, finish_rank0)
    finally:
        dist.destroy_process_group()


def _check_space(out, nbytes: int, ctx: Context) -> None:
    """Rank 0 checks the free space for ``nbytes`` at ``out`` (where it saves); every rank raises its
    OutputError, so none is left waiting."""
    status = [None]
    if ctx.is_main:
        try:
            check_space(out, nbytes)
        except OutputError as e:
            status = [str(e)]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise OutputError(status[0])


def _run_job(job, ctx: Context, finish_rank0):
    from ..job import calibrate, compensation_batch, half_gemm_context, half_gemm_mode
    from ..prune.target import resolve_target
    from ..score.registry import score_units

    times: dict = {}
    t0 = time.perf_counter()
    sm = load_sharded(job.model, job.dtype, ctx)
    times["load_s"] = time.perf_counter() - t0
    if job.out:  # the output fits where rank 0 saves it, before the long work
        _check_space(job.out, model_bytes(sm.model), ctx)
    target = resolve_target(sm.model, job.prune)
    batch = calibrate(sm.tokenizer, job.data, ctx.device)
    half = half_gemm_mode(job)
    with half_gemm_context(job.dtype, half):
        scores, est, more = score_units(sm.model, batch, job.method, target, job.moreau, job.options,
                                        FsdpScoring(ctx), job.progress)
    times.update(more)
    comp = None
    if job.compensate is not None:  # before the gather: each rank updates its rows (.compensate)
        from .compensate import compensate_fsdp

        own = compensation_batch(sm.tokenizer, job, ctx.device)
        t0 = time.perf_counter()
        with half_gemm_context(job.dtype, half):
            comp = compensate_fsdp(sm.model, scores, job.prune, batch if own is None else own, job.compensate, ctx,
                                   job.progress)
        times["compensate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = gather_to_rank0(sm, ctx)
    times["gather_s"] = time.perf_counter() - t0
    report, error = None, None
    if ctx.is_main:
        extra = {"distributed": {"mode": "fsdp", "world_size": ctx.world, "device": str(ctx.device),
                                 "sliced_loading": sm.sliced_loading,
                                 "pruned_on": "rank 0, gathered full model (CPU)"}}
        try:
            report = finish_rank0(job, plain, sm.tokenizer, batch, scores, est, times, half, extra, ctx.device,
                                  comp)
        except Exception as e:  # noqa: BLE001 - sent to every rank, then raised
            error = e
    status = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise DistributedError(f"rank 0 failed: {status[0][0]}: {status[0][1]}")
    return report
