"""Uniform (stock-config) pruning against per-layer pruning on the embedded SmolLM2-135M.

For each importance method the scores of every layer are computed once on the calibration batch;
every variant then prunes a fresh copy of the dense model from those same scores:

- per-layer, the published default layer range (layers outside it keep full width);
- per-layer, all layers (the local rule at one ratio gives every layer the same counts, so this is
  the uniform plan; it is listed to show that);
- per-layer, global scope, default range (widths differ per layer);
- uniform (all layers), with MLP widths rounded to 64 and 128;
- uniform at the ratio whose parameter count is closest to the default-range plan's.

Recorded per variant: parameters after pruning, PPL at 128-token windows on the held-out pydoc
text, the width range. One uniform model is also exported with ``save_uniform`` and reloaded with
plain ``AutoModelForCausalLM.from_pretrained``; its logits are compared with the in-memory model.

    python benchmarks/uniform.py                       # taylor and moreau --mode paper, ratio 0.2
    python benchmarks/uniform.py --methods taylor --eval-tokens 2048

Writes ``results/uniform/uniform.json`` and ``results/uniform/UNIFORM.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Meta, write_results  # noqa: E402


def variants(ratio: float, matched: float, n_layers: int) -> list[tuple[str, dict]]:
    from moreau_pruner import PruneConfig

    return [
        ("per-layer, default range", PruneConfig(ratio=ratio)),
        ("per-layer, all layers", PruneConfig(ratio=ratio, attn_layers=(0, n_layers), mlp_layers=(0, n_layers))),
        ("per-layer global, default range", PruneConfig(ratio=ratio, scope="global")),
        ("uniform", PruneConfig(ratio=ratio, uniform=True)),
        ("uniform, round-to 64", PruneConfig(ratio=ratio, uniform=True, round_to=64)),
        ("uniform, round-to 128", PruneConfig(ratio=ratio, uniform=True, round_to=128)),
        (f"uniform, ratio {matched:.3f} (params of the default range)", PruneConfig(ratio=matched, uniform=True)),
    ]


def matched_ratio(structure, scores, ratio: float) -> float:
    """The uniform ratio (3 decimals) whose parameter count is closest to the default-range plan's."""
    from moreau_pruner import PruneConfig, resolve_target
    from moreau_pruner.prune.plan import uniform_cost

    def cost(r):
        return uniform_cost(resolve_target(structure, PruneConfig(ratio=r, uniform=True)), scores)

    target = cost(ratio)["per_layer_params_after"]
    best = min((abs(cost(r / 1000)["uniform_params_after"] - target), r / 1000) for r in range(1, int(ratio * 1000) + 1))
    return best[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="taylor,moreau", help="importance methods (moreau runs --mode paper)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens at 128-token windows (32 windows)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "uniform"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from moreau_pruner import MoreauConfig, PruneConfig, compute_scores, discover, prune_structure, save_uniform
    from moreau_pruner.data import calibration_batch, calibration_text, heldout_text, tokenize_text
    from moreau_pruner.evaluate.perplexity import perplexity
    from moreau_pruner.model.loading import load_model

    meta = Meta("cpu")
    dense, tok = load_model()
    batch = calibration_batch(tok, calibration_text("pydoc"), 10, 64, 0)
    ids = tokenize_text(tok, heldout_text("pydoc"))
    windows = args.eval_tokens // 128

    def ppl(model):
        return perplexity(model, None, ids, seq_len=128, max_windows=windows, progress=False)

    records = []
    t = time.perf_counter()
    dense_ppl = ppl(dense)
    records.append(meta.record("uniform", "dense", "SmolLM2-135M", "fp32", "ppl@128", "ppl", dense_ppl,
                               params=sum(q.numel() for q in dense.parameters()), seconds=time.perf_counter() - t))
    print(f"dense: PPL@128 {dense_ppl:.3f}", flush=True)
    structure = discover(dense)
    reload_check = None
    for method in args.methods.split(","):
        t = time.perf_counter()
        moreau = MoreauConfig(mode="paper", seed=0) if method == "moreau" else None
        scores, _, _ = compute_scores(dense, batch, method, PruneConfig(ratio=args.ratio, uniform=True), moreau,
                                      progress=False, structure=structure)
        score_s = time.perf_counter() - t
        matched = matched_ratio(structure, scores, args.ratio)
        for name, cfg in variants(args.ratio, matched, structure.num_layers):
            t = time.perf_counter()
            model = copy.deepcopy(dense)
            rep = prune_structure(discover(model), scores, cfg)
            value = ppl(model)
            heads = [l["num_attention_heads"] for l in rep.layers]
            inter = [l["intermediate_size"] for l in rep.layers]
            rec = meta.record("uniform", method, "SmolLM2-135M", "fp32", "ppl@128", "ppl", value, variant=name,
                              ratio=cfg.ratio, uniform=cfg.uniform, round_to=cfg.round_to, scope=cfg.scope,
                              attn_layers=[rep.attn_layers[0], rep.attn_layers[-1] + 1],
                              mlp_layers=[rep.mlp_layers[0], rep.mlp_layers[-1] + 1],
                              params_before=rep.params_before, params_after=rep.params_after,
                              kept_fraction=rep.kept_fraction, heads=[min(heads), max(heads)],
                              intermediate=[min(inter), max(inter)], uniform_cost=rep.uniform,
                              score_seconds=score_s, seconds=time.perf_counter() - t,
                              moreau_mode="paper" if method == "moreau" else None)
            if cfg.uniform and cfg.round_to == 64 and reload_check is None:
                with tempfile.TemporaryDirectory() as d, torch.no_grad():
                    out = save_uniform(model, Path(d) / "stock", tokenizer=tok, extra=rep.as_dict())
                    back = AutoModelForCausalLM.from_pretrained(out).eval()
                    x = ids[: 128].unsqueeze(0)
                    reload_check = {"method": method, "variant": name, "config_class": type(back.config).__name__,
                                    "logits_equal": bool(torch.equal(back(x).logits, model(x).logits)),
                                    "ppl_reloaded": ppl(back), "ppl_in_memory": value,
                                    "config": {k: getattr(back.config, k) for k in
                                               ("model_type", "num_attention_heads", "num_key_value_heads",
                                                "intermediate_size", "head_dim")}}
                    rec["reload_check"] = reload_check
                    del back
            records.append(rec)
            print(f"{method:7s} {name:55s} params {rep.params_after:,} ({100 * rep.kept_fraction:.2f}%)  "
                  f"PPL@128 {value:.3f}", flush=True)
            del model
    out = Path(args.out)
    write_results(out / "uniform.json", records, command="python benchmarks/uniform.py " + " ".join(sys.argv[1:]),
                  eval_windows=windows, calibration="pydoc 10x64, seed 0")
    (out / "UNIFORM.md").write_text(render(records, windows), encoding="utf-8")
    print(f"wrote {out}/uniform.json and UNIFORM.md")
    return 0


def render(records: list[dict], windows: int) -> str:
    dense = records[0]
    lines = [
        "# Uniform (stock-config) vs per-layer pruning, SmolLM2-135M",
        "",
        f"Written by `python benchmarks/uniform.py` on {dense['device_name']} ({dense['threads']} thread), "
        f"commit {dense['commit']}, {dense['date']}. fp32; calibration 10x64 tokens of the pydoc split (seed 0); "
        f"PPL over {windows} windows of 128 held-out tokens. Scores are computed once per method over all "
        "layers; every row prunes a fresh copy with them.",
        "",
        f"Dense: {dense['params']:,} parameters, PPL@128 {dense['value']:.3f}.",
        "",
        "| method | variant | layers pruned | heads | MLP width | params after | kept | PPL@128 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records[1:]:
        a = r["attn_layers"]
        heads = str(r["heads"][0]) if r["heads"][0] == r["heads"][1] else f"{r['heads'][0]}..{r['heads'][1]}"
        inter = (str(r["intermediate"][0]) if r["intermediate"][0] == r["intermediate"][1]
                 else f"{r['intermediate'][0]}..{r['intermediate'][1]}")
        method = "moreau (paper)" if r["provider"] == "moreau" else r["provider"]
        lines.append(f"| {method} | {r['variant']} | {a[0]}:{a[1]} | {heads} | {inter} | {r['params_after']:,} | "
                     f"{100 * r['kept_fraction']:.2f} % | {r['value']:.3f} |")
    checks = [r["reload_check"] for r in records if r.get("reload_check")]
    for c in checks:
        lines += ["", f"Stock reload ({c['method']}, {c['variant']}): `AutoModelForCausalLM.from_pretrained(dir)` "
                  f"without trust_remote_code gives a {c['config_class']} ({json.dumps(c['config'])}); logits "
                  f"identical to the in-memory model: {c['logits_equal']}; PPL@128 {c['ppl_reloaded']:.3f} "
                  f"(in memory {c['ppl_in_memory']:.3f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
