#!/usr/bin/env python
"""Render ``benchmarks/results/QUALITY.md`` and its PNG plots from the records of
``benchmarks/quality.py`` (every ``<in>/<model-tag>/records.jsonl``), of ``moreau-recover`` runs
(``results/recovery/*.json``) and of ``benchmarks/recovery_distill.py`` (``results/recovery/distill/*.json``).
Never edit the output by hand::

    python benchmarks/render_quality.py
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_IN = ROOT / "results" / "quality"
DEFAULT_OUT = ROOT / "results" / "QUALITY.md"
METHOD_ORDER = ("moreau-reference", "moreau-paper", "moreau-paper+owl", "moreau-paper+alpha", "moreau-paper+farms",
                "taylor", "taylor-second", "taylor-mix", "taylor-vector", "magnitude", "random",
                "us-moreau-reference", "us-moreau-paper", "us-taylor", "us-wanda", "us-gblm", "us-magnitude",
                "us-wanda+trim", "us-gblm+trim", "us-moreau-paper+trim")
#: (method, baseline) pairs of the second paired table: LLM-Pruner's Taylor variants and the per-layer
#: allocations against the method they modify, and Moreau (paper mode) against every Taylor variant
VARIANT_PAIRS = (("taylor-second", "taylor"), ("taylor-mix", "taylor"), ("taylor-vector", "taylor"),
                 ("moreau-paper", "taylor-second"), ("moreau-paper", "taylor-mix"), ("moreau-paper", "taylor-vector"),
                 ("moreau-paper+owl", "moreau-paper"), ("moreau-paper+alpha", "moreau-paper"),
                 ("moreau-paper+farms", "moreau-paper"))
UNSTRUCTURED_PAIRS = tuple((a, b) for a in ("us-moreau-reference", "us-moreau-paper")
                           for b in ("us-taylor", "us-wanda", "us-gblm", "us-magnitude"))
#: (TRIM method, its base metric): same metric, same layer ratio, per-row ratios by TRIM vs uniform rows
TRIM_PAIRS = (("us-wanda+trim", "us-wanda"), ("us-gblm+trim", "us-gblm"), ("us-moreau-paper+trim", "us-moreau-paper"))
RENDER_CMD = "python benchmarks/render_quality.py"


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    # one record per key (the last one wins should a key appear twice)
    return list({r["key"]: r for r in out}.values())


def mean_std(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(m: float, s: float, n: int, digits: int = 2) -> str:
    if n == 0 or math.isnan(m):
        return "–"
    if n == 1:
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})"


def unit_set(kept: dict, part: str = "all") -> set:
    """Kept prunable units as a set: ('h', layer, head) and ('c', layer, channel)."""
    out = set()
    if part in ("all", "heads"):
        out |= {("h", layer, h) for layer, hs in kept["heads"].items() for h in hs}
    if part in ("all", "channels"):
        out |= {("c", layer, c) for layer, cs in kept["channels"].items() for c in cs}
    return out


def iou(a: set, b: set) -> float:
    u = len(a | b)
    return len(a & b) / u if u else 1.0


def settings_of(r: dict) -> str:
    return json.dumps([r.get("eval"), r.get("calib"), r.get("granularity"), r.get("scope"), r.get("attn_layers"),
                       r.get("mlp_layers")], sort_keys=True)


def ratio_label(ratio) -> str:
    return ratio if isinstance(ratio, str) else f"{ratio:g}"


def ratio_order(ratio):
    return (isinstance(ratio, str), str(ratio) if isinstance(ratio, str) else ratio)


def method_key(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class ModelReport:
    def __init__(self, tag: str, records: list[dict], plan: dict | None):
        self.tag = tag
        # one experiment per report: keep the records made with the most common settings (an
        # earlier run with other evaluation windows, calibration or granularity is left out)
        counts, latest = defaultdict(int), defaultdict(str)
        for r in records:
            counts[settings_of(r)] += 1
            latest[settings_of(r)] = max(latest[settings_of(r)], r.get("date", ""))
        main = max(counts, key=lambda k: (counts[k], latest[k])) if counts else None  # ties: the newest
        self.ignored = [r for r in records if settings_of(r) != main]
        # equal-size cells (quality.py --target-params): layer ranges, scopes and rounds side by side
        self.sized = [r for r in records if r.get("target_params") and r["precision"] == "fp32"
                      and not r.get("unstructured")]
        self.sized += self._same_pruning_cells(records)
        records = [r for r in records if settings_of(r) == main]
        self.records = records
        self.plan = plan or {}
        self.dense = next((r for r in records if r["method"] == "dense"), None)
        self.all_pruned = [r for r in records if r["method"] != "dense"]
        self.pruned = [r for r in self.all_pruned if not r.get("unstructured")]  # structured
        self.us = [r for r in self.all_pruned if r.get("unstructured")]
        self.by = defaultdict(list)  # (method, ratio, precision) -> records
        for r in self.all_pruned:
            self.by[(r["method"], r["ratio"], r["precision"])].append(r)
        self.us_methods = sorted({r["method"] for r in self.us}, key=method_key)
        self.us_ratios = sorted({r["ratio"] for r in self.us}, key=ratio_order)
        self.methods = sorted({r["method"] for r in self.pruned}, key=method_key)
        self.ratios = sorted({r["ratio"] for r in self.pruned if r["precision"] == "fp32"})
        self.long = (records[0]["eval"] or {}).get("long_seq_len", 1024) if records else 1024

    def cell(self, method, ratio, precision="fp32"):
        return sorted(self.by.get((method, ratio, precision), []), key=lambda r: r["seed"] or 0)

    # -- PPL vs ratio
    def ppl_table(self, metric: str) -> str:
        header = ["method"] + [f"r={r:g}" for r in self.ratios]
        rows = []
        if self.dense:
            rows.append(["dense"] + [f"{self.dense[metric]:.2f}" if self.dense[metric] is not None else "–"] *
                        len(self.ratios))
        for m in self.methods:
            rows.append([m] + [fmt(*mean_std([r[metric] for r in self.cell(m, ratio)])) for ratio in self.ratios])
        return table(header, rows)

    def params_line(self) -> str:
        parts = []
        for ratio in self.ratios:
            recs = [r for m in self.methods for r in self.cell(m, ratio)]
            if recs:
                parts.append(f"r={ratio:g}: {recs[0]['params_after']:,} of {recs[0]['params_before']:,} parameters "
                             f"kept ({recs[0]['params_kept_fraction']:.1%})")
        return "; ".join(parts)

    # -- paired comparison (same seed = same calibration batch)
    def paired(self, a: str, b: str, ratio, metric: str):
        ra = {r["seed"]: r[metric] for r in self.cell(a, ratio)}
        rb = {r["seed"]: r[metric] for r in self.cell(b, ratio)}
        if b in ("magnitude", "us-magnitude") and len(rb) == 1:  # seed-free: compare every seed of a to it
            (v,) = rb.values()
            rb = {s: v for s in ra}
        seeds = sorted(set(ra) & set(rb))
        diffs = [ra[s] - rb[s] for s in seeds if ra[s] is not None and rb[s] is not None]
        return diffs

    def comparison_table(self, metric: str, pairs=None, ratios=None, label="Moreau mode vs"):
        ratios = self.ratios if ratios is None else ratios
        if pairs is None:
            pairs = [(a, b) for a in ("moreau-reference", "moreau-paper") for b in ("taylor", "magnitude", "random")]
        header = [label, *[f"r={ratio_label(r)}" for r in ratios]]
        rows, sentences = [], []
        known = {r["method"] for r in self.all_pruned}
        for a, b in pairs:
            if a not in known or b not in known:
                continue
            row = [f"{a} − {b}"]
            for ratio in ratios:
                d = self.paired(a, b, ratio, metric)
                if not d:
                    row.append("–")
                    continue
                m, s, n = mean_std(d)
                wins = sum(x < 0 for x in d)
                row.append(f"{m:+.2f} ± {s:.2f} ({wins}/{n} lower)")
                rel = m / statistics.fmean(r[metric] for r in self.cell(b, ratio)) * 100
                verdict = ("lower (better)" if m < 0 else "higher (worse)") if abs(m) > s else \
                    "within the seed spread of"
                if n == 1:
                    sentences.append(f"r={ratio_label(ratio)}: {a} is {'lower' if m < 0 else 'higher'} than {b} by "
                                     f"{abs(m):.2f} PPL ({rel:+.1f} %) with a single seed: no spread to "
                                     "judge it against.")
                elif verdict.startswith("within"):
                    sentences.append(f"r={ratio_label(ratio)}: {a} is within the seed spread of {b} "
                                     f"(Δ{metric} {m:+.2f} ± {s:.2f}, {rel:+.1f} %, lower in {wins}/{n} seeds).")
                else:
                    sentences.append(f"r={ratio_label(ratio)}: {a} is {verdict} than {b} by {abs(m):.2f} PPL "
                                     f"({rel:+.1f} %; ± {s:.2f} over {n} paired seeds, lower in {wins}/{n}).")
            rows.append(row)
        return table(header, rows), sentences

    # -- IoU
    def precision_iou(self):
        """(method, ratio, (p, q)) -> {'all'/'heads'/'channels': [IoU per seed]}, and the PPL differences
        q − p, for the pairs fp32↔bf16, fp32↔fp16 and bf16↔fp16 (MoreauPruner's own comparison)."""
        out, dppl = {}, {}
        cells = sorted({(m, ratio) for (m, ratio, prec) in self.by if prec != "fp32" and not m.startswith("us-")},
                       key=lambda c: (method_key(c[0]), ratio_order(c[1])))
        for m, ratio in cells:
            for p, q in (("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "fp16")):
                base = {r["seed"]: r for r in self.cell(m, ratio, p)}
                vals = defaultdict(list)
                diffs = {"ppl_128": [], "ppl_1024": []}
                for r in self.cell(m, ratio, q):
                    b = base.get(r["seed"])
                    if b is None:
                        continue
                    for part in ("all", "heads", "channels"):
                        vals[part].append(iou(unit_set(b["kept"], part), unit_set(r["kept"], part)))
                    for k in diffs:
                        if r[k] is not None and b[k] is not None:
                            diffs[k].append(r[k] - b[k])
                if vals:
                    out[(m, ratio, (p, q))] = vals
                    dppl[(m, ratio, (p, q))] = diffs
        return out, dppl

    def seed_iou(self, precision="fp32"):
        out = {}
        for m in self.methods:
            for ratio in self.ratios:
                recs = self.cell(m, ratio, precision)
                if len(recs) < 2:
                    continue
                vals = defaultdict(list)
                for a, b in itertools.combinations(recs, 2):
                    for part in ("all", "heads", "channels"):
                        vals[part].append(iou(unit_set(a["kept"], part), unit_set(b["kept"], part)))
                out[(m, ratio)] = vals
        return out

    def _same_pruning_cells(self, records: list[dict]) -> list[dict]:
        """Ratio-grid cells that are equal-size cells too: same local setting, calibration and
        128-token windows, at the very ratio the target solved to (the same units go, so the same
        ppl_128), for a (method, seed) the equal-size run lacks; methods of the equal-size runs plus
        the published update and LLM-Pruner's second order. Marked ``same_pruning_as``."""
        def setting(r):
            return (r["scope"], r["attn_layers"], r["mlp_layers"], r["granularity"], r.get("rounds") or 1,
                    json.dumps(r["calib"], sort_keys=True), r["eval"]["corpus"], r["eval"]["windows_128"])

        solved, have = {}, set()
        methods = {r["method"] for r in self.sized} | {"moreau-reference", "taylor-second"}
        for r in self.sized:
            if r["scope"] == "local":
                solved[setting(r)] = (r["ratio"], r["target_params"], r["eval"])
            have.add((setting(r), r["method"], r["seed"]))
        out = []
        for r in records:
            key = setting(r)
            if (r.get("target_params") or r["precision"] != "fp32" or r["method"] not in methods
                    or key not in solved or r["ratio"] != solved[key][0] or (key, r["method"], r["seed"]) in have):
                continue
            have.add((key, r["method"], r["seed"]))
            out.append({**r, "target_params": solved[key][1], "eval": solved[key][2], "ppl_1024": None,
                        "same_pruning_as": r["key"]})
        return out

    def missing(self) -> list[str]:
        have = {(r["method"], r["ratio"], r["seed"], r["precision"]) for r in self.all_pruned}
        have |= {(r["method"], f"p{r['target_params']}", r["seed"], r["precision"]) for r in self.sized}
        miss = []
        for c in self.plan.get("cells", []):
            if (c["method"], c["ratio"], c["seed"], c["precision"]) not in have:
                miss.append(f"{c['method']} r={ratio_label(c['ratio'])} seed={c['seed']} {c['precision']}")
        return miss

    def half_gemm_note(self) -> str:
        modes = sorted({(r["precision"], r.get("half_gemm")) for r in self.pruned if r["precision"] != "fp32"})
        parts = []
        for prec, mode in modes:
            if mode == "fp32-accumulate":
                parts.append(f"{prec}: matrix products computed from the {prec} operands with fp32 accumulation "
                             f"and rounded to {prec} (what a GPU tensor-core GEMM does; the CPU's native {prec} "
                             "GEMM is ~20x slower), everything else in " + prec)
            elif mode:
                parts.append(f"{prec}: PyTorch's native {prec} kernels")
        return (" " + "; ".join(parts) + ".") if parts else ""

    # -- LLM-Pruner Taylor variants and per-layer allocations
    def variants_markdown(self) -> list[str]:
        known = {r["method"] for r in self.pruned}
        if not any(a in known and b in known for a, b in VARIANT_PAIRS):
            return []
        out = ["### LLM-Pruner's Taylor variants and per-layer allocations, paired by seed (negative = first "
               "better)", "",
               "taylor-second / taylor-mix / taylor-vector are LLM-Pruner's param_second (W·F·W with the Fisher "
               "diagonal over the calibration sequences), param_mix and vector-wise scores; +owl / +alpha / "
               "+farms prune moreau-paper's scores with per-layer ratios from OWL, AlphaPruning and FARMS (the "
               "size-weighted mean ratio is r).", ""]
        for metric in ("ppl_128", "ppl_1024"):
            win = "128" if metric == "ppl_128" else str(self.long)
            tab, sentences = self.comparison_table(metric, VARIANT_PAIRS, label=f"{win}-token windows")
            out += [tab, ""]
            if metric == "ppl_128" and sentences:
                out += ["Read from the 128-token table:", ""] + [f"- {x}" for x in sentences] + [""]
        spans = []
        for m in ("moreau-paper+owl", "moreau-paper+alpha", "moreau-paper+farms"):
            for ratio in self.ratios:
                recs = [r for r in self.cell(m, ratio) if r.get("allocation")]
                if recs:
                    vals = list(recs[0]["allocation"]["ratios"].values())
                    kept = statistics.fmean(r["params_kept_fraction"] for r in recs)
                    uni = [r["params_kept_fraction"] for r in self.cell("moreau-paper", ratio)]
                    spans.append(f"{m} at r={ratio:g}: layer ratios {min(vals):.3f} to {max(vals):.3f}, "
                                 f"{kept:.2%} of the parameters kept" +
                                 (f" (uniform: {statistics.fmean(uni):.2%})" if uni else ""))
        if spans:
            matched = {(r.get("allocation") or {}).get("matched") for r in self.pruned if r.get("allocation")}
            how = ("The allocations are fitted so the parameters removed match uniform r's "
                   "(`allocation.structured_removal`): heads go in whole KV-group steps (SPEC §5's floor rule), "
                   "so fitting the size-weighted mean *ratio* instead lets a layer pushed past a step lose heads "
                   "that the layers below it do not give back (OWL then kept 84.1 % of SmolLM2 at r = 0.3 "
                   "against uniform's 85.8 %)." if matched == {"parameters removed"} else
                   "These allocations were fitted to the size-weighted mean *ratio*; heads go in whole "
                   "KV-group steps, so where the kept fraction is lower than uniform's the allocation removed "
                   "more parameters and its PPL is not at equal size.")
            out += ["Per-layer ratios the allocators chose (seed 0) and the parameters kept (mean over seeds). "
                    + how, ""] + [f"- {x}" for x in spans] + [""]
        return out

    # -- layer ranges, scopes and rounds at equal size
    def layers_markdown(self) -> list[str]:
        """"Which layers to prune": every setting of the equal-size cells (same target parameter count,
        evaluation and calibration), methods as columns, mean ± std over seeds, and paired
        differences against the published range (local 4:28 of 30, one shot) where it was run, else
        against the first setting."""
        if not self.sized:
            return []
        groups = defaultdict(list)
        for r in self.sized:
            groups[(r["target_params"], json.dumps([r.get("eval"), r.get("calib")], sort_keys=True))].append(r)
        out = ["### Which layers to prune (equal size, fp32)", ""]
        for (target, _), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            out += self._layers_group(target, recs)
        return out

    @staticmethod
    def setting_of(r: dict) -> str:
        a, m = r["attn_layers"], r["mlp_layers"]
        label = f"{r['scope']} {a}" if a == m else f"{r['scope']} attention {a}, MLP {m}"
        if r["granularity"] != "query-heads":
            label += f", {r['granularity']}"
        if (r.get("rounds") or 1) > 1:
            label += f", {r['rounds']} rounds"
        return label

    def _layers_group(self, target: int, recs: list[dict]) -> list[str]:
        ev, before = recs[0]["eval"], recs[0]["params_before"]
        by = defaultdict(dict)  # (setting, method) -> {seed: record}
        for r in recs:
            by[(self.setting_of(r), r["method"])][r["seed"]] = r
        methods = sorted({m for _, m in by}, key=method_key)
        settings = sorted({s for s, _ in by}, key=lambda s: (s.split(" ")[0], "rounds" in s, s))
        heads = max((len(h) for r in recs if r.get("kept") for h in r["kept"]["heads"].values()), default=0)

        def removed_heads(r):
            return sum(heads - len(h) for h in r["kept"]["heads"].values()) if r.get("kept") else 0

        dense = next((d for d in self.records + self.ignored if d["method"] == "dense" and d["eval"] == ev), None)
        out = [f"Every cell is pruned to at most {target:,} of {before:,} parameters ({target / before:.2%}), at "
               "the smallest ratio that gets there (`quality.py --target-params`, "
               "`moreau_pruner.prune.plan.ratio_for_params`): the settings differ in *where* the parameters go, not "
               "in how many. Local scope removes the same fraction of the units of every layer in the range, "
               "so a range of fewer layers needs a higher ratio; global scope ranks all heads and channels of "
               "the range by score per weight. Perplexity on the first "
               f"{ev['windows_128']} held-out 128-token windows"
               + (f" (dense {dense['ppl_128']:.2f})" if dense else "") + "; mean ± std over seeds."
               + (f" {sum(1 for r in recs if r.get('same_pruning_as'))} cell(s) come from the ratio grid above: "
                  "the same setting at the very ratio the target solves to (the same units removed, the same "
                  "windows)." if any(r.get("same_pruning_as") for r in recs) else ""), ""]
        rows = []
        for s in settings:
            row = [s]
            for m in methods:
                cell = by.get((s, m), {})
                row.append(fmt(*mean_std([r["ppl_128"] for r in cell.values()])))
            cell = [r for m in methods for r in by.get((s, m), {}).values()]
            ratios = sorted({round(r["ratio"], 4) for r in cell})
            after = [r["params_after"] for r in cell]
            hs = sorted({removed_heads(r) for r in cell})
            row += [f"{ratios[0]:g}" if len(ratios) == 1 else f"{ratios[0]:g}–{ratios[-1]:g}",
                    f"{min(after):,}" if min(after) == max(after) else f"{min(after):,}–{max(after):,}",
                    f"{hs[0]}" if len(hs) == 1 else f"{hs[0]}–{hs[-1]}"]
            rows.append(row)
        out += [table(["setting", *methods, "ratio", "parameters after", "query heads removed"], rows), ""]
        means = {(s, m): mean_std([r["ppl_128"] for r in by[(s, m)].values()]) for s, m in by}
        (bs, bm), (bmu, bsd, bn) = min(means.items(), key=lambda kv: kv[1][0])
        out += [f"Lowest mean: {bm} with {bs} ({bmu:.2f} ± {bsd:.2f}, n={bn}).", ""]
        ref = "local 4:28" if "local 4:28" in settings else settings[0]
        diff_rows = []

        def paired(first, second, setting, method):
            """One row: the seed-paired PPL_128 difference of cells ``first`` − ``second``, when they share seeds."""
            a, b = by[first], by[second]
            d = [a[k]["ppl_128"] - b[k]["ppl_128"] for k in sorted(set(a) & set(b))]
            if d:
                mu, sd, n = mean_std(d)
                diff_rows.append([setting, method, f"{mu:+.2f} ± {sd:.2f} ({sum(x < 0 for x in d)}/{n} lower)"])

        for s in settings:
            for m in methods:
                base_setting = ref if ref and s != ref else None
                if base_setting is not None and (base_setting, m) in by and (s, m) in by:
                    paired((s, m), (base_setting, m), f"{s} − {base_setting}", m)
        for s in settings:  # iterative against one-shot pruning of the same range
            one_shot = s.rsplit(", ", 1)[0] if s.endswith(" rounds") else None
            for m in methods:
                if one_shot and (s, m) in by and (one_shot, m) in by:
                    paired((s, m), (one_shot, m), f"{s} − {one_shot}", m)
        for s in settings:
            for a_m, b_m in (("moreau-paper", "taylor"), ("taylor-second", "taylor"), ("moreau-paper", "taylor-second")):
                if (s, a_m) in by and (s, b_m) in by:
                    paired((s, a_m), (s, b_m), s, f"{a_m} − {b_m}")
        if diff_rows:
            out += ["Paired by seed (same calibration batch; negative = the first is better):", "",
                    table(["setting", "method", "ΔPPL_128"], diff_rows), ""]
        return out

    # -- unstructured
    def unstructured_markdown(self) -> list[str]:
        if not self.us:
            return []
        out = ["### Unstructured and N:M sparsity (weights zeroed in every decoder layer's q/k/v/o/gate/up/down)",
               "",
               "Sparsity r = fraction of each output row zeroed (2:4 = two of every four consecutive inputs); "
               "the model keeps its shape. us-moreau-* use |Ĝ⊙W| from the same estimator as the structured path, "
               "us-taylor |g⊙W| with the plain gradient; "
               "us-wanda |W|·‖X‖ and us-gblm (|W|·‖X‖ + |W|·‖100·G‖₂ over the calibration sequences) measure "
               "activations layer by layer through the already pruned layers (sequential, as the papers).", ""]
        for metric in ("ppl_128", "ppl_1024"):
            win = "128" if metric == "ppl_128" else str(self.long)
            header = ["method"] + [f"r={ratio_label(r)}" for r in self.us_ratios]
            rows = [[m] + [fmt(*mean_std([r[metric] for r in self.cell(m, ratio)])) for ratio in self.us_ratios]
                    for m in self.us_methods]
            if self.dense and self.dense[metric] is not None:
                rows.insert(0, ["dense"] + [f"{self.dense[metric]:.2f}"] * len(self.us_ratios))
            out += [f"Perplexity, {win}-token windows (mean ± std over seeds):", "", table(header, rows), ""]
        measured = []
        for ratio in self.us_ratios:
            sp = [r["unstructured"]["sparsity"] for r in self.us if r["ratio"] == ratio]
            zf = [r["unstructured"]["model_zero_fraction"] for r in self.us if r["ratio"] == ratio]
            measured.append(f"r={ratio_label(ratio)}: {min(sp):.4f}–{max(sp):.4f} of the pruned matrices "
                            f"({min(zf):.3f}–{max(zf):.3f} of all parameters)")
        out += ["Measured sparsity: " + "; ".join(measured) + ".", ""]
        tab, sentences = self.comparison_table("ppl_128", UNSTRUCTURED_PAIRS, self.us_ratios,
                                               label="128-token windows")
        if sentences:
            out += ["Paired by seed (negative = Moreau better):", "", tab, "", "Read from the table:", ""] + \
                   [f"- {x}" for x in sentences] + [""]
        return out + self.trim_markdown()

    def trim_markdown(self) -> list[str]:
        """TRIM (per-row ratios) against its base metric with uniform rows, paired by seed."""
        known = {r["method"] for r in self.us}
        pairs = [(a, b) for a, b in TRIM_PAIRS if a in known and b in known]
        if not pairs:
            return []
        ratios = [r for r in self.us_ratios if not isinstance(r, str)
                  and any(self.cell(a, r) for a, _ in pairs)]
        out = ["#### TRIM: per-row sparsity ratios (`--allocation trim`)", "",
               "`us-<metric>+trim` prunes with the same metric and the same ratio per matrix as `us-<metric>`, but "
               "each output row gets its own ratio, lowered step by step for the rows whose outputs lose the "
               "most and raised for the others (cosine similarity to the dense outputs on the calibration batch; TRIM, "
               "arXiv 2505.16743; `moreau_pruner.unstructured.trim`). Every matrix removes exactly as many weights as the "
               "uniform rows. Differences are TRIM − base metric, paired by seed (same calibration batch): "
               "negative = TRIM better."]
        cal = (self.us[0].get("calib") or {}) if self.us else {}
        if cal.get("n_samples") and cal.get("seq_len"):
            out[-1] += (f" TRIM measures every row's output cosine on the calibration batch, here "
                        f"{cal['n_samples']} × {cal['seq_len']} = {cal['n_samples'] * cal['seq_len']} tokens (the "
                        "paper calibrates on 256 × 2048).")
        out.append("")
        for metric in ("ppl_128", "ppl_1024"):
            win = "128" if metric == "ppl_128" else str(self.long)
            tab, sentences = self.comparison_table(metric, pairs, ratios, label=f"{win}-token windows")
            out += [f"Perplexity difference, {win}-token windows:", "", tab, ""]
            if metric == "ppl_128":
                out += ["Read from the table:", ""] + [f"- {x}" for x in sentences] + [""]
        rows = []
        for a, _ in pairs:
            for ratio in ratios:
                summ = [r["unstructured"]["trim"] for r in self.cell(a, ratio) if r["unstructured"].get("trim")]
                if summ:
                    rows.append([a, ratio_label(ratio),
                                 fmt(*mean_std([t["quality_uniform_mean"] for t in summ]), digits=5),
                                 fmt(*mean_std([t["quality_mean"] for t in summ]), digits=5),
                                 f"{statistics.fmean(t['improved'] for t in summ):.1f} of {summ[0]['matrices']}"])
        if rows:
            out += ["The metric TRIM optimises, per matrix on its own calibration inputs: output cosine similarity "
                    "of the uniform rows and of TRIM's rows (mean over matrices, then mean ± std over seeds), and "
                    "the matrices where TRIM found better rows than uniform:", "",
                    table(["method", "r", "cosine, uniform rows", "cosine, TRIM rows", "matrices improved"], rows),
                    ""]
        half = [(a, b) for a, b in pairs if self.cell(a, 0.5) and self.cell(b, 0.5)]
        if half:
            best = min((b for _, b in half), key=lambda b: statistics.fmean(r["ppl_128"] for r in self.cell(b, 0.5)))
            a = next(x for x, y in half if y == best)
            d = self.paired(a, best, 0.5, "ppl_128")
            wins = sum(x < 0 for x in d)
            verdict = (f" — only {len(d)} paired seed(s) so far." if len(d) < 3 else
                       " — met." if wins == len(d) else " — not met.")
            out += [f"Target (r=0.5, TRIM on the best of these base metrics by 128-token PPL, {best}): {a} is lower "
                    f"in {wins}/{len(d)} seeds{verdict}", ""]
        return out

    # -- plots
    def plot(self, out_dir: Path) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        files = []
        metrics = [("ppl_128", "128-token windows"), ("ppl_1024", f"{self.long}-token windows")]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (metric, title) in zip(axes, metrics):
            for i, m in enumerate(self.methods):
                xs, ys, es = [], [], []
                for ratio in self.ratios:
                    mu, sd, n = mean_std([r[metric] for r in self.cell(m, ratio)])
                    if n:
                        xs.append(ratio), ys.append(mu), es.append(sd)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="os^Dv"[i % 5], capsize=3, label=m,
                                color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--")
            if self.dense and self.dense[metric] is not None:
                ax.axhline(self.dense[metric], color="k", ls="--", lw=1, label="dense")
            ax.set_xlabel("pruning ratio")
            ax.set_ylabel("perplexity (mean ± std over seeds)")
            ax.set_title(title)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{self.tag}: held-out perplexity vs pruning ratio (fp32 importance)")
        fig.tight_layout()
        name = f"quality_ppl_{self.tag}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

        piou, _ = self.precision_iou()
        siou = self.seed_iou()
        bars = []
        for (m, ratio, pair), vals in piou.items():
            bars.append((f"{m}\nr={ratio:g} {pair[0]}↔{pair[1]}", *mean_std(vals["all"])[:2]))
        for (m, ratio), vals in siou.items():
            if ratio in (0.2,) or len(self.ratios) == 1 or ratio == self.ratios[len(self.ratios) // 2]:
                bars.append((f"{m}\nr={ratio:g} seeds", *mean_std(vals["all"])[:2]))
        if bars:
            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) + 2), 4.5))
            colors = ["tab:blue" if "↔" in b[0] else "tab:orange" for b in bars]
            ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=3, color=colors)
            ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("IoU of kept heads + channels")
            lo = min(b[1] - b[2] for b in bars)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
            ax.set_title(f"{self.tag}: kept-set IoU (blue: fp32 vs lower precision, same seed; "
                         "orange: between seeds, fp32)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            name = f"quality_iou_{self.tag}.png"
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            files.append(name)
        return files

    # -- markdown
    def markdown(self, out_dir: Path, plots: bool = True) -> str:
        r0 = self.records[0]
        ev, cal = r0["eval"], r0["calib"]
        machines = sorted({r.get("machine", "?") for r in self.records})
        commits = sorted({r.get("git_commit", "") for r in self.records} - {""})
        torch_v = sorted({r.get("torch", "?") for r in self.records})
        iters = sorted({r["moreau_iters"] for r in self.pruned if r.get("moreau_iters")})
        seeds = sorted({r["seed"] for r in self.pruned if r["seed"] is not None})
        out = [f"## {self.tag}", ""]
        hosts = sorted({f"{h['cpu_model']} ({h['cpu_count']} cores visible)" for h in
                        (r.get("host") for r in self.records) if h})
        loads = [h["load_avg"][0] for h in (r.get("host") for r in self.records) if h and h.get("load_avg")]
        out.append(f"- Machine: {', '.join(machines)}" + (f"; {', '.join(hosts)}" if hosts else "") +
                   (f"; 1-min load average when cells were written: {min(loads):.1f} to {max(loads):.1f} "
                    "(a shared machine: timings are indicative only)" if loads else "") +
                   f"; torch {', '.join(torch_v)}; commit(s) {', '.join(commits)}.")
        out.append(f"- Calibration: {cal['n_samples']} × {cal['seq_len']} tokens from the `{cal['corpus']}` "
                   f"calibration split; seed s draws the batch *and* seeds the method (Moreau noise, random "
                   f"scores); seeds run: {', '.join(map(str, seeds))} (magnitude needs no seed: seed 0 only).")
        out.append(f"- Evaluation: held-out split of `{ev['corpus']}` ({ev['heldout_tokens']:,} tokens), the first "
                   f"{ev['windows_128']} non-overlapping windows of 128 tokens (ppl_128) and the first "
                   f"{ev['windows_long']} of {ev['long_seq_len']} (ppl_{ev['long_seq_len']}), pruned model "
                   "in fp32.")
        out.append(f"- Pruning: `{r0['scope']}` scope, `{r0['granularity']}` granularity, attention layers "
                   f"{r0['attn_layers']}, MLP layers {r0['mlp_layers']} (end exclusive); Moreau T = "
                   f"{', '.join(map(str, iters)) or '–'} steps, other hyper-parameters the published defaults.")
        if self.ratios:
            out.append(f"- Parameters: {self.params_line()}.")
        inv = self.plan.get("invocations", [])
        if inv:
            out.append("- Produced by: " + "; then ".join(f"`{c}`" for c in inv) + f"; rendered by `{RENDER_CMD}`.")
        out.append("")
        for metric, label in (("ppl_128", "128"), ("ppl_1024", str(self.long))):
            out += [f"### Perplexity, {label}-token windows (fp32 importance; mean ± std over seeds)", "",
                    self.ppl_table(metric), ""]
        if plots:
            out += [f"![PPL vs ratio](quality_ppl_{self.tag}.png)", ""]
        for metric in ("ppl_128", "ppl_1024"):
            tab, sentences = self.comparison_table(metric)
            win = "128" if metric == "ppl_128" else str(self.long)
            out += [f"### Moreau against the baselines, paired by seed ({win}-token windows; negative = Moreau "
                    "better)", "",
                    "Difference of perplexities of the same seed (same calibration batch), mean ± std over seeds, "
                    "and in how many seeds Moreau's perplexity is lower. Magnitude has one value, compared with "
                    "every seed.", "", tab, ""]
            if sentences:
                out += ["Read from the table (a difference is called a win or a loss only when |mean| exceeds "
                        "the std over seeds):", ""] + [f"- {s}" for s in sentences] + [""]
        out += self.variants_markdown()
        out += self.unstructured_markdown()
        out += self.layers_markdown()
        piou, dppl = self.precision_iou()
        if piou:
            rows = []
            for (m, ratio, pair), vals in piou.items():
                d = dppl[(m, ratio, pair)]
                rows.append([m, f"{ratio:g}", f"{pair[0]} vs {pair[1]}", fmt(*mean_std(vals["all"]), digits=4),
                             fmt(*mean_std(vals["heads"]), digits=4), fmt(*mean_std(vals["channels"]), digits=4),
                             fmt(*mean_std(d["ppl_128"]), digits=3), fmt(*mean_std(d["ppl_1024"]), digits=3)])
            out += ["### Robustness to the weights' precision during importance", "",
                    "Importance computed with the model's weights in fp32, bf16 and fp16 (same seed, same "
                    "calibration batch), compared in pairs; bf16 vs fp16 is MoreauPruner's own robustness "
                    "comparison. Every mask is applied to the fp32 model, so a PPL difference is due to the "
                    f"mask only.{self.half_gemm_note()} IoU = |kept ∩ kept'| / |kept ∪ kept'| over the "
                    "prunable units (query heads and MLP channels of the pruned layers); mean ± std over seeds.",
                    "", table(["method", "ratio", "precisions", "IoU heads+channels", "IoU heads", "IoU channels",
                               "ΔPPL_128 (second − first)", f"ΔPPL_{self.long} (second − first)"], rows), ""]
            sentences = []
            for (m, ratio, pair), vals in piou.items():
                base = piou.get(("taylor", ratio, pair))
                if not m.startswith("moreau") or base is None:
                    continue
                a, sa, n = mean_std(vals["all"])
                b, sb, _ = mean_std(base["all"])
                verdict = "within the seed spread of" if abs(a - b) <= max(sa, sb) else \
                    ("more stable than" if a > b else "less stable than")
                sentences.append(f"r={ratio:g}, {pair[0]} vs {pair[1]}: {m} (IoU {a:.4f}) is {verdict} taylor "
                                 f"(IoU {b:.4f}; difference {a - b:+.4f}, stds {sa:.4f} / {sb:.4f}, n={n}).")
            if sentences:
                out += ["Moreau against Taylor on the precision IoU (a difference counts when it exceeds the "
                        "larger std):", ""] + [f"- {x}" for x in sentences] + [""]
        siou = self.seed_iou()
        if siou:
            rows = [[m, f"{ratio:g}", fmt(*mean_std(v["all"]), digits=4), fmt(*mean_std(v["heads"]), digits=4),
                     fmt(*mean_std(v["channels"]), digits=4)] for (m, ratio), v in siou.items()]
            out += ["### Stability across seeds (fp32)", "",
                    "IoU of the kept sets between every pair of seeds (different calibration batch and noise); "
                    "mean ± std over the pairs. Shows how much of the precision IoU above is ordinary seed "
                    "variation.", "",
                    table(["method", "ratio", "IoU heads+channels", "IoU heads", "IoU channels"], rows), ""]
        if plots and (piou or siou):
            out += [f"![IoU](quality_iou_{self.tag}.png)", ""]
        miss = self.missing()
        out += ["### Completeness", ""]
        sized_evals = [r["eval"] for r in self.sized]
        other = [r for r in self.ignored if r not in self.sized
                 and not (r["method"] == "dense" and r["eval"] in sized_evals)]
        if other:
            out += [f"{len(other)} record(s) made with other settings (evaluation windows, calibration, "
                    "granularity or layer ranges) are in records.jsonl but not in these tables.", ""]
        if miss:
            out += [f"{len(miss)} planned cell(s) have no record (the run stopped before them; rerunning the "
                    "same command computes only these):", ""] + [f"- {m}" for m in miss] + [""]
        else:
            out += [f"All {len(self.plan.get('cells', [])) or len(self.pruned)} planned cells are recorded.", ""]
        times = defaultdict(list)
        for r in self.all_pruned:
            times[(r["method"], r["precision"])].append(r["time"]["importance_s"])
        rows = [[m, p, f"{statistics.fmean(v):.1f}", str(len(v))] for (m, p), v in
                sorted(times.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1]))]
        ev_t = [r["time"]["eval_s"] for r in self.records]
        out += ["### Cost", "", f"Mean wall time of the importance computation per scoring group (one per "
                f"method, seed and precision, shared by its ratios); evaluation took "
                f"{statistics.fmean(ev_t):.1f} s per cell on average.", "",
                table(["method", "precision", "importance s", "cells"], rows), ""]
        return "\n".join(out)


