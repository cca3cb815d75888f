"""Compare end-to-end estimate runs of two commits measured in one session (before vs after a change).

    python benchmarks/compare_estimate.py --old runs/old-1.json runs/old-2.json \\
        --new runs/new-1.json runs/new-2.json --previous estimate-before.json --out compare.md

Each input is an ``estimate.json`` written by ``bench_estimate.py``. Per path it lists the Moreau
overhead (step − fwd+bwd) of each side as the median over its runs with the range of the runs, the
same as % of fwd+bwd, and the tracked live-tensor peak. Timings get a verdict against the noise of
the session (the larger run-to-run range of the two sides, or the variation of fwd+bwd itself, the
same work every time: its range over every run and path of the session, when that is larger); tracked peaks are deterministic, so the new one must be equal or lower, and a higher
one is flagged. ``--previous`` adds the figures of an earlier published ``estimate.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PATH_ORDER = ("published", "pure", "fused", "lean", "regen")
TIMING = ("fwd_bwd", "fwd_bwd_q20", "fwd_bwd_q80", "step", "overhead", "overhead_pct", "peak_mem")
MEMORY = ("tracked_peak", "tracked_fwd_bwd_peak", "tracked_floor")


def path_values(doc: dict, shape: str) -> dict:
    """{path: {metric: value}} of one run, for one model shape."""
    out: dict = {}
    for r in doc["records"]:
        if r["op"] == "estimate" and r["shape"] == shape and r["metric"] in TIMING + MEMORY:
            out.setdefault(r["provider"], {})[r["metric"]] = r["value"]
    return out


def run_load(doc: dict, shape: str) -> tuple[float, float]:
    """(min, max) of the 1-minute load average stamped on the run's records of ``shape``."""
    la = [r["loadavg"][0] for r in doc["records"] if r["op"] == "estimate" and r["shape"] == shape
          and r.get("loadavg")]
    return (min(la), max(la)) if la else (float("nan"), float("nan"))


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def _cell(values: list[float], digits: int = 0) -> str:
    if not values:
        return "–"
    med, lo, hi = spread(values)
    return f"{med:.{digits}f}" if len(values) == 1 else f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def timing_verdict(old: list[float], new: list[float], jitter: float) -> tuple[float, float, str]:
    """(new − old medians, noise band, verdict). The band is the larger run-to-run range of the two
    sides, or ``jitter`` (the within-run spread) when that is larger."""
    delta = statistics.median(new) - statistics.median(old)
    band = max(max(old) - min(old), max(new) - min(new), jitter)
    if abs(delta) <= band:
        return delta, band, "within noise"
    return delta, band, "faster" if delta < 0 else "**slower**"


def memory_verdict(old: list[float], new: list[float]) -> tuple[float, str]:
    """(new − old in MiB, verdict) of a deterministic peak (every run of a side must agree)."""
    if len(set(old)) > 1 or len(set(new)) > 1:
        return max(new) - min(old), "**runs disagree** (not deterministic)"
    delta = new[0] - old[0]
    if delta == 0:
        return 0.0, "equal"
    return delta, "lower" if delta < 0 else "**higher**"


