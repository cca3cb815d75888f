#!/usr/bin/env python
"""Policy-gradient pruning against one-shot scores at the same parameter count (BENCHMARKS.md §3).

Cells: SmolLM2-135M, every layer eligible (0:30), ``query-heads`` units, the budget of the local
rule at ``--ratio`` (default 0.267: about 20 % of the decoder blocks' parameters; at this ratio the
local rule removes MLP channels only, since a query head per KV group is more than r of a layer's
heads), 3 seeds. Seed s draws the calibration batch (10 x 64 tokens of pydoc) and seeds the method.

* ``taylor``, ``moreau-paper``: one-shot scores, local rule (the baselines);
* ``pg-none``, ``pg-taylor``, ``pg-moreau``: :mod:`moreau_pruner.prune.policy` with its default settings
  and that initialisation (moreau: the ``paper`` mode estimate, T = 10); the budget is global, so
  the search may also remove heads and move width between layers.

Each record has PPL@128 on the held-out pydoc split (32 windows; no 1024-token windows, to save CPU),
the parameters kept, and the cost: sequence forwards, sequence backwards, wall seconds. Records go
to ``benchmarks/results/policy/records.jsonl`` (one line per cell, a rerun skips finished cells);
``--render`` writes ``benchmarks/results/policy/README.md``, which the quality report includes.

    python benchmarks/policy_quality.py --threads 2                 # every cell, in priority order
    python benchmarks/policy_quality.py --render
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import append_record, evaluate, host_details, load, log, machine_description, read_records  # noqa: E402

from moreau_pruner import MoreauConfig, PruneConfig  # noqa: E402
from moreau_pruner import data as mp_data  # noqa: E402
from moreau_pruner.prune.policy import PolicyConfig  # noqa: E402
from moreau_pruner import prune_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "policy"
METHODS = ("taylor", "pg-taylor", "moreau-paper", "pg-moreau", "pg-none")


def cell(method: str, seed: int, args, dense, batch, held_ids) -> dict:
    model = copy.deepcopy(dense)
    cfg = PruneConfig(ratio=args.ratio, attn_layers=args.layers, mlp_layers=args.layers, granularity="query-heads")
    moreau = MoreauConfig(mode="paper", seed=seed)
    n, t = batch.shape
    t0 = time.perf_counter()
    if method.startswith("pg-"):
        policy = PolicyConfig(init=method[3:], seed=seed, steps=args.steps, parametrization=args.parametrization)
        res = prune_model(model, batch, "policy-gradient", cfg, moreau=moreau, seed=seed, progress=args.progress,
                          policy=policy)
        fwd, bwd = res.policy["forward_sequences"], res.policy["backward_sequences"]
        extra = {"policy": {k: v for k, v in res.policy.items() if k != "history"},
                 "loss_curve": [round(h["loss"], 4) for h in res.policy["history"]]}
    else:
        lib = "moreau" if method == "moreau-paper" else method
        res = prune_model(model, batch, lib, cfg, moreau=moreau, seed=seed, progress=False)
        fwd = bwd = n * (moreau.iters if lib == "moreau" else 1)
        extra = {}
    wall = time.perf_counter() - t0
    p128, _, ev = evaluate(model, held_ids, args.windows_128, 0, 1024)
    rep = res.report
    heads = sum(l["removed_heads"] for l in rep.layers)
    return {"method": method, "seed": seed,
            "parametrization": args.parametrization if method.startswith("pg-") else None, "ratio": args.ratio, "layers": args.layers, "ppl_128": p128,
            "params_before": rep.params_before, "params_after": rep.params_after,
            "removed_heads": heads, "removed_channels": sum(l["removed_channels"] for l in rep.layers),
            "cost": {"forward_sequences": fwd, "backward_sequences": bwd, "seq_len": t, "wall_s": wall,
                     "eval_s": ev}, **extra}


def run(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    loaded = load(None, "cpu")
    dense = loaded.model
    calib_ids = loaded.tokenize(mp_data.calibration_text("pydoc"))
    held_ids = loaded.tokenize(mp_data.heldout_text("pydoc"))
    path = OUT / "records.jsonl"
    done = {(r["method"], r["seed"], r["ratio"], r["layers"], _param(r)) for r in read_records(path)}
    if ("dense", None, 0.0, "-", None) not in done:
        p128, _, ev = evaluate(dense, held_ids, args.windows_128, 0, 1024)
        append_record(path, {"method": "dense", "seed": None, "ratio": 0.0, "layers": "-", "ppl_128": p128})
    order = [(m, s) for group in (("taylor", "pg-taylor"), ("moreau-paper", "pg-moreau"), ("pg-none",))
             for s in args.seeds for m in group if m in args.methods]
    for method, seed in order:
        if (method, seed, args.ratio, args.layers, args.parametrization if method.startswith("pg-") else None) in done:
            continue
        batch = mp_data.calibration_batch(None, calib_ids, n_samples=10, seq_len=64, seed=seed)
        rec = cell(method, seed, args, dense, batch, held_ids)
        rec.update({"machine": machine_description("cpu"), "host": host_details(), "torch": torch.__version__,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        append_record(path, rec)
        log(f"{method} seed={seed}: ppl_128={rec['ppl_128']:.3f} kept={rec['params_after']:,} "
            f"heads-{rec['removed_heads']} ch-{rec['removed_channels']} ({rec['cost']['wall_s']:.0f} s)")


def _param(rec: dict) -> str | None:
    """The policy's parametrization (records written before the option existed used 'probability')."""
    if not rec["method"].startswith("pg-"):
        return None
    return rec.get("parametrization") or "probability"