def recovery_markdown(recovery_dir: Path) -> list[str]:
    """The "Recovery" section from the records of ``moreau-recover`` runs (``<recovery_dir>/*.json``:
    the run's ``recovery.json`` plus ``model``, ``prune_command``, ``command``, ``device`` and ``date``)."""
    records = []
    for path in sorted(Path(recovery_dir).glob("*.json")):
        r = json.loads(path.read_text())
        if isinstance(r, dict) and "ppl_before" in r and "ppl_after" in r:
            records.append((path.name, r))
    if not records:
        return []
    rows = []
    for name, r in records:
        before, after, cfg = r["ppl_before"], r["ppl_after"], r["config"]
        losses = r["losses"]
        head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
        rows.append([r.get("model", name), r["data"]["source"], str(r["steps"]),
                     f"{cfg['batch_size']} x {cfg['cutoff_len']}", f"{cfg['rank']} / {cfg['alpha']:g} / {cfg['lr']:g}",
                     f"{statistics.fmean(head):.3f} → {statistics.fmean(tail):.3f}",
                     f"{before['ppl']:.2f} → {after['ppl']:.2f}",
                     f"{r['dense_ppl']['ppl']:.2f}" if r.get("dense_ppl") else "–",
                     f"{before['n_windows']} x {before['seq_len']}",
                     f"{r['train_time_s'] / 60:.1f}", r.get("device", "?"), r.get("date", "?")])
    out = ["## Recovery (LoRA after pruning)", "",
           "Short LoRA fine-tunes of pruned models with `moreau-recover` (peft on q/k/v/o/gate/up/down of every "
           "layer), trained on the calibration side of the text and scored on its held-out side (128-token windows as above; "
           "the dense model on the same windows). Loss: mean training loss of the first and last "
           "tenth of the steps. Training on the corpus's own calibration side also adapts the model to its style, "
           "so the recovered perplexity can fall below the dense model's: it measures recovery plus domain "
           "adaptation. Records and exact commands: `benchmarks/results/recovery/`.", "",
           table(["model", "data", "steps", "batch x tokens", "rank / alpha / lr", "train loss",
                  "held-out PPL before → after", "dense PPL", "eval windows", "train min", "device", "date"], rows), ""]
    for name, r in records:
        if r.get("prune_command") or r.get("command"):
            out += [f"`{name}`: pruned with `{r.get('prune_command', '?')}`, recovered with "
                    f"`{r.get('command', '?')}`.", ""]
    for path in sorted(Path(recovery_dir).glob("*.json")):  # benchmarks/ppl_compare.py records
        r = json.loads(path.read_text())
        if isinstance(r, dict) and "results" in r and "text" in r:
            out += [f"Other text (`{path.name}`: held-out {r['text']}, {r['windows']} x {r['seq_len']} tokens, "
                    f"{r.get('device', '?')}, `{r['command']}`):", "",
                    table(["model", "parameters", "PPL"],
                          [[x["model"], f"{x['params']:,}", f"{x['ppl']:.2f}"] for x in r["results"]]), ""]
    return out


