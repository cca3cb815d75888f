"""scripts/gpu_check.sh: the dry run (every stage that does not need CUDA) and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args, env=None, timeout=240):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def test_usage_errors_are_clear(tmp_path):
    res = _run()
    assert res.returncode == 2 and "missing OUT_DIR" in res.stderr
    res = _run("--bogus", str(tmp_path))
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr
    assert "--dry-run" in _run("--help").stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_the_real_run_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = _run(str(out))
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "--dry-run" in res.stderr
    assert not out.exists()


def test_dry_run_writes_every_output(tmp_path):
    out = tmp_path / "dry"
    res = _run("--dry-run", str(out), env={"GPU_CHECK_BUDGET_S": "400"}, timeout=450)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    stages = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines()[1:])
    assert set(stages) >= {"build", "pytest-gpu", "bench-ops", "bench-est", "render"}, stages
    assert all(v == "ok" or v.startswith("kept") for v in stages.values()), stages
    assert "torch" in (out / "env.txt").read_text()
    assert "backend" in (out / "info.txt").read_text()
    collected = (out / "pytest-gpu.log").read_text()
    assert "test_gpu.py::test_tiny_model_estimate_agrees_across_backends" in collected
    assert "test_native.py::test_cuda_prox_update_vs_reference" in collected
    [dev] = [d for d in (out / "results").iterdir() if d.is_dir()]
    ops = json.loads((dev / "ops.json").read_text())
    assert {r["op"] for r in ops["records"]} >= {"perturb", "prox"}
    est = json.loads((dev / "estimate.json").read_text())
    peaks = [r for r in est["records"] if r["metric"] == "peak_mem"]
    assert {r["provider"] for r in peaks} == {"fused"} and all(r["value"] > 0 for r in peaks)
    assert (out / "results" / "RESULTS.md").read_text().startswith("# Benchmark results")
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and "| bench-est | ok |" in summary and "Peak memory" in summary