def _label(rec: dict) -> str:
    return rec["method"] + (f" ({_param(rec)})" if _param(rec) else "")


def render() -> str:
    recs = read_records(OUT / "records.jsonl")
    dense = next((r for r in recs if r["method"] == "dense"), None)
    cells = [r for r in recs if r["method"] != "dense"]
    by = {}
    for r in cells:
        by.setdefault(_label(r), {})[r["seed"]] = r
    lines = ["# Policy-gradient pruning against one-shot scores (SmolLM2-135M)", "",
             "Generated by `python benchmarks/policy_quality.py --render` from `records.jsonl`. Do not edit by hand.",
             ""]
    if cells:
        r0 = cells[0]
        host = r0.get("host", {})
        lines += [f"- Machine: {r0.get('machine')}; {host.get('cpu_model')} ({host.get('cpu_count')} cores visible), "
                  "shared with other jobs while these ran (wall times are indicative only).",
                  f"- Setting: every layer eligible ({r0['layers']}), `query-heads` units, the budget of the local "
                  f"rule at r = {r0['ratio']} (MLP channels only for the one-shot rows: "
                  f"{r0['params_before'] - r0['params_after']:,} parameters removed, "
                  f"{100 * (r0['params_before'] - r0['params_after']) / 106168320:.1f} % of the decoder blocks'); "
                  "calibration 10 x 64 pydoc tokens drawn by the seed; PPL@128 on 32 held-out pydoc windows.",
                  "- Policy gradient: the package defaults (100 steps x 4 masks of 1 calibration sequence, Adam lr "
                  "0.02, moving baseline per sequence), in its two parametrizations: `probability` (the paper's: "
                  "Adam on the keep-probabilities, Euclidean projection onto the budget) and `logit` (Adam on their "
                  "logits, one common shift restores the budget; the package default). Its budget is global, so "
                  "it may remove heads and move width between layers. Cost = sequence forwards / backwards through "
                  "the model (64 tokens each), the init's included.",
                  f"- Dense PPL@128: {dense['ppl_128']:.2f}." if dense else "", ""]
    seeds = sorted({r["seed"] for r in cells})
    lines.append("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | forwards | backwards | "
                 "wall (s) | heads removed |")
    lines.append("|---" * (len(seeds) + 6) + "|")
    labels = [m for m in METHODS if m in by] + sorted(
        (lab for lab in by if lab not in METHODS), key=lambda lab: ("logit" not in lab, lab))
    for m in labels:
        row = [by[m].get(s) for s in seeds]
        vals = [r["ppl_128"] for r in row if r]
        last = [r for r in row if r][-1]
        lines.append(f"| {m} | " + " | ".join(f"{r['ppl_128']:.2f}" if r else "—" for r in row)
                     + f" | {statistics.mean(vals):.2f} | {last['cost']['forward_sequences']} | "
                       f"{last['cost']['backward_sequences']} | "
                       f"{statistics.mean(r['cost']['wall_s'] for r in row if r):.0f} | "
                       f"{statistics.mean(r['removed_heads'] for r in row if r):.0f} |")
    lines.append("")
    for pg, base in [(f"{m} ({p})", b) for p in ("logit", "probability")
                     for m, b in (("pg-taylor", "taylor"), ("pg-moreau", "moreau-paper"), ("pg-none", "taylor"))]:
        if pg in by and base in by:
            pairs = [(by[pg][s]["ppl_128"], by[base][s]["ppl_128"]) for s in seeds if s in by[pg] and s in by[base]]
            if pairs:
                wins = sum(a < b for a, b in pairs)
                rel = statistics.mean(100 * (a - b) / b for a, b in pairs)
                lines.append(f"- {pg} vs one-shot {base}: lower PPL in {wins}/{len(pairs)} seeds, mean change "
                             f"{rel:+.1f} %.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int)
    p.add_argument("--ratio", type=float, default=0.267)
    p.add_argument("--layers", default="0:30")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--steps", type=int, default=PolicyConfig.steps)
    p.add_argument("--parametrization", default=PolicyConfig.parametrization, choices=("probability", "logit"))
    p.add_argument("--windows-128", type=int, default=32)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--render", action="store_true", help="only write results/policy/README.md from the records")
    args = p.parse_args(argv)
    if not args.render:
        run(args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "README.md").write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