DISTILL_CONFIGS = {"lora-lm": "LoRA, LM loss", "lora-kd": "LoRA, distillation", "full-kd": "full fine-tuning, distillation"}
DISTILL_TARGET = 1 / 3  # share of the out-of-domain perplexity gap to the dense model the best recovery must close


def _distill_records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        r = json.loads(path.read_text())
        if isinstance(r, dict) and r.get("config") in DISTILL_CONFIGS and "report" in r:
            out.append(r)
    return out


def _ppl_of(entry) -> float | None:
    return entry["ppl"] if entry else None


def _gap(before, after, dense):
    if before is None or after is None or dense is None or before == dense:
        return None
    return (before - after) / (before - dense)


#: the name of teacher-generated recovery text (``moreau-recover --data generated``)
GENERATED = "generated"


def _schedule(r: dict) -> str:
    return r.get("lr_schedule") or "constant"


def _scored(r: dict) -> dict:
    """text -> (pruned, recovered, teacher) perplexities of a record, for every text it scored: its recovery
    text's held-out side, its out-of-domain text and any further one (teacher None: not measured)."""
    rep = r["report"]
    data = rep.get("data") or {}
    teacher = rep.get("teacher") or {}
    oods = r["ood_data"].split(",")
    out = {data.get("heldout_source", r["data"]): (_ppl_of(rep.get("ppl_before")), _ppl_of(rep.get("ppl_after")),
                                                   _ppl_of(teacher.get("ppl")))}
    if rep.get("ppl_ood_after"):
        out[data.get("ood_source", oods[0])] = (_ppl_of(rep.get("ppl_ood_before")), _ppl_of(rep.get("ppl_ood_after")),
                                                _ppl_of(teacher.get("ppl_ood")))
    for source, m in (rep.get("more_ood") or {}).items():
        out[source] = (_ppl_of(m.get("ppl_before")), _ppl_of(m.get("ppl_after")), _ppl_of(m.get("teacher_ppl")))
    return out


