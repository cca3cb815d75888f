"""Per-rank tracked memory of a scaled-down "70B-shaped" estimate step on FSDP2 (CPU, gloo) vs the plan.

Checks :func:`moreau_pruner.estimate.plans.plan_rank` against a measurement: N processes (gloo), a LLaMA-3-70B
-shaped model scaled down (hidden, intermediate, heads and vocabulary ÷ ``--scale``, ``--layers``
decoder layers, fp32), every decoder layer and the root ``fully_shard``-ed, the calibration rows
split across the ranks. Each rank holds the estimator state of its local shards (a work buffer, δ
and acc per parameter shard), runs one forward+backward, and consumes every reduce-scattered
gradient shard in a post-accumulate-grad hook with ``moreau_kernels.prox_update_`` on the local δ
and acc, under :class:`moreau_pruner.estimate.memtrack.LiveTensorTracker` (local shards as the baseline).

This measures the memory of that step, not the estimate's values: the forward runs on the clean
weights (the work buffers are filled by ``perturb_out`` on the local shards, as an FSDP2 estimate
would, but not swapped in), so it needs no distributed estimator; the distributed estimate itself
lives elsewhere in the project.

    python benchmarks/fsdp_rank_memory.py                  # 2 ranks, scale 16, 8 layers
    python benchmarks/fsdp_rank_memory.py --ranks 4 --layers 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def scaled_shape(scale: int, layers: int) -> dict:
    from moreau_pruner.model.meta import SHAPES

    s = dict(SHAPES["llama-3-70b"])
    s.update(hidden_size=s["hidden_size"] // scale, intermediate_size=s["intermediate_size"] // scale,
             num_attention_heads=s["num_attention_heads"] // scale,
             num_key_value_heads=max(1, s["num_key_value_heads"] // scale),
             vocab_size=s["vocab_size"] // scale, num_hidden_layers=layers, head_dim=128)
    return s


def _rank(rank: int, world: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args["port"]), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import moreau_kernels as mk
    from moreau_pruner.estimate.memtrack import LiveTensorTracker

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(**args["shape"])
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.eval()
        params = list(model.parameters())
        rows, seq = args["rows"], args["seq"]
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
        mine = batch[rank::world]  # the rank's share of the calibration rows
        local = [p.to_local() for p in params]
        buffers = list(model.buffers())
        with LiveTensorTracker(baseline=local + buffers) as tr:
            state = []
            for i, w in enumerate(local):
                work = torch.empty_like(w)
                delta = torch.zeros(w.shape, dtype=torch.float32)
                acc = torch.zeros_like(delta)
                if w.numel():
                    mk.perturb_out(w.contiguous(), delta, None, work, 0.05, 0, 0, i)
                state.append((work, delta, acc))
            calls = [0]

            def hook(k):
                def run(p):
                    g = p.grad.to_local()
                    _, delta, acc = state[k]
                    if g.numel():
                        mk.prox_update_(g.contiguous(), delta, acc, 2e-4, 5e-6, 0.2, mk.MODE_REFERENCE, True)
                    calls[0] += 1
                    p.grad = None
                return run
            handles = [p.register_post_accumulate_grad_hook(hook(k)) for k, p in enumerate(params)]
            loss = model(input_ids=mine, labels=mine).loss * (len(mine) / rows)
            loss.backward()
            for h in handles:
                h.remove()
        res = {"rank": rank, "rows": len(mine), "peak_bytes": tr.peak_bytes, "baseline_bytes": tr.baseline_bytes,
               "peak_op": tr.peak_op, "hook_calls": calls[0], "n_params": len(params),
               "breakdown": dict(sorted(tr.peak_breakdown.items(), key=lambda kv: -kv[1])[:10]),
               "state_bytes": sum(t.numel() * t.element_size() for s in state for t in s)}
        Path(f"{out}.{rank}").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--scale", type=int, default=16, help="divide hidden, intermediate, heads and vocab by this")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--port", type=int, default=29531)
    ap.add_argument("--out", help="output JSON (default benchmarks/results/<device>/fsdp_rank_memory.json)")
    args = ap.parse_args(argv)
    import torch.multiprocessing as tmp

    from moreau_pruner.estimate.memory import CUDA_RESERVE
    from moreau_pruner.estimate.plans import Option, plan_rank
    from moreau_pruner.model.meta import meta_model

    shape = scaled_shape(args.scale, args.layers)
    spec = dict(shape=shape, rows=args.rows, seq=args.seq, port=args.port)
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "rank")
        tmp.spawn(_rank, args=(args.ranks, spec, base), nprocs=args.ranks, join=True)
        ranks = [json.loads(Path(f"{base}.{r}").read_text()) for r in range(args.ranks)]
    plan = plan_rank(meta_model(shape, torch.float32), args.rows, args.seq, Option(args.ranks), None)
    planned = plan.total - CUDA_RESERVE
    meta = C.Meta("cpu")
    worst = max(r["peak_bytes"] for r in ranks)
    records = [meta.record("fsdp_rank_memory", "fsdp2-gloo", f"llama-3-70b/{args.scale}-{args.layers}L", "fp32",
                           "tracked_peak", "MiB", r["peak_bytes"] / 2**20, rank=r["rank"], ranks=args.ranks,
                           rows=r["rows"], peak_op=r["peak_op"],
                           breakdown_mib={k: round(v / 2**20, 2) for k, v in r["breakdown"].items()})
               for r in ranks]
    records.append(meta.record("fsdp_rank_memory", "plan", f"llama-3-70b/{args.scale}-{args.layers}L", "fp32",
                               "plan_without_reserve", "MiB", planned / 2**20, ranks=args.ranks,
                               items_mib={k: round(v / 2**20, 2) for k, v in plan.items.items()}))
    records.append(meta.record("fsdp_rank_memory", "plan", f"llama-3-70b/{args.scale}-{args.layers}L", "fp32",
                               "plan_over_tracked", "x", planned / worst, ranks=args.ranks))
    for r in ranks:
        print(f"rank {r['rank']}: {r['rows']} rows, tracked peak {r['peak_bytes'] / 2**20:.1f} MiB after {r['peak_op']} "
              f"(state {r['state_bytes'] / 2**20:.1f} MiB, {r['hook_calls']}/{r['n_params']} gradient hooks)")
    print(f"plan (without the CUDA reserve): {planned / 2**20:.1f} MiB = {planned / worst:.3f} x the largest "
          f"tracked rank peak")
    out = Path(args.out) if args.out else C.RESULTS / C.device_name("cpu") / "fsdp_rank_memory.json"
    C.write_results(out, records, kind="fsdp_rank_memory", shape=shape, ranks=args.ranks, rows=args.rows,
                    seq=args.seq, plan_items=plan.items, **{k: meta.base[k] for k in ("torch", "commit", "date")})
    print(f"# wrote {out}")
    return out


if __name__ == "__main__":
    main()
