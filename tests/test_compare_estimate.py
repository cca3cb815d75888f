"""benchmarks/compare_estimate.py: verdicts of a before/after estimate comparison (synthetic records)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import compare_estimate as CE  # noqa: E402


def doc(overheads: dict, tracked: dict, fwd_bwd: float = 1000.0, jitter: float = 20.0) -> dict:
    """An estimate.json with the given overhead (ms) and tracked peak (MiB) per path."""
    meta = C.Meta("cpu")
    recs = []
    for path, ov in overheads.items():
        for m, u, v in (("fwd_bwd", "ms", fwd_bwd), ("fwd_bwd_q20", "ms", fwd_bwd - jitter / 2),
                        ("fwd_bwd_q80", "ms", fwd_bwd + jitter / 2), ("step", "ms", fwd_bwd + ov),
                        ("overhead", "ms", ov), ("overhead_pct", "%", 100 * ov / fwd_bwd), ("peak_mem", "MiB", 4000.0),
                        ("tracked_peak", "MiB", tracked[path]), ("tracked_fwd_bwd_peak", "MiB", 2000.0),
                        ("tracked_floor", "MiB", 2500.0)):
            recs.append(meta.record("estimate", path, "smollm2-135m", "fp32", m, u, v, tokens=640))
    return {"kind": "estimate", "commit": meta.base["commit"], "date": meta.base["date"], "argv": [],
            "records": recs}


def row(lines: list[str], section: str, path: str) -> str:
    start = next(i for i, ln in enumerate(lines) if ln.startswith("### " + section))
    return next(ln for ln in lines[start:] if ln.startswith(f"| {path} |"))


def test_timing_verdicts():
    assert CE.timing_verdict([100, 120], [110, 115], 5)[2] == "within noise"
    assert CE.timing_verdict([100, 102], [200, 204], 5)[2] == "**slower**"
    assert CE.timing_verdict([200, 204], [100, 102], 5)[2] == "faster"
    # the within-run jitter widens the band when the runs happen to agree
    delta, band, verdict = CE.timing_verdict([100, 100], [130, 130], 40)
    assert (delta, band, verdict) == (30, 40, "within noise")


def test_memory_verdicts():
    assert CE.memory_verdict([3233.0, 3233.0], [3233.0]) == (0.0, "equal")
    assert CE.memory_verdict([3233.0], [2828.0]) == (-405.0, "lower")
    assert CE.memory_verdict([3233.0], [3300.0])[1] == "**higher**"
    assert "disagree" in CE.memory_verdict([3233.0, 3234.0], [3233.0])[1]


def test_compare_flags_a_slower_path_and_a_higher_peak():
    old = [doc({"pure": 300, "lean": 100}, {"pure": 3233.0, "lean": 3233.0}),
           doc({"pure": 320, "lean": 110}, {"pure": 3233.0, "lean": 3233.0})]
    new = [doc({"pure": 310, "lean": 400}, {"pure": 3233.0, "lean": 3240.0}),
           doc({"pure": 305, "lean": 420}, {"pure": 3233.0, "lean": 3240.0})]
    lines = CE.compare(old, new)
    assert "within noise" in row(lines, "Moreau overhead", "pure")
    assert "**slower**" in row(lines, "Moreau overhead", "lean")
    assert "| equal |" in row(lines, "Tracked", "pure")
    assert "**higher**" in row(lines, "Tracked", "lean")
    summary = next(ln for ln in lines if ln.startswith("**Summary:**"))
    assert "slower beyond noise on lean" in summary and "higher or unstable on lean" in summary


def test_compare_all_within_noise_and_previous(tmp_path):
    old = [doc({"fused": 100}, {"fused": 3233.0})]
    new = [doc({"fused": 90}, {"fused": 3233.0})]
    prev = doc({"fused": 267}, {"fused": 3233.25})
    lines = CE.compare(old, new, prev)
    assert "267 ms" in row(lines, "Moreau overhead", "fused") and "3233.2" in row(lines, "Tracked", "fused")
    assert "within noise or better on every path; tracked peak equal or lower on every path" in "\n".join(lines)


def test_main_writes_markdown_and_refuses_bad_input(tmp_path):
    files = {}
    for name, ov in (("old-1", 100), ("new-1", 95)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(doc({"regen": ov}, {"regen": 2828.0})))
    out = tmp_path / "cmp.md"
    CE.main(["--old", str(files["old-1"]), "--new", str(files["new-1"]), "--out", str(out)])
    text = out.read_text()
    assert "| old-1 |" in text and "| new-1 |" in text and "| regen |" in text
    with pytest.raises(SystemExit, match="no such file"):
        CE.main(["--old", str(tmp_path / "missing.json"), "--new", str(files["new-1"]), "--out", str(out)])
    other = tmp_path / "ops.json"
    other.write_text(json.dumps({"kind": "ops", "records": []}))
    with pytest.raises(SystemExit, match="not an estimate.json"):
        CE.main(["--old", str(other), "--new", str(files["new-1"]), "--out", str(tmp_path / "x.md")])
    with pytest.raises(SystemExit, match="no records of 'llama7b'"):
        CE.main(["--old", str(files["old-1"]), "--new", str(files["new-1"]), "--shape", "llama7b",
                 "--out", str(tmp_path / "y.md")])
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "y.md").exists()


def test_the_sessions_fwd_bwd_swing_widens_the_band():
    """One run per side under a changing load: fwd+bwd (the same work) moved by 2 s, so a 1.5 s change of
    the overhead is noise, not a speed-up."""
    old = [doc({"fused": 2000}, {"fused": 3233.0}, fwd_bwd=30000.0)]
    new = [doc({"fused": 500}, {"fused": 3233.0}, fwd_bwd=28000.0)]
    assert "within noise" in row(CE.compare(old, new), "Moreau overhead", "fused")
    new = [doc({"fused": 500}, {"fused": 3233.0}, fwd_bwd=30000.0)]
    assert "| faster |" in row(CE.compare(old, new), "Moreau overhead", "fused")