def _corpora(records: list[dict]) -> tuple[str, str]:
    """(the corpus the rows trained on it call in domain, the out-of-domain corpus of every row)."""
    ood = records[0]["ood_data"].split(",")[0]
    ind = next((r["data"] for r in records if r["data"] != GENERATED), None)
    if ind is None:
        ind = next((s for r in records for s in r["ood_data"].split(",")[1:]), records[0]["data"])
    return ind, ood


def _distill_groups(records: list[dict]) -> dict:
    """(configuration index, not the in-domain corpus, recovery text, schedule, learning rate, steps) -> the
    records of those settings (one per seed)."""
    ind = _corpora(records)[0] if records else None
    groups: dict = {}
    for r in records:
        key = (list(DISTILL_CONFIGS).index(r["config"]), r["data"] != ind, r["data"], _schedule(r), r["lr"], r["steps"])
        groups.setdefault(key, []).append(r)
    return dict(sorted(groups.items()))


def _gaps(rs: list[dict], text: str, dense: dict) -> list:
    """The gap closed on ``text`` by each record (against its own teacher's perplexity, else ``dense``'s)."""
    out = []
    for r in rs:
        b, a, t = _scored(r).get(text, (None, None, None))
        out.append(_gap(b, a, t if t is not None else dense.get(text)))
    return out


