#!/usr/bin/env python
"""Attention-unit score arithmetics on one model: which units each removes and what that costs.

For every seed the calibration batch is drawn (the seed picks the windows, as in
``benchmarks/quality.py``), the importance is computed once (first-order Taylor by default),
and the attention units are scored with every ``--head-scores`` arithmetic
(:data:`moreau_pruner.score.importance.HEAD_SCORES`): ``unit`` (ours), ``llm-pruner`` (LLM-Pruner's
order with the ``repeat_kv`` mapping) and ``llm-pruner-upstream`` (upstream's h % H_kv fold).
Each is pruned at ``--ratio`` in ``--attn-layers``, attention only (the MLPs stay whole, so only
the attention-unit score differs between cells), at each ``--granularities``, and evaluated by
perplexity over ``--windows`` held-out windows of 128 tokens of every ``--heldout`` corpus.
Cells whose kept units equal an earlier cell's reuse its perplexity (same model).
``random-scores`` in ``--head-scores`` adds a baseline: uniform random unit scores (seeded by the
seed), the same number of units removed per layer.

One JSON line per cell is appended to ``<out>/records.jsonl``; ``<out>/README.md`` is rendered
from all records (paired by seed: ours minus the other arithmetic, kept units per layer).

Examples::

    python benchmarks/head_scores.py --threads 1                      # SmolLM2, seeds 0,1,2, r = 1/3
    python benchmarks/head_scores.py --seeds 3,4 --heldout fortunes
    python benchmarks/head_scores.py --render                          # README.md from the records
    python benchmarks/head_scores.py --model tiny-random --out /tmp/h  # seconds (tests)
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moreau_pruner import PruneConfig, discover, prune_structure
from moreau_pruner import data as mp_data
from moreau_pruner.estimate import gradient
from moreau_pruner.evaluate.perplexity import evaluate_perplexity
from moreau_pruner.score.importance import HEAD_SCORES, model_scores
from moreau_pruner.prune.plan import attention_units_removed

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "heads"
OURS = "unit"
RANDOM = "random-scores"  # baseline: random unit scores
ARITHMETICS = HEAD_SCORES + (RANDOM,)


def _tiny_random_model():
    """A tiny random-init Llama (8 query heads over 4 KV heads) with byte tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    return model, (lambda text: torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % 256)


def load(spec: str | None):
    if spec == "tiny-random":
        model, tok = _tiny_random_model()
        return model, tok, "tiny-random"
    from moreau_pruner.model.loading import load_model

    model, tokenizer = load_model(spec, dtype="float32")
    tag = "smollm2-135m" if spec is None else Path(spec).name.lower()
    return model, (lambda text: mp_data.tokenize_text(tokenizer, text)), tag


def machine() -> str:
    cores = os.cpu_count()
    try:
        load_avg = ", load %.1f" % os.getloadavg()[0]
    except OSError:
        load_avg = ""
    return f"{platform.machine()} CPU, {cores} cores (shared), {torch.get_num_threads()} torch thread(s){load_avg}"


def kept_attention(report) -> dict[str, list]:
    """Kept KV groups (kv-group) or kept query heads per KV group (query-heads), per pruned layer."""
    out = {}
    for layer in report.layers:
        if layer["kept_kv_groups"] is not None:
            out[str(layer["layer"])] = layer["kept_kv_groups"]
        elif layer["kept_query_heads"] is not None:
            out[str(layer["layer"])] = layer["kept_query_heads"]
    return out