def compare(old_docs: list[dict], new_docs: list[dict], previous: dict | None = None,
            shape: str = "smollm2-135m", names: tuple[list[str], list[str]] | None = None) -> list[str]:
    """Markdown lines comparing the old and new runs (and the previous published figures)."""
    old_v = [path_values(d, shape) for d in old_docs]
    new_v = [path_values(d, shape) for d in new_docs]
    prev_v = path_values(previous, shape) if previous else {}
    paths = sorted({p for v in old_v + new_v for p in v}, key=lambda p: PATH_ORDER.index(p)
                   if p in PATH_ORDER else 9)
    names = names or ([f"old-{i + 1}" for i in range(len(old_docs))], [f"new-{i + 1}" for i in range(len(new_docs))])
    runs = sorted([(d.get("date", "?"), n, d) for n, d in zip(names[0] + names[1], old_docs + new_docs)],
                  key=lambda t: t[0])
    lines = [f"## {shape}: old vs new, one session", "",
             "| run | date | commit | threads | 1-min load (records) | command |", "|---|---|---|---|---|---|"]
    for date, name, d in runs:
        lo, hi = run_load(d, shape)
        threads = max([r.get("threads") or 0 for r in d["records"]] or [0])
        lines.append(f"| {name} | {date} | `{d.get('commit', '?')}` | {threads} | {lo:.2f}–{hi:.2f} | "
                     f"`python benchmarks/bench_estimate.py {' '.join(d.get('argv', []))}` |")
    lines += ["", "### Moreau overhead per step (median over the runs, range of the runs in brackets)", "",
              "Noise band = the larger of: the run-to-run range of the overhead on either side, the fwd+bwd "
              "q20–q80 width of one run, and the range of the fwd+bwd medians over every run and path of the "
              "session (the same work each time, so its spread is the load's effect); a difference within it is "
              "noise.", "",
              "| path | fwd+bwd ms old | fwd+bwd ms new | overhead ms old | overhead ms new | Δ ms | noise band ms | "
              "verdict | overhead % old | overhead % new | Δ % | verdict (%) | previous published |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    all_fb = [v[p]["fwd_bwd"] for v in old_v + new_v for p in v if "fwd_bwd" in v[p]]
    session_fb = max(all_fb) - min(all_fb) if all_fb else 0.0
    for p in paths:
        get = lambda vs, m: [v[p][m] for v in vs if p in v and m in v[p]]  # noqa: E731
        o, n = get(old_v, "overhead"), get(new_v, "overhead")
        if not o or not n:
            lines.append(f"| {p} | – | – | {_cell(o)} | {_cell(n)} | – | – | not measured on both sides | | | | | |")
            continue
        jitter = max(max(q80 - q20 for q20, q80 in zip(get(old_v + new_v, "fwd_bwd_q20"),
                                                        get(old_v + new_v, "fwd_bwd_q80"))), session_fb)
        d_ms, band, v_ms = timing_verdict(o, n, jitter)
        op, np_ = get(old_v, "overhead_pct"), get(new_v, "overhead_pct")
        fb = statistics.median(get(old_v + new_v, "fwd_bwd"))
        d_pct, band_pct, v_pct = timing_verdict(op, np_, 100 * jitter / fb)
        verdicts[p] = (v_ms, v_pct)
        prev = prev_v.get(p, {})
        prev_txt = (f"{prev['overhead']:.0f} ms = {prev['overhead_pct']:.1f} %" if "overhead" in prev else "–")
        lines.append(f"| {p} | {_cell(get(old_v, 'fwd_bwd'))} | {_cell(get(new_v, 'fwd_bwd'))} | {_cell(o)} | "
                     f"{_cell(n)} | {d_ms:+.0f} | {band:.0f} | {v_ms} | {_cell(op, 1)} | {_cell(np_, 1)} | "
                     f"{d_pct:+.1f} (band {band_pct:.1f}) | {v_pct} | {prev_txt} |")
    lines += ["", "### Tracked live-tensor peak (deterministic: new must be equal or lower)", "",
              "| path | tracked MiB old | tracked MiB new | Δ bytes | verdict | fwd+bwd tracked MiB old / new | "
              "floor MiB old / new | RSS peak MiB old / new (noisy) | previous published tracked MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        get = lambda vs, m: [v[p][m] for v in vs if p in v and m in v[p]]  # noqa: E731
        o, n = get(old_v, "tracked_peak"), get(new_v, "tracked_peak")
        if not o or not n:
            lines.append(f"| {p} | {_cell(o, 1)} | {_cell(n, 1)} | – | not measured on both sides | | | | |")
            continue
        d, v = memory_verdict(o, n)
        verdicts.setdefault(p, ("–", "–"))
        verdicts[p] += (v,)
        prev = prev_v.get(p, {}).get("tracked_peak")
        lines.append(f"| {p} | {_cell(o, 1)} | {_cell(n, 1)} | {d * 2**20:+,.0f} | {v} | "
                     f"{_cell(get(old_v, 'tracked_fwd_bwd_peak'), 1)} / {_cell(get(new_v, 'tracked_fwd_bwd_peak'), 1)} | "
                     f"{_cell(get(old_v, 'tracked_floor'), 1)} / {_cell(get(new_v, 'tracked_floor'), 1)} | "
                     f"{_cell(get(old_v, 'peak_mem'))} / {_cell(get(new_v, 'peak_mem'))} | "
                     f"{'–' if prev is None else f'{prev:.1f}'} |")
    slower = [p for p, v in verdicts.items() if "**slower**" in v[:2]]
    higher = [p for p, v in verdicts.items() if len(v) > 2 and v[2] not in ("equal", "lower")]
    lines += ["", "**Summary:** overhead " + ("within noise or better on every path" if not slower else
                                               f"slower beyond noise on {', '.join(slower)}")
              + "; tracked peak " + ("equal or lower on every path" if not higher else
                                     f"higher or unstable on {', '.join(higher)}") + ".", ""]
    if previous:
        lines += [f"Previous published figures: `estimate.json` of commit `{previous.get('commit', '?')}` "
                  f"({previous.get('date', '?')}; its notes: {'; '.join(previous.get('notes', [])) or 'none'}).", ""]
    return lines


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", nargs="+", required=True, help="estimate.json files of the commit before the change")
    ap.add_argument("--new", nargs="+", required=True, help="estimate.json files of the commit after it")
    ap.add_argument("--previous", help="an earlier published estimate.json, shown beside")
    ap.add_argument("--shape", default="smollm2-135m", help="the model label to compare (default smollm2-135m)")
    ap.add_argument("--title", default="Estimate: before vs after", help="the markdown title")
    ap.add_argument("--preamble", help="a markdown file whose text goes under the title (how the runs were made)")
    ap.add_argument("--out", required=True, help="markdown output")
    args = ap.parse_args(argv)
    files = args.old + args.new + ([args.previous] if args.previous else []) + \
        ([args.preamble] if args.preamble else [])
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"no such file: {', '.join(missing)}")
    docs = [C.read_results(Path(f)) for f in args.old + args.new]
    bad = [f for f, d in zip(args.old + args.new, docs) if d.get("kind") != "estimate"]
    if bad:
        raise SystemExit(f"not an estimate.json of bench_estimate.py: {', '.join(bad)}")
    if not any(r["shape"] == args.shape for d in docs for r in d["records"]):
        raise SystemExit(f"no records of {args.shape!r} in the inputs")
    names = ([Path(f).stem for f in args.old], [Path(f).stem for f in args.new])
    lines = [f"# {args.title}", "", "Written by `python benchmarks/compare_estimate.py` "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}; do not edit by hand.", ""]
    if args.preamble:
        lines += [Path(args.preamble).read_text().strip(), ""]
    lines += compare(docs[:len(args.old)], docs[len(args.old):],
                     C.read_results(Path(args.previous)) if args.previous else None, args.shape, names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