def _text_label(data: str) -> str:
    return "teacher-generated" if data == GENERATED else data


def _distill_rows(records: list[dict], dense: dict) -> list[list[str]]:
    """One row per (configuration, recovery text, schedule, learning rate, steps): means over the seeds."""
    ind, ood = _corpora(records)
    own = any(r["data"] == GENERATED for r in records)
    rows = []
    for (_, _, data, schedule, lr, steps), rs in _distill_groups(records).items():
        def cell(text):
            vals = [_scored(r).get(text, (None, None, None)) for r in rs]
            b, a = mean_std([v[0] for v in vals]), mean_std([v[1] for v in vals])
            return f"{b[0]:.2f} → {fmt(*a)}" if a[2] else "–"

        def gap(text):
            return fmt(*mean_std(_gaps(rs, text, dense)), digits=3)

        sps = mean_std([r["seconds_per_step"] for r in rs])
        loads = [r["loadavg"]["mean"] for r in rs if r.get("loadavg")]
        gpu = mean_std([r["gpu_estimate"]["seconds_per_step"] * 1e3 for r in rs])
        row = [DISTILL_CONFIGS[rs[0]["config"]], _text_label(data), schedule, f"{lr:g}", str(steps),
               ", ".join(str(r["seed"]) for r in rs), cell(ind), cell(ood), gap(ood), gap(ind)]
        if own:
            teacher = mean_std([_scored(r)[GENERATED][2] for r in rs]) if data == GENERATED else None
            row.append(f"{cell(GENERATED)} (dense {teacher[0]:.2f})" if teacher and teacher[2] else "–")
        rows.append(row + [f"{sps[0]:.1f}" + (f" ({min(loads):.1f}-{max(loads):.1f})" if loads else ""),
                           f"{rs[0]['flops_per_step'] / 1e9:.0f}", f"{gpu[0]:.2f}"])
    return rows


