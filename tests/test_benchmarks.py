"""The benchmark scripts run and write well-formed records (timings are never asserted)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import bench_ops  # noqa: E402
import render  # noqa: E402


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    dev = root / "cpu-smoke"
    path = bench_ops.run(bench_ops.parse(["--smoke", "--device", "cpu", "--no-compile", "--out", str(dev)]))
    return root, path


def test_min_bytes():
    import torch

    n = 10 * 20
    assert bench_ops.min_bytes("perturb", [(10, 20)], torch.bfloat16) == n * (2 + 4 + 2)
    assert bench_ops.min_bytes("prox", [(10, 20)], torch.float32) == n * (4 + 4 + 4)
    assert bench_ops.min_bytes("prox_acc", [(10, 20)], torch.float16) == n * (2 + 4 + 4 + 8)
    assert bench_ops.min_bytes("saliency", [(10, 20)], torch.float32) == 2 * n * 4 + 4 * 30
    assert sum(map(lambda s: __import__("math").prod(s), bench_ops.smollm2_shapes())) == 134_515_008


def test_smoke_records_schema(smoke_results):
    _, path = smoke_results
    doc = json.loads(path.read_text())
    assert doc["schema"] == C.SCHEMA and doc["kind"] == "ops"
    recs = doc["records"]
    assert recs
    for r in recs:
        missing = [f for f in C.RECORD_FIELDS if f not in r]
        assert not missing, (missing, r)
        assert r["device"] == "cpu"
        assert isinstance(r["loadavg"], list)
        if r["metric"] != "error":
            assert isinstance(r["value"], (int, float)) and r["value"] == r["value"]  # a number, not NaN
    ops = {r["op"] for r in recs}
    assert {"copy", "perturb", "prox", "prox_acc", "saliency", "perturb_multi", "prox_multi",
            "prox_multi_acc"} <= ops
    provs = {r["provider"] for r in recs if r["op"] == "prox"}
    assert "reference" in provs
    import moreau_kernels as mk

    if not mk.availability()["cpu"]:  # the native backend is measured whenever it is built
        assert "cpu" in provs
        assert any(r["metric"] == "speedup_vs_reference" and r["provider"] == "cpu" for r in recs)
    metrics = {r["metric"] for r in recs if r["op"] == "prox" and r["provider"] == "reference"}
    assert {"time", "time_q20", "time_q80", "gbps", "copy_fraction"} <= metrics


def test_render(smoke_results, tmp_path):
    root, _ = smoke_results
    out = render.render(root, root / "RESULTS.md")
    text = out.read_text()
    assert "cpu-smoke" in text and "prox update" in text and "| reference |" in text
    assert (root / "cpu-smoke" / "ops_gbps.png").stat().st_size > 1000


def test_render_estimate_records(tmp_path):
    """The renderer reads estimate records (synthetic numbers here: only the layout is tested)."""
    meta = C.Meta("cpu")
    recs = []
    for prov, peak in (("pure", 100.0), ("fused", 40.0)):
        for m, u, v in (("fwd_bwd", "ms", 10.0), ("step", "ms", 11.0), ("overhead", "ms", 1.0),
                        ("overhead_pct", "%", 10.0), ("estimate", "s", 0.1), ("peak_mem", "MiB", peak),
                        ("elementwise_floor", "ms", 0.5), ("overhead_over_floor", "x", 2.0)):
            recs.append(meta.record("estimate", prov, "smollm2-135m", "fp32", m, u, v, tokens=640, iters=2,
                                    layers=30, backend="cpu"))
    recs.append(meta.record("estimate", "fused", "smollm2-135m", "fp32", "peak_mem_vs_pure", "x", 0.4, tokens=640,
                            layers=30))
    dev = tmp_path / "cpu-synthetic-2c"
    C.write_results(dev / "estimate.json", recs, kind="estimate", device="cpu", device_name="test")
    text = render.render(tmp_path, tmp_path / "RESULTS.md").read_text()
    assert "End-to-end" in text and "overhead ≤ 10 %" in text and "**met**" in text
    assert (dev / "estimate.png").exists()
