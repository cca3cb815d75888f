"""Distributed overhead of the FSDP2 Moreau estimate: communication per step against compute.

Launch with torchrun (CPU ranks use gloo, one thread each)::

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py            # embedded SmolLM2, 10x64 tokens
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --iters 5 --device cuda

Three measurements on the same model and batch, per step (median over the steps):

1. ``fsdp``: the estimate as it runs (FSDP2 overlaps its all-gathers with compute); the step is
   split into perturb (Philox noise of the shard + perturb op + clean copy), forward+backward
   (with FSDP2's collectives inside) and the rest (prox update, our all-reduces, restore).
2. ``fsdp-serialized``: the same with every FSDP2 all-gather and reduce-scatter waited for at once
   and timed, so communication = the summed collective times and compute = forward+backward minus
   them (no overlap: an upper bound on what communication costs).
3. ``one-process``: rank 0 alone runs the one-process estimate on its own rows (the same compute
   as one rank, no communication), for the extra cost of being distributed.

Writes ``benchmarks/results/distributed/<name>.json`` (records as the other benchmarks) and a
Markdown table beside it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OUT = C.RESULTS / "distributed"


def _timed(obj, name, totals, key):
    """Wrap obj.name (a module's function or an object's method) so its wall time accumulates in totals[key]."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)
    return fn