def _budget(records: list[dict]) -> str:
    """The training budget of ``records``: one number of steps, or those of the steps column, and the text."""
    steps = sorted({r["steps"] for r in records})
    r0 = records[0]
    n = f"{steps[0]} steps" if len(steps) == 1 else f"the steps of each row ({', '.join(map(str, steps))})"
    texts = sorted({r["data"] for r in records}, key=lambda d: (d == GENERATED, d))
    sampled = ("text the dense teacher sampled itself (`moreau-recover --data generated`: sequences from its start "
               "token at temperature 1, seeded by the run's seed; the last fifth held out)")
    tokens = f"{n} of {r0['batch_size']} x {r0['cutoff_len']} tokens of"
    if len(texts) == 1:
        return f"{tokens} {sampled if texts[0] == GENERATED else texts[0] + chr(39) + 's calibration side'}"
    what = [f"{_text_label(d)}: {sampled if d == GENERATED else 'its calibration side'}" for d in texts]
    return f"{tokens} each row's recovery text ({'; '.join(what)})"


def _best_line(final: list[dict], dense: dict) -> list[str]:
    """Which final setting closes most of the out-of-domain gap (mean over its seeds), against the target, and
    which configurations were run at that budget."""
    gaps = _ood_gaps(final, dense)
    if not gaps:
        return []
    mean, key = max((statistics.fmean(g), key) for key, g in gaps.items())
    ci, _, data, schedule, lr, steps = key
    config, ood = list(DISTILL_CONFIGS)[ci], _corpora(final)[1]
    n = len(gaps[key])
    how = ", ".join([_text_label(data), *([schedule] if schedule != "constant" else []), f"lr {lr:g}", f"{steps} steps"])
    line = (f"Best out of domain: {DISTILL_CONFIGS[config]} ({how}), closing {mean:.1%} of the "
            f"{ood} perplexity gap to the dense model (mean of {n} seed{'s' if n > 1 else ''}). Target: at least "
            f"{DISTILL_TARGET:.0%} — {'met' if mean >= DISTILL_TARGET else 'not met'}.")
    run = [DISTILL_CONFIGS[c] for i, c in enumerate(DISTILL_CONFIGS) if any(k[0] == i and k[5] == steps for k in gaps)]
    if len(run) < len(DISTILL_CONFIGS):
        line += (f" At {steps} steps only {', '.join(run)} ran; the three recoveries at one budget are compared "
                 f"in the pilot below.")
    return [line, ""]


def distill_markdown(directory: Path, heading: str = "##") -> list[str]:
    """The comparison of recoveries at one budget (LoRA with the LM loss, LoRA with distillation, full
    fine-tuning with distillation; on a corpus or on teacher-generated text), from the records of
    ``benchmarks/recovery_distill.py``."""
    records = _distill_records(directory)
    final = [r for r in records if r["tag"] == "final"]
    pilot = [r for r in records if r["tag"] == "pilot"]
    if not records:
        return []
    r0 = (final or pilot)[0]
    ind, ood = _corpora(records)
    dense = _dense_of(final)
    ev = r0["report"]["ppl_before"]
    own = any(r["data"] == GENERATED for r in records)
    out = [f"{heading} Recovery at one budget: LoRA vs distillation, in domain and out of domain", "",
           f"The same pruned model (`{r0['prune_command']}`) for every row, trained for {_budget(final or pilot)}. "
           f"Scored on {ind}'s held-out side (in domain for the rows trained on {ind}) and on {ood}'s held-out side "
           f"(out of domain for every row), {ev['n_windows'] if ev else '?'} windows of "
           f"{ev['seq_len'] if ev else '?'} tokens each"
           + ("; rows trained on teacher-generated text are also scored on the held-out fifth of those samples "
              "(own held-out)" if own else "") + ". "
           "Distillation: forward KL(teacher || student) from the dense model at T = 1, no LM loss mixed in. Gap "
           "closed: (pruned - recovered) / (pruned - dense) perplexity; 1 = the dense model's perplexity, above 1 = "
           "below it (adaptation). Learning rates from the pilot below (chosen by the recovery text's own held-out "
           f"perplexity or {ind}'s, never by {ood}). Schedule: the learning rate after the warm-up, constant or a "
           "cosine decay to 0 at the last step. Cost: training seconds per step on one thread of "
           f"{r0['device_name']} with the 1-minute load average during the runs in brackets (a shared machine); "
           "GFLOP per step counted from the parameters (forward 2N per token, backward 2N, plus 2N for weight "
           f"gradients when every weight trains, plus the teacher's forward); GPU ms per step = those FLOPs at "
           f"{r0['gpu_estimate']['utilisation']:.0%} of an H100's {r0['gpu_estimate']['peak_flops'] / 1e12:.0f} "
           "bf16 TFLOP/s (a lower bound: steps this small are launch-bound on a GPU).", ""]
    header = ["recovery", "text", "schedule", "lr", "steps", "seeds", f"{ind} PPL pruned → recovered",
              f"{ood} PPL pruned → recovered", f"{ood} gap closed", f"{ind} gap closed",
              *(["own held-out PPL pruned → recovered"] if own else []),
              "CPU s/step (load)", "GFLOP/step", "GPU ms/step (est.)"]
    if final:
        rows = _distill_rows(final, dense)
        rows.insert(0, ["dense (the teacher)", "–", "–", "–", "–", "–", f"{dense.get(ind, math.nan):.2f}",
                        f"{dense.get(ood) or math.nan:.2f}", "–", "–", *(["–"] if own else []), "–", "–", "–"])
        out += [table(header, rows), ""]
        out += _best_line(final, dense)
    if pilot:
        ev = pilot[0]["report"]["ppl_before"]
        out += [f"Pilot ({_budget(pilot)}, {ev['n_windows'] if ev else '?'} evaluation windows; the learning rate of "
                f"each recovery above is the one with the lowest held-out perplexity here on its own recovery text "
                f"or {ind}, never {ood}):", "",
                table(header, _distill_rows(pilot, _dense_of(pilot))), ""]
    out += _sampling_cost(records)
    out += ["Records and exact commands: `benchmarks/results/recovery/distill/` "
            f"(e.g. `{r0['command']}`).", ""]
    return out