def append(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    return out


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = Path(args.out)
    model, tokenize, tag = load(args.model)
    structure = discover(model)
    cfg0 = PruneConfig(ratio=args.ratio, attn_layers=args.attn_layers, mlp_layers=args.attn_layers)
    attn_range, _ = cfg0.layer_ranges(structure.num_layers)
    layers = set(attn_range)
    names = structure.projection_names(layers)
    calib = tokenize(mp_data.calibration_text(args.calib))
    held = {c: tokenize(mp_data.heldout_text(c)) for c in args.heldout}
    common = dict(model=tag, ratio=args.ratio, attn_layers=f"{attn_range.start}:{attn_range.stop}", mlp="unpruned",
                  method="taylor", calib={"corpus": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len},
                  windows_128=args.windows, machine=machine())

    def ppl(m, corpus):
        return evaluate_perplexity(m, None, held[corpus], seq_len=128, max_windows=args.windows, batch_size=4,
                                   progress=False).ppl

    written = []
    known = [r for r in read(out / "records.jsonl") if r["kind"] == "dense" and r["model"] == tag
             and r["windows_128"] == args.windows and set(args.heldout) <= set(r["ppl_128"])]
    if not known:  # the dense perplexity depends on the model and the windows only
        dense = {c: ppl(model, c) for c in args.heldout}
        rec = {**common, "kind": "dense", "ppl_128": dense, "date": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        append(out / "records.jsonl", rec)
        written.append(rec)
    cells = [(s, g, h) for s in args.seeds for g in args.granularities for h in args.head_scores]
    bar = tqdm(total=len(cells), desc="cells", disable=args.quiet)
    for seed in args.seeds:
        batch = mp_data.calibration_batch(None, calib, n_samples=args.n_samples, seq_len=args.seq_len, seed=seed)
        t0 = time.perf_counter()
        grads = gradient(model, batch, names) if set(args.head_scores) != {RANDOM} else None
        grad_s = time.perf_counter() - t0
        for gran in args.granularities:
            cfg = PruneConfig(ratio=args.ratio, attn_layers=args.attn_layers, mlp_layers=args.attn_layers,
                              granularity=gran)
            counts = {ls.index: (attention_units_removed(ls.n_heads, ls.head_dim, ls.n_kv_heads, args.ratio, gran),
                                 None) for ls in structure.layers if ls.index in layers}
            seen: dict[str, dict] = {}  # kept units (as JSON) -> perplexities
            for hs in args.head_scores:
                if hs == RANDOM:
                    scores = model_scores(structure, "random", None, granularity=gran, seed=seed, layers=layers)
                else:
                    scores = model_scores(structure, "taylor", grads, "sum", False, gran, seed, layers, head_score=hs)
                pruned = copy.deepcopy(model)
                report = prune_structure(discover(pruned), scores, cfg, counts=counts)
                kept = kept_attention(report)
                key = json.dumps(kept, sort_keys=True)
                t1 = time.perf_counter()
                shared = key in seen
                if not shared:
                    seen[key] = {c: ppl(pruned, c) for c in args.heldout}
                del pruned
                rec = {**common, "kind": "pruned", "seed": seed, "granularity": gran, "head_score": hs,
                       "units_removed_per_layer": counts[min(layers)][0], "kept": kept,
                       "params_kept_fraction": report.params_after / report.params_before,
                       "ppl_128": seen[key], "ppl_shared_with_identical_model": shared,
                       "time": {"gradient_s": grad_s, "eval_s": time.perf_counter() - t1},
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat()}
                append(out / "records.jsonl", rec)
                written.append(rec)
                bar.update(1)
                bar.set_postfix_str(f"s{seed} {gran} {hs}: " + " ".join(f"{c}={v:.2f}" for c, v in seen[key].items()))
    bar.close()
    render(out)
    return written


def _fmt_kept(kept: dict, gran: str) -> str:
    items = sorted(kept.items(), key=lambda kv: int(kv[0]))
    if gran == "kv-group":
        return " ".join(f"{layer}:{''.join(map(str, units))}" for layer, units in items)
    return " ".join(f"{layer}:{'/'.join(''.join(map(str, g)) for g in units)}" for layer, units in items)


def render(out: Path) -> Path:
    """README.md from records.jsonl: one row per (model, heldout, seed, granularity), every arithmetic."""
    recs = read(out / "records.jsonl")
    latest: dict = {}
    for r in recs:  # a rerun of the same cell replaces the earlier record
        if r["kind"] == "dense":
            latest[("dense", r["model"], r["calib"]["corpus"], r["windows_128"])] = r
        else:
            latest[(r["model"], r["ratio"], r["attn_layers"], r["seed"], r["granularity"], r["head_score"],
                    r["calib"]["corpus"], r["windows_128"])] = r
    pruned = [r for k, r in latest.items() if k[0] != "dense"]
    dense = [r for k, r in latest.items() if k[0] == "dense"]
    lines = ["# Attention-unit score arithmetics: ours vs LLM-Pruner's", "",
             "Generated by `benchmarks/head_scores.py` (do not edit by hand). First-order Taylor importance, "
             "attention units only (MLPs not pruned), local rule, perplexity over 128-token held-out windows. "
             "`unit` = ours (each matrix summed over the unit, then summed over q/k/v/o); `llm-pruner` = "
             "LLM-Pruner's per-channel order with `repeat_kv`'s mapping (query head h in KV group h // n_rep); "
             "`llm-pruner-upstream` = upstream's fold, which scores KV head k with query heads k, k+H_kv, .... "
             "Kept units per layer: `layer:kept KV groups` (kv-group) or `layer:kept query heads of each KV "
             "group` (query-heads: indices within the group, groups separated by /). `random-scores`: random unit "
             "scores (baseline). See ANALYSIS.md for the arithmetics written out.", ""]
    machines = sorted({r["machine"].split(", load")[0] for r in latest.values()})
    lines += [f"Device: {'; '.join(machines)}.", ""]
    for d in dense:
        lines.append(f"Dense {d['model']}: " + ", ".join(f"PPL@128 {c} {v:.3f}" for c, v in d["ppl_128"].items())
                     + f" ({d['windows_128']} windows).")
    lines.append("")
    groups: dict = {}
    for r in pruned:
        groups.setdefault((r["model"], r["ratio"], r["attn_layers"], r["granularity"]), []).append(r)
    for (model, ratio, layers, gran), rs in sorted(groups.items()):
        scores = sorted({r["head_score"] for r in rs}, key=lambda h: ARITHMETICS.index(h) if h in ARITHMETICS else 9)
        corpora = sorted({c for r in rs for c in r["ppl_128"]})
        lines += [f"## {model}, {gran}, r = {ratio:.4g}, attention layers {layers}", ""]
        head = ["seed", "corpus"] + [f"PPL {h}" for h in scores]
        others = [h for h in scores if h != OURS]
        head += [f"ours − {h}" for h in others]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by_seed: dict = {}
        for r in rs:
            by_seed.setdefault(r["seed"], {})[r["head_score"]] = r
        diffs: dict = {(c, h): [] for c in corpora for h in others}
        for seed in sorted(by_seed):
            cell = by_seed[seed]
            for c in corpora:
                row = [str(seed), c] + [f"{cell[h]['ppl_128'][c]:.3f}" if h in cell else "–" for h in scores]
                for h in others:
                    if h in cell and OURS in cell:
                        d = cell[OURS]["ppl_128"][c] - cell[h]["ppl_128"][c]
                        diffs[(c, h)].append(d)
                        row.append(f"{d:+.3f}")
                    else:
                        row.append("–")
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for (c, h), ds in diffs.items():
            if ds:
                wins = sum(d <= 0 for d in ds)
                lines.append(f"- {c}: ours − {h}: mean {statistics.mean(ds):+.3f} over {len(ds)} seeds; ours lower "
                             f"or equal on {wins}/{len(ds)}.")
        lines += ["", "Kept units per layer:", ""]
        for seed in sorted(by_seed):
            for h in scores:
                if h in by_seed[seed]:
                    lines.append(f"- seed {seed}, {h}: {_fmt_kept(by_seed[seed][h]['kept'], gran)}")
        lines.append("")
    path = out / "README.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(allowed):
    def parse(s):
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return out
    return parse


def _ratio(s: str) -> float:
    if "/" in s:
        a, b = s.split("/")
        return float(a) / float(b)
    return float(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="omitted: the embedded SmolLM2-135M; a .gguf/HF directory; "
                                                  "'tiny-random' (tests)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="calibration seeds (default 0,1,2)")
    p.add_argument("--ratio", type=_ratio, default=1 / 3, help="pruning ratio, e.g. 1/3 or 0.34 (default 1/3)")
    p.add_argument("--attn-layers", default="4:22", help="attention layers pruned, START:END (default 4:22)")
    p.add_argument("--granularities", type=_names(("kv-group", "query-heads")), default=["kv-group", "query-heads"])
    p.add_argument("--head-scores", type=_names(ARITHMETICS), default=list(HEAD_SCORES),
                   help=f"arithmetics to compare ({', '.join(HEAD_SCORES)}; 'unit' is ours) and the baseline "
                        f"{RANDOM} (random unit scores)")
    p.add_argument("--calib", default="pydoc", help="calibration corpus (default pydoc)")
    p.add_argument("--n-samples", type=int, default=10, help="calibration windows (default 10)")
    p.add_argument("--seq-len", type=int, default=64, help="calibration window length (default 64)")
    p.add_argument("--heldout", type=_names(mp_data.CORPORA), default=["pydoc", "fortunes"],
                   help="held-out corpora for the perplexity (default pydoc,fortunes)")
    p.add_argument("--windows", type=int, default=32, help="held-out windows of 128 tokens (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (records.jsonl, README.md)")
    p.add_argument("--render", action="store_true", help="only render README.md from the records")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        print(render(Path(args.out)))
        return 0
    if not 0 < args.ratio < 1:
        build_parser().error(f"--ratio must be in (0, 1), got {args.ratio}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
