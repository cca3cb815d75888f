"""End-to-end check of the quality benchmark on a tiny random-init Llama (seconds on CPU):
JSON schema, resumability (a second run computes nothing), torn-line tolerance, rendering."""
import json

import pytest

from _bench import load_benchmark


def _load(name):
    return load_benchmark(name)


@pytest.fixture(scope="module")
def quality():
    return _load("quality")


@pytest.fixture(scope="module")
def render_quality():
    return _load("render_quality")


ARGS = ["--model", "tiny-random", "--threads", "1", "--ratios", "0.25,0.5",
        "--methods", "moreau-reference,taylor,magnitude,random", "--seeds", "0,1", "--precisions", "fp32,bf16,fp16",
        "--precision-methods", "moreau-reference,taylor,magnitude", "--precision-ratios", "0.5", "--precision-seeds", "0,1",
        "--iters", "2", "--n-samples", "4", "--seq-len", "16", "--windows-128", "2", "--windows-long", "1",
        "--long-seq-len", "256"]


def test_quality_end_to_end(tmp_path, quality, render_quality):
    out = tmp_path / "res"
    quality.main(ARGS + ["--out", str(out)])
    rec_file = out / "tiny-random" / "records.jsonl"
    records = [json.loads(line) for line in rec_file.read_text().splitlines()]
    # dense + fp32: (moreau, taylor, random) x 2 seeds x 2 ratios + magnitude x 2 ratios
    # + bf16 and fp16: (moreau, taylor) x 2 seeds + magnitude x 1 seed, at one ratio
    assert len(records) == 1 + 12 + 2 + 5 + 5
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        for field in quality.RECORD_FIELDS:
            assert field in r, field
        assert r["model"] == "tiny-random"
        assert r["ppl_128"] > 1 and r["ppl_1024"] > 1
        if r["method"] == "dense":
            assert r["kept"] is None and r["params_kept_fraction"] == 1.0
            continue
        assert r["params_after"] < r["params_before"]
        assert r["precision"] in ("fp32", "bf16", "fp16")
        # fp16 on a CPU: fp32-accumulated products (the native CPU fp16 GEMM is very slow)
        assert r["half_gemm"] == {"fp32": None, "bf16": "native", "fp16": "fp32-accumulate"}[r["precision"]]
        assert set(r["kept"]) == {"heads", "channels"}
        n_layers = len(r["kept"]["channels"])
        assert n_layers > 0 and len(r["kept"]["heads"]) > 0
        for layer, chans in r["kept"]["channels"].items():
            assert chans == sorted(set(chans)) and 0 < len(chans) < 48
        for layer, heads in r["kept"]["heads"].items():
            assert 0 < len(heads) <= 4
        assert r["time"]["importance_s"] >= 0 and r["time"]["eval_s"] > 0
    assert {r["mode"] for r in records if r["method"] == "moreau-reference"} == {"reference"}
    assert {r["seed"] for r in records if r["method"] == "magnitude"} == {0}

    # resumable: nothing new is computed, the file is unchanged
    before = rec_file.read_bytes()
    assert quality.run(quality.build_parser().parse_args(ARGS + ["--out", str(out), "--precisions",
                                                                 "fp32,bf16"])) == []
    assert rec_file.read_bytes() == before
    assert quality.run(quality.build_parser().parse_args(ARGS + ["--out", str(out)])) == []

    # a torn last line (killed run) is ignored, and the next record starts on a new line
    with open(rec_file, "a") as f:
        f.write('{"key": "torn')
    assert len(quality.read_records(rec_file)) == len(records)
    quality.append_record(rec_file, {"key": "extra", "method": "x"})
    assert [r["key"] for r in quality.read_records(rec_file)][-1] == "extra"
    rec_file.write_bytes(before)

    # render: markdown with the tables (no plots, to keep the test fast)
    md = tmp_path / "QUALITY.md"
    text = render_quality.render(out, md, plots=False)
    assert md.read_text() == text
    assert "## tiny-random" in text
    assert "Perplexity, 128-token windows" in text and "Perplexity, 256-token windows" in text
    assert "| moreau-reference |" in text and "| dense |" in text
    assert "fp32 vs bf16" in text and "fp32 vs fp16" in text and "bf16 vs fp16" in text
    assert "fp16: matrix products computed from the fp16 operands with fp32 accumulation" in text
    assert "- r=0.5, bf16 vs fp16: moreau-reference (IoU" in text
    assert "Stability across seeds" in text
    assert "All 24 planned cells are recorded." in text
    assert "python benchmarks/quality.py --model tiny-random" in text


def test_iou_and_missing(render_quality):
    a = {"heads": {"1": [0, 1]}, "channels": {"1": [0, 1, 2]}}
    b = {"heads": {"1": [0, 2]}, "channels": {"1": [0, 1, 2]}}
    sa, sb = render_quality.unit_set(a), render_quality.unit_set(b)
    assert render_quality.iou(sa, sb) == pytest.approx(4 / 6)
    assert render_quality.iou(render_quality.unit_set(a, "channels"), render_quality.unit_set(b, "channels")) == 1.0
    rep = render_quality.ModelReport("t", [], {"cells": [dict(method="taylor", ratio=0.2, seed=1,
                                                               precision="bf16")]})
    assert rep.missing() == ["taylor r=0.2 seed=1 bf16"]