def _sampling_cost(records: list[dict]) -> list[str]:
    """What sampling the teacher's recovery text cost: the wall time before training of the runs that sampled
    it (the run's wall time less its report's total time, which starts after loading and sampling)."""
    sampled = [r for r in records if r["data"] == GENERATED and not r.get("generated_from") and r.get("wall_s")]
    if not sampled:
        return []
    parts = []
    for r in sampled:
        gen = (r["report"].get("data") or {}).get("generation") or {}
        parts.append(f"{r['name']}: {r['wall_s'] - r['report']['total_time_s']:.0f} s for {gen.get('samples', '?')} x "
                     f"{gen.get('length', '?')} tokens (load {r['loadavg']['mean']:.1f})")
    return [f"Sampling the teacher's text (one thread; the wall time before training, loading the models included; "
            f"runs with the same seed and settings reuse those samples, `generated_from` in their records): "
            f"{'; '.join(parts)}.", ""]


def _dense_of(records: list[dict]) -> dict:
    """The dense model's perplexity on every corpus scored (not on generated text, whose samples differ between
    settings), from the teachers of the distillation records (measured on the same windows as every record of
    the same run set)."""
    out: dict = {}
    for r in records:
        for text, (_, _, teacher) in _scored(r).items():
            if teacher is not None and text != GENERATED:
                out.setdefault(text, teacher)
    return out


def _ood_gaps(records: list[dict], dense: dict) -> dict:
    """Group key (see :func:`_distill_groups`) -> the out-of-domain gap closed of each of its records."""
    ood = _corpora(records)[1] if records else None
    out: dict = {}
    for key, rs in _distill_groups(records).items():
        gaps = _gaps(rs, ood, dense)
        if any(g is not None for g in gaps):
            out[key] = [g for g in gaps if g is not None]
    return out


def policy_markdown(readme: Path) -> list[str]:
    """The policy-gradient section: ``benchmarks/policy_quality.py --render``'s page, headings one level down."""
    if not Path(readme).is_file():
        return []
    lines = Path(readme).read_text().splitlines()
    out = []
    for line in lines:
        if line.startswith("Generated by"):
            line = ("From `benchmarks/results/policy/records.jsonl`, written and rendered by "
                    "`benchmarks/policy_quality.py`.")
        out.append("#" + line if line.startswith("#") else line)
    return out + [""]


#: sustained throughput assumed for the GPU time estimates of the compensation section (FLOPs / this)
GPU_TFLOPS = 100.0


