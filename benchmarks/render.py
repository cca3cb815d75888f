"""Render benchmarks/results/RESULTS.md and the PNG plots from the JSON results (never by hand).

    python benchmarks/render.py                         # every benchmarks/results/<device>/
    python benchmarks/render.py --results DIR --out DIR/RESULTS.md

Reads ``<results>/<device>/ops.json`` and ``<results>/<device>/estimate.json``; writes the
markdown file and ``<results>/<device>/ops_gbps.png`` / ``estimate.png``. Each table says which
device, date, commit and machine load it comes from.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PROVIDER_ORDER = ["reference", "reference-philox", "compile", "cpu", "cuda", "triton"]
OP_TITLES = {
    "perturb": "perturb (w, δ → w̃, noise regenerated)",
    "prox": "prox update, accumulate off",
    "prox_acc": "prox update, accumulate on",
    "saliency": "channel saliency (W, Ĝ → row and column sums)",
    "perturb_multi": "perturb, multi-tensor (whole parameter list)",
    "prox_multi": "prox update, multi-tensor, accumulate off",
    "prox_multi_acc": "prox update, multi-tensor, accumulate on",
}
FUSED = ("cpu", "cuda", "triton")
COLORS = {"reference": "tab:blue", "reference-philox": "tab:gray", "compile": "tab:orange", "cpu": "tab:green",
          "cuda": "tab:red", "triton": "tab:purple"}


def _order(p: str) -> int:
    return PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1000 or abs(v) < 0.01):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - len(str(int(abs(v)))), 0) + 0}f}" \
            if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _shape_key(s) -> tuple:
    if isinstance(s, str):
        parts = s.split("x")
        try:
            return (0, [-int(p) for p in parts])
        except ValueError:
            return (1, s)
    return (0, s)


def _span(records: list[dict], field: str) -> str:
    vals = sorted({str(r.get(field)) for r in records if r.get(field) is not None})
    return ", ".join(vals) if vals else "?"


def _load_range(records: list[dict]) -> str:
    la = [r["loadavg"][0] for r in records if r.get("loadavg")]
    return f"{min(la):.2f}–{max(la):.2f}" if la else "?"


def _provenance(doc: dict) -> str:
    recs = doc.get("records", [])
    la = [r["loadavg"][0] for r in recs if r.get("loadavg")]
    threads = max([r.get("threads") or 0 for r in recs] or [0])
    warn = (f" **Warning: the load average exceeded the {threads} threads used: other jobs shared the cores, so "
            "these timings (and the copy bandwidth) are noisy.**") if la and threads and max(la) > threads else ""
    return warn.strip() + "\n\n" + (f"device **{doc.get('device_name', '?')}** (`{doc.get('device_slug', '?')}`), "
            f"date {doc.get('date', '?')}, commit `{doc.get('commit', '?')}`, torch {doc.get('torch', '?')}, "
            f"triton {doc.get('triton', '?')}, 1-min load average during the run {_load_range(recs)}, "
            f"command `{' '.join(['python', 'benchmarks/bench_' + doc.get('kind', '?') + '.py'] + doc.get('argv', []))}`")


# ============================================================================ per-op tables
def ops_index(doc: dict):
    """{(op, shape, dtype): {provider: {metric: value}}} and errors."""
    idx: dict = defaultdict(lambda: defaultdict(dict))
    for r in doc["records"]:
        if r["op"] == "copy":
            continue
        shape = r["shape"] if isinstance(r["shape"], str) else "x".join(map(str, r["shape"]))
        idx[(r["op"], shape, r["dtype"])][r["provider"]][r["metric"]] = r["value"] if r["metric"] != "error" \
            else r.get("message", "error")
    return idx


def render_ops(doc: dict) -> list[str]:
    lines = ["### Per-op kernels", "", _provenance(doc), ""]
    bw = doc.get("copy_bandwidth", {})
    if bw:
        lines += [f"Copy bandwidth measured in this run: `clone()` {bw['clone']['bytes_per_s'] / 1e9:.1f} GB/s, "
                  f"`copy_` into a preallocated tensor {bw['copy_']['bytes_per_s'] / 1e9:.1f} GB/s; "
                  f"**{bw['best'] / 1e9:.1f} GB/s** (the larger) is the 100 % of the '% copy' column.", ""]
    avail = doc.get("backends", {})
    if avail:
        lines.append("Backends on this machine: " + "; ".join(
            f"`{k}` {'available' if not v else 'not available (' + v[0][:90] + ')'}" for k, v in avail.items()))
        lines.append("")
    lines += ["Columns: median time with the 0.2–0.8 quantiles; GB/s over the minimum bytes the op must move "
              "(perturb: read w, δ, write w̃; prox: read g, δ, write δ, + acc read/write; saliency: read W, Ĝ); "
              "% of the copy bandwidth; speedup over `reference` (pure PyTorch, the published math) and over "
              "`compile` (torch.compile of it).", ""]
    idx = ops_index(doc)
    ops = sorted({k[0] for k in idx}, key=lambda o: list(OP_TITLES).index(o) if o in OP_TITLES else 99)
    for op in ops:
        lines += [f"#### {OP_TITLES.get(op, op)}", "",
                  "| shape | dtype | provider | time ms (q20–q80) | GB/s | % copy | × reference | × compile |",
                  "|---|---|---|---|---|---|---|---|"]
        keys = sorted([k for k in idx if k[0] == op], key=lambda k: (_shape_key(k[1]), k[2]))
        for k in keys:
            for p in sorted(idx[k], key=_order):
                m = idx[k][p]
                if "error" in m:
                    lines.append(f"| {k[1]} | {k[2]} | {p} | FAILED: {str(m['error'])[:120]} | | | | |")
                    continue
                t = f"{_fmt(m.get('time'))} ({_fmt(m.get('time_q20'))}–{_fmt(m.get('time_q80'))})"
                pct = m.get("copy_fraction")
                lines.append(f"| {k[1]} | {k[2]} | {'**' + p + '**' if p in FUSED else p} | {t} | "
                             f"{_fmt(m.get('gbps'))} | {_fmt(100 * pct if pct is not None else None)} | "
                             f"{_fmt(m.get('speedup_vs_reference'))} | {_fmt(m.get('speedup_vs_compile'))} |")
        lines.append("")
    if doc.get("notes"):
        lines += ["Notes from the run:", ""] + [f"- {n}" for n in doc["notes"][:20]] + [""]
    return lines


def plot_ops(doc: dict, out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # plots are optional (e.g. a GPU machine without it): the tables stay
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = ops_index(doc)
    ops = [o for o in OP_TITLES if any(k[0] == o for k in idx)]
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.2 * len(ops)), squeeze=False)
    bw = doc.get("copy_bandwidth", {}).get("best")
    for ax, op in zip(axes[:, 0], ops):
        keys = sorted([k for k in idx if k[0] == op], key=lambda k: (_shape_key(k[1]), k[2]))
        provs = sorted({p for k in keys for p in idx[k] if "gbps" in idx[k][p]}, key=_order)
        width = 0.8 / max(len(provs), 1)
        for j, p in enumerate(provs):
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(keys))]
            ys = [idx[k].get(p, {}).get("gbps", float("nan")) for k in keys]
            ax.bar(xs, ys, width, label=p, color=COLORS.get(p))
        if bw:
            ax.axhline(bw / 1e9, color="k", ls="--", lw=1, label="copy bandwidth")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k[1]}\n{k[2]}" for k in keys], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (min bytes)")
        ax.set_title(OP_TITLES[op], fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"{doc.get('device_name')}  commit {doc.get('commit')}  {doc.get('date')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ============================================================================ end to end
def est_index(doc: dict):
    idx: dict = defaultdict(dict)
    meta: dict = {}
    for r in doc["records"]:
        if r["op"] != "estimate":
            continue
        k = (r["shape"], r["dtype"], r.get("tokens"), r["provider"])
        idx[k][r["metric"]] = r["value"] if r["metric"] != "error" else r.get("message", "error")
        meta.setdefault(k, r)
        meta.setdefault("_all", {}).setdefault(k, []).append(r)  # every record of k (render_tracked)
    return idx, meta


def render_estimate(doc: dict) -> list[str]:
    lines = ["### End-to-end Moreau estimate", "", _provenance(doc), "",
             "`pure` = the published loop (pure-PyTorch reference backend, noise from the CPU torch generator); "
             "`fused` = the `reference` strategy of `moreau_pruner.estimate.estimate` on the auto-selected backend "
             "with Philox noise; `lean` = the `lean` strategy; `regen` = the `regen` strategy (lean without "
             "perturbed copies of the linear weights). fwd+bwd = plain forward+backward on the same batch in the same process; "
             "overhead = median step − fwd+bwd; floor = minimum elementwise bytes per step ÷ copy bandwidth; "
             "peak = peak memory during the estimate (CPU: peak RSS of a fresh process, reset after loading the "
             "model; GPU: max_memory_allocated).", ""]
    bw = doc.get("copy_bandwidth", {})
    if bw:
        lines += [f"Copy bandwidth in this run: {bw['best'] / 1e9:.1f} GB/s.", ""]
    idx, meta = est_index(doc)
    lines += ["| model | tokens | path | backend | fwd+bwd ms | step ms | overhead ms | overhead % | estimate s "
              "(T) | peak MiB | peak vs pure | step vs pure | floor ms | overhead ÷ floor |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(idx, key=lambda k: (k[0], k[1], k[2] or 0, _path_order(k[3]))):
        m, r = idx[k], meta[k]
        if "fwd_bwd" not in m and "error" not in m:  # measured for memory only
            continue
        if "error" in m:
            lines.append(f"| {k[0]} {k[1]} | {k[2]} | {k[3]} | FAILED: {str(m['error'])[:150]} |||||||||||")
            continue
        lines.append(
            f"| {k[0]} {k[1]} | {k[2]} | {k[3]} | {r.get('backend', '?')} | {_fmt(m.get('fwd_bwd'))} | "
            f"{_fmt(m.get('step'))} | {_fmt(m.get('overhead'))} | {_fmt(m.get('overhead_pct'))} | "
            f"{_fmt(m.get('estimate'))} ({r.get('iters')}) | {_fmt(m.get('peak_mem'))} | "
            f"{_fmt(m.get('peak_mem_vs_pure'))} | {_fmt(m.get('step_vs_pure'))} | {_fmt(m.get('elementwise_floor'))} | "
            f"{_fmt(m.get('overhead_over_floor'))} |")
    lines.append("")
    lines += render_tracked(idx, meta)
    if doc.get("notes"):
        lines += ["Notes from the run:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return lines


PATH_ORDER = ("published", "pure", "fused", "lean", "regen")


def _path_order(p: str) -> int:
    return PATH_ORDER.index(p) if p in PATH_ORDER else 9


def render_tracked(idx: dict, meta: dict) -> list[str]:
    """Tracked live-tensor peaks next to RSS and the memory plan."""
    keys = [k for k in idx if "tracked_peak" in idx[k]]
    if not keys:
        return []
    lines = ["#### Live tensor memory (tracked) vs RSS and the plan", "",
             "tracked = peak live tensor bytes under `moreau_pruner.estimate.memtrack.LiveTensorTracker` (weights "
             "included, each storage once, sampled at op boundaries) over a short estimate; fwd+bwd = the same for "
             "a plain forward+backward; floor = that fwd+bwd peak + δ + acc (weights, activations, estimator "
             "state: what any path must hold); RSS = the process peak RSS of the timed run; plan = "
             "`moreau_pruner.estimate.memory.plan_memory` for the same configuration (upper bound; lower bound in "
             "brackets).", "",
             "| model | tokens | path | RSS peak MiB | tracked MiB | tracked ÷ floor | floor MiB | fwd+bwd MiB | "
             "tracked vs pure | plan MiB (lower) | plan ÷ tracked | at the peak (largest, MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(keys, key=lambda k: (k[0], k[1], k[2] or 0, _path_order(k[3]))):
        m = idx[k]
        rec = next((r for r in meta.get("_all", {}).get(k, []) if r["metric"] == "tracked_peak"), None)
        top = ""
        if rec is not None:
            bd = rec.get("breakdown_mib", {})
            top = ", ".join(f"{name} {v:.0f}" for name, v in list(bd.items())[:4]) + f" (after {rec.get('peak_op')})"
        lines.append(f"| {k[0]} {k[1]} | {k[2]} | {k[3]} | {_fmt(m.get('peak_mem'))} | {_fmt(m.get('tracked_peak'))} | "
                     f"{_fmt(m.get('tracked_vs_floor'))} | {_fmt(m.get('tracked_floor'))} | "
                     f"{_fmt(m.get('tracked_fwd_bwd_peak'))} | {_fmt(m.get('tracked_vs_pure'))} | "
                     f"{_fmt(m.get('plan_total'))} ({_fmt(m.get('plan_lower'))}) | {_fmt(m.get('plan_vs_tracked'))} | "
                     f"{top} |")
    return lines + [""]


def plot_estimate(doc: dict, out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # plots are optional (e.g. a GPU machine without it): the tables stay
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx, _ = est_index(doc)
    keys = sorted([k for k in idx if "fwd_bwd" in idx[k]], key=lambda k: (k[0], k[2] or 0, k[3]))
    if not keys:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(keys) + 2))
    labels = [f"{k[0]} {k[1]} {k[2]}tok {k[3]}" for k in keys]
    fb = [idx[k]["fwd_bwd"] for k in keys]
    ov = [max(idx[k]["overhead"], 0) for k in keys]
    ys = range(len(keys))
    ax1.barh(ys, fb, label="fwd+bwd")
    ax1.barh(ys, ov, left=fb, label="Moreau overhead")
    for y, k in zip(ys, keys):
        ax1.text(fb[y] + ov[y], y, f" {idx[k]['overhead_pct']:.0f}%", va="center", fontsize=7)
    ax1.set_yticks(list(ys))
    ax1.set_yticklabels(labels, fontsize=7)
    ax1.set_xscale("log")
    ax1.set_xlabel("ms per step")
    ax1.legend(fontsize=7)
    ax1.set_title("step = fwd+bwd + overhead", fontsize=9)
    ax2.barh(ys, [idx[k].get("peak_mem", 0) for k in keys], color="tab:green")
    ax2.set_yticks(list(ys))
    ax2.set_yticklabels([])
    ax2.set_xlabel("peak memory during the estimate, MiB")
    fig.suptitle(f"{doc.get('device_name')}  commit {doc.get('commit')}  {doc.get('date')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ============================================================================ goals
def _op_value(doc, op, shape, dtype, provider, metric):
    if not doc:
        return None
    for r in doc["records"]:
        if (r["op"], r["provider"], r["dtype"], r["metric"]) == (op, provider, dtype, metric) and \
                (r["shape"] if isinstance(r["shape"], str) else "x".join(map(str, r["shape"]))) == shape:
            return r["value"]
    return None


def goals(device: str, ops: dict | None, est: dict | None) -> list[tuple[str, str, str]]:
    """(goal, measured, status) rows for this device."""
    rows = []

    def status(v, ok):
        return "not measured" if v is None else ("**met**" if ok(v) else "**not met**")

    if device.startswith("cpu"):
        for op in ("prox", "prox_acc"):
            tag = "accumulate off" if op == "prox" else "accumulate on"
            v = _op_value(ops, op, "4096x4096", "fp32", "cpu", "speedup_vs_reference")
            rows.append((f"CPU C++ prox update ≥ 5× reference (4096×4096 fp32, {tag})",
                         f"{v:.2f}×" if v is not None else "–", status(v, lambda x: x >= 5)))
            v = _op_value(ops, op, "4096x4096", "fp32", "cpu", "speedup_vs_compile")
            rows.append((f"CPU C++ prox update ≥ 2× torch.compile (4096×4096 fp32, {tag})",
                         f"{v:.2f}×" if v is not None else "–", status(v, lambda x: x >= 2)))
    if est:
        idx, meta = est_index(est)
        smol = [k for k in idx if k[0] == "smollm2-135m" and k[2] == 640 and k[3] in ("fused", "lean")]
        for k in sorted(smol, key=lambda k: k[3]):
            v = idx[k].get("overhead_pct")
            if device.startswith("cpu"):
                rows.append((f"CPU Moreau overhead ≤ 10 % of fwd+bwd (SmolLM2, 10×64 tokens, {k[3]} path, "
                             f"{meta[k].get('backend')} backend)", f"{v:.1f} %" if v is not None else "–",
                             "inconclusive (negative: timing noise)" if v is not None and v < 0
                             else status(v, lambda x: x <= 10)))
        for k in sorted(idx, key=lambda k: (k[0], k[2] or 0, k[3])):
            if k[3] in ("fused", "lean") and "peak_mem_vs_pure" in idx[k]:
                v = idx[k]["peak_mem_vs_pure"]
                rows.append((f"peak memory ≤ 50 % of the pure path ({k[0]}, {k[2]} tokens, {k[3]})",
                             f"{100 * v:.0f} %", status(v, lambda x: x <= 0.5)))
        for k in sorted(idx, key=lambda k: (k[0], k[2] or 0, _path_order(k[3]))):
            if "tracked_vs_floor" in idx[k]:
                v = idx[k]["tracked_vs_floor"]
                rows.append((f"tracked peak ≤ 1.1 × floor ({k[0]} {k[1]}, {k[2]} tokens, {k[3]}; floor "
                             f"{idx[k]['tracked_floor']:.0f} MiB)", f"{idx[k]['tracked_peak']:.0f} MiB = {v:.2f}×",
                             status(v, lambda x: x <= 1.1)))
        if not device.startswith("cpu"):
            for k in sorted(idx, key=lambda k: (k[0], k[2] or 0, k[3])):
                if k[3] in ("fused", "lean") and "overhead_over_floor" in idx[k]:
                    v = idx[k]["overhead_over_floor"]
                    rows.append((f"GPU elementwise work ≤ 1.2× its floor ({k[0]}, {k[2]} tokens, {k[3]})",
                                 f"{v:.2f}×", status(v, lambda x: x <= 1.2)))
            full7b = [k for k in idx if k[0].startswith("llama7b-32L") and "fwd_bwd" in idx[k]]
            tried7b = [k for k in idx if k[0].startswith("llama7b")]
            if tried7b:
                ok = sorted({k[3] for k in full7b})
                rows.append(("a 7B-shaped estimate (32 layers, full vocab) fits one 80 GB GPU",
                             f"ran: {', '.join(ok) or 'none'}", "**met**" if ok else "**not met**"))
    return rows


# ============================================================================ main
def render_plans(doc: dict) -> list[str]:
    """The 7B / 70B plans of ``python -m moreau_pruner.estimate.plans`` and the meta-device tracked steps."""
    gib = 2 ** 30
    lines = ["### Memory plans for the sizes people prune (`python -m moreau_pruner.estimate.plans`)", "",
             f"Per GPU, {doc['tokens']} calibration tokens, {doc['dtype']} weights, fp32 δ and acc; budget "
             f"{doc['budget_gib']:g} GiB per 80 GB GPU including a 1.5 GiB CUDA reserve. Shapes only (planned, "
             "not measured on a GPU); the first configuration that fits, in order of cost, is advised.", "",
             "| model | GPUs | configuration | per-GPU GiB | fits | host GiB per node |", "|---|---|---|---|---|---|"]
    for sc in doc["scenarios"]:
        for p in sc["plans"]:
            chosen = " **(advised)**" if p["label"] == sc.get("chosen") else ""
            host = f"{p['host_per_node_bytes'] / gib:.0f}" if p["host_items"] else "–"
            lines.append(f"| {sc['shape']} | {sc['gpus']} | {p['label']}{chosen} | {p['total_bytes'] / gib:.2f} | "
                         f"{'yes' if p['fits'] else 'no'} | {host} |")
    lines.append("")
    tracked = [(sc["shape"], k, v) for sc in doc["scenarios"] for k, v in sc.get("tracked", {}).items()]
    if tracked:
        lines += ["One estimate step of the single-GPU paths run on the `meta` device under the live-tensor tracker "
                  "(exact shapes and dtypes, no arithmetic) against the plan without its CUDA reserve:", "",
                  "| model | configuration | tracked peak GB (GiB) | plan GiB | plan ÷ tracked | peak after |",
                  "|---|---|---|---|---|---|"]
        for shape, label, v in tracked:
            lines.append(f"| {shape} | {label} | {v['tracked_peak_bytes'] / 1e9:.2f} "
                         f"({v['tracked_peak_bytes'] / gib:.2f}) | {v['plan_bytes_without_reserve'] / gib:.2f} | "
                         f"{v['plan_over_tracked']:.3f} | {v['peak_op']} |")
        lines.append("")
    return lines


def render_fsdp_rank(doc: dict) -> list[str]:
    """Per-rank tracked peak of the scaled-down FSDP2 step against the rank plan."""
    recs = doc["records"]
    ranks = [r for r in recs if r["metric"] == "tracked_peak"]
    plan = next((r for r in recs if r["metric"] == "plan_without_reserve"), None)
    ratio = next((r for r in recs if r["metric"] == "plan_over_tracked"), None)
    if not ranks or plan is None:
        return []
    sh = doc.get("shape", {})
    lines = ["### FSDP2 per-rank memory, scaled-down LLaMA-3-70B shape (`benchmarks/fsdp_rank_memory.py`)", "",
             f"{doc.get('ranks')} ranks (gloo, CPU), fp32, hidden {sh.get('hidden_size')}, intermediate "
             f"{sh.get('intermediate_size')}, {sh.get('num_hidden_layers')} layers, vocab {sh.get('vocab_size')}, "
             f"{doc.get('rows')}×{doc.get('seq')} tokens split across ranks; real `fully_shard` per layer and root, "
             "estimator state on local shards, prox in post-accumulate-grad hooks; the forward runs on the clean "
             f"weights (a memory measurement). Date {doc.get('date')}, commit `{doc.get('commit')}`, torch "
             f"{doc.get('torch')}; command `python benchmarks/fsdp_rank_memory.py {' '.join(doc.get('argv', []))}`.", "",
             "| rank | rows | tracked peak MiB | plan MiB (no CUDA reserve) | plan ÷ tracked | peak after |",
             "|---|---|---|---|---|---|"]
    for r in ranks:
        lines.append(f"| {r['rank']} | {r['rows']} | {r['value']:.1f} | {plan['value']:.1f} | "
                     f"{plan['value'] / r['value']:.3f} | {r.get('peak_op')} |")
    if ratio is not None:
        lines += ["", f"Plan ÷ largest rank peak: {ratio['value']:.3f} (target: within 10 %)."]
    return lines + [""]


def render(results: Path, out: Path) -> Path:
    results = Path(results)
    devices = sorted(d for d in results.iterdir() if d.is_dir() and d.name != "quality"
                     and ((d / "ops.json").exists() or (d / "estimate.json").exists())) if results.exists() else []
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/render.py` from the JSON files under `benchmarks/results/<device>/` "
             "(written by `benchmarks/bench_ops.py` and `benchmarks/bench_estimate.py`). Do not edit by hand; "
             "see `benchmarks/README.md` for what each number means.", ""]
    if not devices:
        lines += ["No results yet.", ""]
    for d in devices:
        ops = C.read_results(d / "ops.json") if (d / "ops.json").exists() else None
        est = C.read_results(d / "estimate.json") if (d / "estimate.json").exists() else None
        name = (ops or est).get("device_name", d.name)
        lines += [f"## {name} (`{d.name}`)", ""]
        g = goals(d.name, ops, est)
        if g:
            lines += ["### Goals (BENCHMARKS.md §2, issues 4 and 5)", "", "| goal | measured | status |", "|---|---|---|"]
            lines += [f"| {a} | {b} | {c} |" for a, b, c in g]
            lines.append("")
        if ops:
            lines += render_ops(ops)
            png = plot_ops(ops, d / "ops_gbps.png")
            if png:
                lines += [f"![GB/s per op and provider]({png.relative_to(out.parent).as_posix()})", ""]
        if est:
            lines += render_estimate(est)
            png = plot_estimate(est, d / "estimate.png")
            if png:
                lines += [f"![fwd+bwd and overhead per step]({png.relative_to(out.parent).as_posix()})", ""]
        if (d / "plans.json").exists():
            lines += render_plans(C.read_results(d / "plans.json"))
        if (d / "fsdp_rank_memory.json").exists():
            lines += render_fsdp_rank(C.read_results(d / "fsdp_rank_memory.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(C.RESULTS), help="folder holding <device>/ops.json, estimate.json")
    ap.add_argument("--out", help="markdown output (default <results>/RESULTS.md)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.results) / "RESULTS.md"
    path = render(Path(args.results), out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