def test_precision_methods_are_structured(quality, capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--model", "tiny-random", "--precision-methods", "us-wanda", "--dry-run"])
    assert e.value.code == 2 and "structured methods only" in capsys.readouterr().err


def test_help(quality, capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_issue7_methods_end_to_end(tmp_path, quality, render_quality):
    """Taylor variants, allocations sharing the Moreau scores, unstructured methods incl. N:M."""
    out = tmp_path / "res"
    args = ["--model", "tiny-random", "--threads", "1", "--ratios", "0.5", "--seeds", "0", "--precisions", "fp32",
            "--methods", "taylor-second,moreau-paper,moreau-paper+alpha,us-wanda,us-moreau-paper,us-taylor,us-magnitude",
            "--us-sparsities", "0.5,2:4", "--iters", "2", "--n-samples", "4", "--seq-len", "16",
            "--windows-128", "2", "--windows-long", "0", "--out", str(out)]
    written = quality.run(quality.build_parser().parse_args(args))
    by = {(r["method"], r["ratio"]): r for r in written}
    assert set(by) == {("dense", 0.0), ("taylor-second", 0.5), ("moreau-paper", 0.5), ("moreau-paper+alpha", 0.5),
                       ("us-wanda", 0.5), ("us-wanda", "2:4"), ("us-moreau-paper", 0.5),
                       ("us-moreau-paper", "2:4"), ("us-taylor", 0.5), ("us-taylor", "2:4"), ("us-magnitude", 0.5),
                       ("us-magnitude", "2:4")}
    for r in written:
        for field in quality.RECORD_FIELDS:
            assert field in r, (r["method"], field)
    assert by[("taylor-second", 0.5)]["taylor_variant"] == "param_second"
    alloc = by[("moreau-paper+alpha", 0.5)]["allocation"]
    assert alloc["method"] == "alpha" and len(set(alloc["ratios"].values())) > 1
    # the allocation reused moreau-paper's scores (same importance time, computed once)
    assert by[("moreau-paper+alpha", 0.5)]["time"]["importance_s"] == by[("moreau-paper", 0.5)]["time"]["importance_s"]
    for key, r in by.items():
        if not key[0].startswith("us-"):
            continue
        assert r["params_after"] == r["params_before"] and r["kept"] is None
        assert r["unstructured"]["sparsity"] == pytest.approx(0.5, abs=0.02)
        assert r["nm"] == (key[1] if isinstance(key[1], str) else None)
        assert r["key"].split("|")[2] == ("nm2:4" if key[1] == "2:4" else "r0.5")
    assert by[("us-wanda", 0.5)]["unstructured"]["sequential"] is True
    # resumable with N:M cells too
    assert quality.run(quality.build_parser().parse_args(args)) == []
    text = render_quality.render(out, tmp_path / "Q.md", plots=False)
    assert "### LLM-Pruner's Taylor variants and per-layer allocations" in text
    assert "| moreau-paper+alpha − moreau-paper |" in text and "layer ratios" in text
    assert "### Unstructured and N:M sparsity" in text and "| method | r=0.5 | r=2:4 |" in text
    assert "| us-moreau-paper − us-wanda |" in text and "Measured sparsity: r=0.5:" in text
    assert "| us-moreau-paper − us-taylor |" in text
    assert "All 11 planned cells are recorded." in text


def test_equal_size_cells_and_rounds(tmp_path, quality, render_quality):
    """--target-params solves each range's ratio for one parameter count (global scope: from the
    group's scores); --rounds K prunes iteratively and gets its own keys; the renderer's layer
    section compares the settings at that size, paired by seed."""
    out = tmp_path / "res"
    base = ["--model", "tiny-random", "--threads", "1", "--seeds", "0,1", "--precisions", "fp32", "--iters", "2",
            "--n-samples", "4", "--seq-len", "16", "--windows-128", "2", "--windows-long", "0", "--out", str(out),
            "--methods", "taylor,moreau-paper", "--target-params", "40000"]
    settings = [["--attn-layers", "0:4", "--mlp-layers", "0:4"], ["--attn-layers", "1:3", "--mlp-layers", "1:3"],
                ["--scope", "global", "--attn-layers", "0:4", "--mlp-layers", "0:4"],
                ["--attn-layers", "0:4", "--mlp-layers", "0:4", "--rounds", "2"]]
    written = []
    for extra in settings:
        written += quality.run(quality.build_parser().parse_args(base + extra))
    pruned = [r for r in written if r["method"] != "dense"]
    assert len(pruned) == 4 * 2 * 2 and len({r["key"] for r in pruned}) == len(pruned)
    for r in pruned:
        assert r["target_params"] == 40000 and r["key"].split("|")[2] == "p40000"
        assert 40000 - 3 * 32 * 4 < r["params_after"] <= 40000 or (r["scope"] == "global" and r["params_after"] <= 40000)
        assert 0 < r["ratio"] < 1
    narrow = [r for r in pruned if r["attn_layers"] == "1:3"]
    wide = [r for r in pruned if r["attn_layers"] == "0:4" and r["scope"] == "local" and r["rounds"] == 1]
    assert narrow[0]["ratio"] > wide[0]["ratio"]  # fewer layers: a higher ratio for the same size
    k2 = [r for r in pruned if r["rounds"] == 2]
    assert len(k2) == 4 and all(r["key"].endswith("|k2") for r in k2)
    assert all(r["params_after"] == wide[0]["params_after"] for r in k2)  # the same final size as one-shot
    # resumable
    assert quality.run(quality.build_parser().parse_args(base + settings[3])) == []
    with pytest.raises(SystemExit):
        quality.main(base + ["--scope", "global", "--rounds", "2"])
    with pytest.raises(SystemExit):
        quality.main(base + ["--methods", "moreau-paper+owl"])
    text = render_quality.render(out, tmp_path / "Q.md", plots=False)
    assert "### Which layers to prune" in text
    assert "| local 0:4 |" in text and "| local 1:3 |" in text and "| global 0:4 |" in text
    assert "| local 0:4, 2 rounds |" in text and "| local 0:4, 2 rounds − local 0:4 | taylor |" in text