def _serialize_fsdp_collectives(totals):
    """Make FSDP2's all-gather and reduce-scatter complete before returning, and time them."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as fc

    originals = {}
    for cls, key in ((fc.DefaultAllGather, "all_gather_s"), (fc.DefaultReduceScatter, "reduce_scatter_s")):
        call = cls.__call__
        originals[cls] = call

        def timed(self, *a, _call=call, _key=key, **kw):
            t = time.perf_counter()
            work = _call(self, *a, **kw)
            if work is not None:
                work.wait()
            totals[_key] = totals.get(_key, 0.0) + time.perf_counter() - t
            return work

        cls.__call__ = timed
    return originals


def _per_step(totals, iters):
    return {k: v / iters for k, v in totals.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model spec as for moreau-prune --model (default: the embedded SmolLM2)")
    p.add_argument("--num-examples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=3, help="Moreau steps per measurement (default 3)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--name", help="result file stem (default: <model>-<N>rank-<backend>)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown of an existing result file")
    p.add_argument("--track-memory", action="store_true",
                   help="instead of timing: the peak live tensor bytes of each rank over the whole estimate "
                        "(moreau_pruner.estimate.memtrack, the rank's local parameter shards and buffers as baseline)")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(C.read_results(path)))
        return 0

    import torch.distributed as dist

    import moreau_kernels as mk
    from moreau_pruner.data import calibration_batch, calibration_text
    from moreau_pruner.distributed.context import DataParallel, batch_rows, init
    from moreau_pruner.distributed.loading import gather_to_rank0, load_sharded
    from moreau_pruner.estimate import FsdpStrategy, MoreauConfig, estimate
    from moreau_pruner.estimate.runner import ONE_PROCESS
    from moreau_pruner.model.structure import discover

    torch.set_num_threads(1)
    mk.set_backend(args.backend)
    ctx = init(args.device)
    t0 = time.perf_counter()
    sm = load_sharded(args.model, "float32", ctx)
    load_s = time.perf_counter() - t0
    text = calibration_text("pydoc")
    batch = calibration_batch(sm.tokenizer, text, args.num_examples, args.seq_len, 0).to(ctx.device)
    names = discover(sm.model).projection_names()
    cfg = MoreauConfig(iters=args.iters, avg_last=min(5, args.iters))
    n_params = sum(p.numel() for p in sm.model.parameters())

    def run_fsdp():
        totals: dict = {}
        runner = DataParallel(ctx)
        strategy = FsdpStrategy(runner)
        _timed(strategy, "perturb", totals, "perturb_s")
        _timed(runner, "forward_backward", totals, "forward_backward_s")
        comm0 = ctx.comm_s
        est = estimate(sm.model, batch, cfg, strategy, score=names, progress=False)
        totals["own_collectives_s"] = ctx.comm_s - comm0
        totals["step_s"] = sum(r["seconds"] for r in est.log)
        return _per_step(totals, args.iters), [r["seconds"] for r in est.log]

    if args.track_memory:
        return _track_memory(args, ctx, sm, batch, cfg, names, n_params)
    dist.barrier()
    overlapped, steps = run_fsdp()
    totals_ser: dict = {}
    originals = _serialize_fsdp_collectives(totals_ser)
    try:
        dist.barrier()
        serialized, _ = run_fsdp()
    finally:
        for cls, call in originals.items():
            cls.__call__ = call
    serialized.update(_per_step(totals_ser, args.iters))
    per_rank = [None] * ctx.world
    dist.all_gather_object(per_rank, {"fsdp": overlapped, "fsdp-serialized": serialized, "steps": steps})
    plain = gather_to_rank0(sm, ctx)
    one = None
    if ctx.is_main:  # the one-process estimate on rank 0's rows: one rank's compute, no communication
        a, b = batch_rows(batch.shape[0], ctx.world, 0)
        totals: dict = {}
        _timed(ONE_PROCESS, "forward_backward", totals, "forward_backward_s")
        try:
            est = estimate(plain.to(ctx.device), batch[a:b], cfg, "reference", score=names, progress=False)
        finally:
            del ONE_PROCESS.forward_backward  # drop the timing wrapper: the class's method again
        totals["step_s"] = sum(r["seconds"] for r in est.log)
        one = _per_step(totals, args.iters)
    dist.barrier()
    if ctx.is_main:
        _write(args, ctx, per_rank, one, load_s, n_params, batch.shape, sm)
    dist.destroy_process_group()
    return 0


def _track_memory(args, ctx, sm, batch, cfg, names, n_params) -> int:
    """Per-rank peak of live tensor bytes over the FSDP2 estimate, written as its own JSON + Markdown."""
    import json

    import torch.distributed as dist

    from moreau_pruner.distributed.context import DataParallel
    from moreau_pruner.estimate import FsdpStrategy, estimate
    from moreau_pruner.estimate.memtrack import LiveTensorTracker

    local = [p.to_local() if hasattr(p, "to_local") else p for p in sm.model.parameters()]
    dist.barrier()
    with LiveTensorTracker(baseline=local + list(sm.model.buffers())) as tr:
        estimate(sm.model, batch, cfg, FsdpStrategy(DataParallel(ctx)), score=names, progress=False)
    mine = {"rank": ctx.rank, "peak_bytes": tr.peak_bytes, "baseline_bytes": tr.baseline_bytes,
            "peak_op": tr.peak_op, "peak_breakdown": tr.peak_breakdown}
    per_rank = [None] * ctx.world
    dist.all_gather_object(per_rank, mine)
    if ctx.is_main:
        meta = C.Meta(ctx.device.type)
        stem = args.name or f"smollm2-{ctx.world}rank-memory"
        command = f"torchrun --nproc-per-node {ctx.world} benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
        doc = {**meta.base, "command": command, "device": "2-core CPU, gloo" if ctx.device.type == "cpu" else "cuda, nccl",
               "model": str(args.model or "embedded SmolLM2-135M-Instruct (fp32)"), "parameters": n_params,
               "batch": list(batch.shape), "iters": args.iters, "world_size": ctx.world, "ranks": per_rank,
               "loadavg": C.loadavg()}
        (OUT / f"{stem}.json").write_text(json.dumps(doc, indent=2))
        mib = 2 ** 20
        lines = [f"# Tracked memory of the FSDP2 estimate ({ctx.world} ranks)", "",
                 f"- command: `{command}`", f"- device: {doc['device']}; torch {doc['torch']}; commit {doc['commit']}; date {doc['date']}; "
                 f"load average {doc['loadavg']}",
                 f"- model: {doc['model']}, {n_params:,} parameters; batch {doc['batch'][0]}x{doc['batch'][1]} "
                 f"tokens; {args.iters} steps", "",
                 "| rank | peak live tensors (MiB) | of which local parameter shards and buffers (MiB) | peak after op |",
                 "|---:|---:|---:|---|"]
        lines += [f"| {r['rank']} | {r['peak_bytes'] / mib:.0f} | {r['baseline_bytes'] / mib:.0f} | `{r['peak_op']}` |"
                  for r in per_rank]
        (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()
    return 0


def _write(args, ctx, per_rank, one, load_s, n_params, shape, sm):
    import moreau_kernels as mk

    device = "2-core CPU, gloo" if ctx.device.type == "cpu" else f"{ctx.world}x {C.device_label('cuda')}, nccl"
    run = C.Meta(ctx.device.type)
    model = str(args.model or "embedded SmolLM2-135M-Instruct (fp32)")
    rows = shape[0] // ctx.world
    recs = []
    for r, res in enumerate(per_rank):
        for provider in ("fsdp", "fsdp-serialized"):
            for metric, value in res[provider].items():
                recs.append(run.record("moreau_step", provider, list(shape), "float32", metric, "s", value, rank=r,
                                       world_size=ctx.world, model=model, device_label=device))
    for metric, value in one.items():
        recs.append(run.record("moreau_step", "one-process", [rows, shape[1]], "float32", metric, "s", value, rank=0,
                               world_size=1, model=model, device_label=device))
    stem = args.name or f"{C.slug(Path(model).stem if args.model else 'smollm2')}-{ctx.world}rank-{mk.get_backend()}"
    command = f"torchrun --nproc-per-node {ctx.world} benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
    path = C.write_results(OUT / f"{stem}.json", recs, command=command, device=device, world_size=ctx.world,
                           model=model, batch=list(shape), iters=args.iters, parameters=n_params,
                           load_s=load_s, sliced_loading=sm.sliced_loading, backend=mk.get_backend())
    (OUT / f"{stem}.md").write_text(render(C.read_results(path)))
    print(render(C.read_results(path)))


def render(doc: dict) -> str:
    """A Markdown table of one result file (per-step seconds, medians over ranks)."""
    by = {}
    for r in doc["records"]:
        by.setdefault((r["provider"], r["metric"]), []).append(r["value"])
    med = {k: statistics.median(v) for k, v in by.items()}
    g = lambda prov, m: med.get((prov, m), 0.0)  # noqa: E731
    comm = g("fsdp-serialized", "all_gather_s") + g("fsdp-serialized", "reduce_scatter_s") + \
        g("fsdp-serialized", "own_collectives_s")
    compute = g("fsdp-serialized", "step_s") - comm
    lines = [
        f"# Distributed overhead of the Moreau estimate ({doc['world_size']} ranks)", "",
        f"- command: `{doc['command']}`",
        f"- device: {doc['device']}; backend `{doc['backend']}`; torch {doc['records'][0]['torch']}; "
        f"commit {doc['records'][0]['commit']}; date {doc['records'][0]['date']}; "
        f"load average {doc['records'][0]['loadavg']}",
        f"- model: {doc['model']}, {doc['parameters']:,} parameters; batch {doc['batch'][0]}x{doc['batch'][1]} tokens "
        f"({doc['batch'][0] // doc['world_size']} rows per rank); {doc['iters']} steps; sliced loading: "
        f"{doc['sliced_loading']}; load {doc['load_s']:.1f} s", "",
        "Seconds per step (median over ranks):", "",
        "| run | step | perturb | forward+backward | all-gather | reduce-scatter | our all-reduces |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for prov in ("fsdp", "fsdp-serialized"):
        lines.append(f"| {prov} | {g(prov, 'step_s'):.3f} | {g(prov, 'perturb_s'):.3f} | "
                     f"{g(prov, 'forward_backward_s'):.3f} | "
                     + (f"{g(prov, 'all_gather_s'):.3f} | {g(prov, 'reduce_scatter_s'):.3f} | "
                        if prov == "fsdp-serialized" else "(overlapped) | (overlapped) | ")
                     + f"{g(prov, 'own_collectives_s'):.3f} |")
    lines.append(f"| one-process, {doc['batch'][0] // doc['world_size']} rows | {g('one-process', 'step_s'):.3f} | "
                 f"| {g('one-process', 'forward_backward_s'):.3f} | | | |")
    lines += ["",
              f"Communication per step (serialized, summed): **{comm:.3f} s** against **{compute:.3f} s** of "
              f"compute ({100 * comm / max(compute, 1e-12):.1f} %). The estimate as it runs takes "
              f"{g('fsdp', 'step_s'):.3f} s per step against {g('one-process', 'step_s'):.3f} s for one process "
              f"on one rank's rows ({g('fsdp', 'step_s') / max(g('one-process', 'step_s'), 1e-12):.2f}x).", "",
              "perturb includes making the Philox noise of the shard apart (`distributed.shard_noise`: native "
              "Philox words at the shard's counter offset, Box-Muller in PyTorch; the fused perturb kernels take no "
              "element offset yet), the perturb op and the clean copy.", ""]
    if "CPU" in doc["device"]:
        lines += ["On a CPU the ranks share the machine's cores (and here with whatever else ran: see the load "
                  "average), while the one-process row ran with the other rank idle at a barrier; read the ratio "
                  "as an upper bound of what distribution costs, not a GPU figure.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