def _rel(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def compensation_markdown(comp_dir: Path) -> list[str]:
    """The "Weight compensation" section from ``benchmarks/compensation.py``'s records
    (``<comp_dir>/<model-tag>/records.jsonl``): the choice of damping, token count and mode on the
    calibration side, the cells against one-shot Taylor without compensation, and the cost."""
    out = []
    for path in sorted(Path(comp_dir).glob("*/records.jsonl")):
        recs = read_records(path)
        if recs:
            out += _compensation_model(path.parent.name, recs)
    return out


def _calib(r: dict) -> str:
    """The corpus a record's compensation was fitted (tune: also scored and validated) on; pydoc for records
    made before the corpus was recorded."""
    return r.get("calib") or "pydoc"


def _comp_label(r: dict) -> str:
    """A cell's compensation setting: ``none``, or mode, fit corpus, damping and windows."""
    if r["mode"] == "none":
        return "none"
    return f"{r['mode']}, {_calib(r)} fit, d {r['damping']:g}, {r['examples']} x {r['seq_len']}"


def _method_label(r: dict) -> str:
    units = r.get("score_calib") or "pydoc"
    return r["method"] + ("" if units == "pydoc" else f" (units scored on {units})")


def _compensation_model(tag: str, recs: list[dict]) -> list[str]:
    denses = [r for r in recs if r["kind"] == "dense"]
    dense = next((r for r in denses if _calib(r) == "pydoc"), denses[0] if denses else None)
    tune = [r for r in recs if r["kind"] in ("tune", "tune-ref")]
    cells = [r for r in recs if r["kind"] == "cell"]
    loads = [r["host"]["load_avg"][0] for r in recs if (r.get("host") or {}).get("load_avg")]
    out = [f"## Weight compensation after structured pruning ({tag})", "",
           "From `benchmarks/results/compensation/" + tag + "/records.jsonl`, written by `benchmarks/compensation.py` "
           "(its docstring has the protocol). `none` = the units removed as chosen; `weights` = the kept o_proj/"
           "down_proj columns refitted by damped least squares on calibration activations, layer by layer through "
           "the already pruned layers; `bias` = FLAP's mean-activation bias; `weights+bias` = both fitted together "
           "(SPEC §11, `moreau_pruner.prune.compensate`). Units: `query-heads` granularity, local rule at the ratio "
           "that removes the given share of the decoder blocks' parameters in the given layers.",
           "", f"- Machine: {recs[-1].get('machine')}; {(recs[-1].get('host') or {}).get('cpu_model')} "
               f"({(recs[-1].get('host') or {}).get('cpu_count')} cores visible)"
           + (f"; 1-min load average while cells ran: {min(loads):.1f} to {max(loads):.1f}" if loads else "")
           + f"; torch {recs[-1].get('torch')}; commit(s) {', '.join(sorted({r.get('git_commit', '') for r in recs} - {''}))}.",
           ""]
    if dense:
        others = [r for r in denses if r is not dense and "calib-val" in r["ppl"]]
        out += ["Dense model: " + ", ".join(f"{k} {v:.2f}" + (f" ({_calib(dense)})" if k == "calib-val" else "")
                                             for k, v in dense["ppl"].items())
                + "".join(f", calib-val {r['ppl']['calib-val']:.2f} ({_calib(r)})" for r in others)
                + f" (PPL on the first {dense['windows']} 128-token windows of each held-out text; `calib-val` is the "
                "validation part of the calibration side of the corpus in parentheses, used only to choose the "
                "settings).", ""]
    for corpus in sorted({_calib(r) for r in tune}, key=lambda c: (c != "pydoc", c)):
        out += _compensation_tuning([r for r in tune if _calib(r) == corpus], corpus)
    if cells:
        out += _compensation_cells(cells)
    return out


def _compensation_tuning(recs: list[dict], corpus: str = "pydoc") -> list[str]:
    refs = defaultdict(list)  # examples -> the uncompensated model's PPL on those compensation windows
    for r in recs:
        if r["kind"] == "tune-ref":
            refs[r["examples"]].append(r["ppl"]["fit"])
    tune = [r for r in recs if r["kind"] == "tune"]
    if not tune:
        return []
    r0 = tune[0]
    tokens = sorted({(r["examples"], r["seq_len"], r["tokens"]) for r in tune if r["mode"] != "none"})
    settings = sorted({(r["mode"], r["damping"]) for r in tune if r["mode"] != "none"}, key=lambda m: (m[0], m[1]))
    by = defaultdict(list)
    for r in tune:
        by[(r["mode"], r["damping"], r["examples"] if r["mode"] != "none" else None)].append(r)

    def cell(recs):
        if not recs:
            return "–"
        val = statistics.fmean(r["ppl"]["calib-val"] for r in recs)
        fit = statistics.fmean(r["ppl"]["fit"] for r in recs)
        return f"{val:.2f} ({fit:.2f})" + (f" n={len(recs)}" if len(recs) > 1 else "")

    none = by.get(("none", None, None), [])
    if none and tokens and tokens[0][0] == 0:  # the scoring batch is a column: the none cell fits under it
        rows = [["none", "–", cell(none)] + [""] * (len(tokens) - 1)]
    elif none:  # validation PPL only, the same in every column
        rows = [["none", "–"] + [f"{statistics.fmean(r['ppl']['calib-val'] for r in none):.2f}"] * len(tokens)]
    else:
        rows = []
    if refs:
        rows.append(["none, on the compensation windows", "–"] + [
            f"({statistics.fmean(refs[e]):.2f})" if refs.get(e) else "–" for e, _, _ in tokens])
    for mode, damping in settings:
        rows.append([mode, f"{damping:g}"] + [cell(by.get((mode, damping, e), [])) for e, _, _ in tokens])
    scored = [(statistics.fmean(r["ppl"]["calib-val"] for r in v), k) for k, v in by.items() if k[0] != "none"]
    out = [f"### Choosing the damping, the token count and the mode (calibration side of `{corpus}` only)", "",
           f"Taylor units at {r0['size']:.0%} of the block parameters in layers {r0['layers']} (ratio {r0['ratio']:g}), "
           "scored on 10 x 64 tokens of the *fit* part of the calibration text (seed "
           f"{', '.join(str(s) for s in sorted({r['seed'] for r in tune}))}); compensated on windows of the fit part; "
           "each cell is the PPL on the *validation* part of the calibration text, with the PPL on the very windows "
           "the compensation fitted in parentheses (second row: the uncompensated model on those windows). The "
           "held-out evaluation texts are not read here. A fit that learned its tokens by heart shows a number in "
           "parentheses far below the uncompensated model's on the same windows, and a validation number above "
           "the uncompensated one.",
           "", table(["mode", "damping"] + [f"{t:,} tokens ({e or 10} x {s})" for e, s, t in tokens], rows), ""]
    if scored:
        best_val, (mode, damping, examples) = min(scored)
        ex = next(t for t in tokens if t[0] == examples)
        base = statistics.fmean(r["ppl"]["calib-val"] for r in none) if none else math.nan
        out += [f"Lowest validation PPL: `{mode}`, damping {damping:g}, {ex[2]:,} tokens ({best_val:.2f}"
                + (f", {_rel(best_val, base):+.1f} % against no compensation" if none else "") + ").", ""]
        cheap = min(((next(t for t in tokens if t[0] == e)[2], v, m, d) for v, (m, d, e) in scored
                     if v <= 1.01 * best_val), default=None)
        if cheap and cheap[0] < ex[2]:
            out += [f"Within 1 % of it with the fewest tokens (the rule for the cells, cheaper to fit): `{cheap[2]}`, "
                    f"damping {cheap[3]:g}, {cheap[0]:,} tokens ({cheap[1]:.2f}).", ""]
    return out


def _compensation_cells(cells: list[dict]) -> list[str]:
    texts = [t for t in ("pydoc", "fortunes") if any(t in r["ppl"] for r in cells)]
    out = []
    for size in sorted({r["size"] for r in cells}):
        recs = [r for r in cells if r["size"] == size]
        layers = sorted({r["layers"] for r in recs})
        by = defaultdict(dict)  # (method, mode, layers) -> {seed: record}
        for r in recs:
            by[(_method_label(r), _comp_label(r), r["layers"])][r["seed"]] = r
        settings = sorted({(m, mode) for m, mode, _ in by}, key=lambda k: (method_key(k[0]), k[1] != "none", k[1]))
        r0 = recs[0]
        out += [f"### {size:.0%} of the decoder blocks' parameters removed", "",
                "Parameters after pruning: " + "; ".join(
                    f"layers {lay}: {min(r['params_after'] for r in recs if r['layers'] == lay):,} "
                    f"(ratio {next(r['ratio'] for r in recs if r['layers'] == lay):g})" for lay in layers)
                + f", of {r0['params_before']:,}. PPL on the first {r0['windows']} held-out 128-token windows of each "
                "text, mean ± std over seeds. Units scored on pydoc's calibration side unless the method says "
                "otherwise; compensation: mode, the corpus whose calibration side it was fitted on, damping, "
                "windows x tokens (seed s).", ""]
        header = ["method", "compensation"] + [f"{t} {lay}" for lay in layers for t in texts]
        rows = []
        for m, mode in settings:
            row = [m, mode]
            for lay in layers:
                for t in texts:
                    row.append(fmt(*mean_std([r["ppl"].get(t) for r in by.get((m, mode, lay), {}).values()])))
            rows.append(row)
        out += [table(header, rows), ""]
        out += _compensation_target(by, settings, layers, texts)
    out += _compensation_cost(cells)
    return out


def _compensation_target(by, settings, layers, texts) -> list[str]:
    """Every setting against one-shot Taylor without compensation, same layers, paired by seed."""
    out = ["Against one-shot `taylor` without compensation on the same layers, paired by seed (relative PPL "
           "change; the target is at most −10 % in every seed on both texts):", ""]
    rows, verdicts = [], []
    for lay in layers:
        base = by.get(("taylor", "none", lay), {})
        best = None
        for m, mode in settings:
            if (m, mode) == ("taylor", "none"):
                continue
            cell = by.get((m, mode, lay), {})
            seeds = sorted(set(cell) & set(base))
            if not seeds:
                continue
            changes = {t: [_rel(cell[s]["ppl"][t], base[s]["ppl"][t]) for s in seeds] for t in texts}
            worst = max(max(v) for v in changes.values())
            mean = statistics.fmean(x for v in changes.values() for x in v)
            rows.append([lay, m, mode, str(len(seeds))] + [f"{statistics.fmean(v):+.1f} % (worst {max(v):+.1f} %)"
                                                           for v in changes.values()])
            if best is None or mean < best[0]:
                best = (mean, m, mode, worst, len(seeds))
        if best:
            mean, m, mode, worst, n = best
            met = worst <= -10.0 and n >= 3
            verdicts.append(f"layers {lay}: the best setting is `{m}` with `{mode}` ({mean:+.1f} % on average over "
                            f"{n} seed(s) and the texts, worst seed and text {worst:+.1f} %): the target is "
                            + ("**met**." if met else ("**not met**." if worst > -10.0 else
                                                         f"met in these {n} seed(s), fewer than the 3 asked.")))
    if rows:
        out += [table(["layers", "method", "compensation", "seeds"] + texts, rows), ""]
        out += [f"- {v}" for v in verdicts] + [""]
    return out


def _compensation_cost(cells: list[dict]) -> list[str]:
    rows = []
    groups = defaultdict(list)
    for r in cells:
        if r["compensation"]:
            groups[(_method_label(r), r["size"], r["layers"], _comp_label(r))].append(r)
    for (m, size, lay, mode), recs in sorted(groups.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1:])):
        comp_s = statistics.fmean(r["cost"]["compensate_s"] for r in recs)
        score_s = statistics.fmean(r["cost"]["score_s"] for r in recs)
        fc = statistics.fmean(r["flops"]["compensate"] for r in recs)
        fs = statistics.fmean(r["flops"]["scoring"] for r in recs)
        loads = [r["host"]["load_avg"][0] for r in recs if (r.get("host") or {}).get("load_avg")]
        rows.append([m, f"{size:.0%}", lay, mode, f"{comp_s:.0f}", f"{score_s:.0f}", f"{fc / 1e12:.2f}",
                     f"{fs / 1e12:.2f}" if fs else "–", f"{1e3 * fc / (GPU_TFLOPS * 1e12):.0f}",
                     f"{statistics.fmean(loads):.1f}" if loads else "?"])
    if not rows:
        return []
    return ["### Cost of the compensation", "",
            "Wall seconds on this CPU (one thread, `OMP_NUM_THREADS=1`, on a machine shared with other jobs: the "
            "1-min load average is in the last column) of the compensation and of the importance it follows (the "
            "scores are cached, so the scoring time is that of the run that computed them), and FLOPs: the "
            "compensation's two passes of every compensated layer over its tokens, its Gram matrices and solves; the "
            "importance's forward+backward passes over the 10 x 64 scoring tokens (Moreau: 10 of them; the policy "
            f"search's forwards are not counted). GPU estimate = compensation FLOPs / {GPU_TFLOPS:g} TFLOP/s "
            "sustained (a fraction of an H100/H200's dense peak; at SmolLM2's size a GPU is bound by launch latency "
            "instead, so read it as a lower bound). Loading the model took "
            f"{statistics.fmean(r['load_s'] for r in cells):.0f} s per run.", "",
            table(["method", "size", "layers", "mode", "compensation s", "importance s", "compensation TFLOP",
                   "importance TFLOP", "GPU estimate ms", "load"], rows), ""]


def render(in_dir: Path = DEFAULT_IN, out_md: Path = DEFAULT_OUT, plots: bool = True,
           recovery_dir: Path | None = None, compensation_dir: Path | None = None) -> str:
    in_dir, out_md = Path(in_dir), Path(out_md)
    recovery_dir = in_dir.parent / "recovery" if recovery_dir is None else Path(recovery_dir)
    compensation_dir = in_dir.parent / "compensation" if compensation_dir is None else Path(compensation_dir)
    reports = []
    for rec_file in sorted(in_dir.glob("*/records.jsonl")):
        records = read_records(rec_file)
        if not records:
            continue
        plan_file = rec_file.parent / "plan.json"
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        reports.append(ModelReport(rec_file.parent.name, records, plan))
    out = ["# Pruning quality and precision robustness", "",
           f"Generated by `{RENDER_CMD}` from `{in_dir.relative_to(ROOT.parent) if in_dir.is_relative_to(ROOT.parent) else in_dir}/*/records.jsonl`, "
           "which `benchmarks/quality.py` writes (BENCHMARKS.md §3). Do not edit by hand.", ""]
    if not reports:
        out.append("No records found.")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    for rep in reports:
        if plots:
            rep.plot(out_md.parent)
        out.append(rep.markdown(out_md.parent, plots))
    out += policy_markdown(in_dir.parent / "policy" / "README.md")
    out += compensation_markdown(compensation_dir)
    out += recovery_markdown(recovery_dir)
    out += distill_markdown(recovery_dir / "distill")
    text = "\n".join(out).rstrip() + "\n"
    out_md.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render QUALITY.md and PNG plots from benchmarks/quality.py records.")
    p.add_argument("--in", dest="in_dir", default=str(DEFAULT_IN), help="results root with <model-tag>/records.jsonl")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file (plots go next to it)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    render(Path(args.in_dir), Path(args.out), plots=not args.no_plots)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
