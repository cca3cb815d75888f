"""TRIM (moreau_pruner.unstructured.trim): per-row ratios, the adjustment step by hand, the driver and the CLI."""
import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner.prune.allocation import CHOICES, parse_allocation
from moreau_pruner.cli.prune import main
from moreau_pruner.unstructured.trim import (OutputQuality, TrimConfig, mask_from_counts, project_mean, row_counts, trim_rows,
                                trim_step)
from moreau_pruner.unstructured.prune import prunable_linears, unstructured_prune

from _tiny import word_tokenizer


def make(seed=0, layers=2):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64)).eval()


def ids(n=4, seq=16):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("rows,cols,r", [(7, 23, 0.5), (16, 40, 0.7), (5, 9, 0.3), (64, 100, 0.13)])
def test_row_counts_keep_the_uniform_total(rows, cols, r):
    gen = torch.Generator().manual_seed(rows)
    base = int(cols * r)
    assert torch.equal(row_counts(torch.full((rows,), r, dtype=torch.float64), cols, r),
                       torch.full((rows,), base))  # uniform ratios -> exactly the uniform mask's counts
    for _ in range(5):
        x = project_mean(r + 0.3 * torch.randn(rows, generator=gen, dtype=torch.float64), r, 0.0, 0.95)
        assert float(x.mean()) == pytest.approx(r, abs=1e-9) and float(x.min()) >= 0 and float(x.max()) <= 0.95
        k = row_counts(x, cols, r)
        assert int(k.sum()) == rows * base  # the matrix removes exactly as many weights as uniform r
        quota = (base + cols * (x - r)).clamp(0, cols)
        assert float((k - quota).abs().max()) < 1.0  # each row within one weight of its real quota
        assert int(k.min()) >= 0 and int(k.max()) <= cols


def test_project_mean_clips_and_keeps_the_mean():
    x = torch.tensor([-0.5, 0.2, 0.4, 2.0], dtype=torch.float64)
    y = project_mean(x, 0.5, 0.0, 0.95)
    # by hand: shift t with clip(x+t) mean 0.5: t = 0.25 gives [0, 0.45, 0.65, 0.95] -> mean 2.05/4 = 0.5125;
    # on that piece the mean is (0 + (0.2+t) + (0.4+t) + 0.95)/4 = 0.5  =>  t = 0.225
    torch.testing.assert_close(y, torch.tensor([0.0, 0.425, 0.625, 0.95], dtype=torch.float64))


def test_one_adjustment_step_by_hand():
    """W [3, 4], inputs X = I (four tokens, the unit vectors, so G = I and Y = W), |W| as the metric, r = 0.5."""
    w = torch.tensor([[0.0, 0.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, math.sqrt(2.0)]])
    order = torch.sort(w.abs(), dim=1, stable=True).indices
    quality = OutputQuality(w, torch.eye(4))
    counts = row_counts(torch.full((3,), 0.5, dtype=torch.float64), 4, 0.5)
    assert counts.tolist() == [2, 2, 2]
    q, flat = quality(mask_from_counts(order, counts))
    # kept: [3, 4] of |w|=5 -> 5/5; [1, 1] of 2 -> sqrt(2)/2; [1, sqrt2] of 2 -> sqrt(3)/2. Flat: |Ŵ|/|W| = sqrt(30/33)
    torch.testing.assert_close(q, torch.tensor([1.0, math.sqrt(2) / 2, math.sqrt(3) / 2], dtype=torch.float64))
    assert flat == pytest.approx(math.sqrt(30 / 33))
    # step η = 0.16: (q - min)/(max - min) = [1, 0, 0.542582]; times 2η = [0.32, 0, 0.173626]; mean 0.164542;
    # x = 0.5 + d - mean = [0.655458, 0.335458, 0.509084] (inside [0, 0.95]: no clipping)
    x = trim_step(torch.full((3,), 0.5, dtype=torch.float64), q, 0.16, 0.5)
    torch.testing.assert_close(x, torch.tensor([0.655458, 0.335458, 0.509084], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    # quotas 2 + 4(x - 0.5) = [2.62183, 1.34183, 2.03634]: floors [2, 1, 2] remove 5 of 6, the largest remainder
    # (row 0) takes the last one
    counts = row_counts(x, 4, 0.5)
    assert counts.tolist() == [3, 1, 2]
    q, flat = quality(mask_from_counts(order, counts))
    # row 0 keeps [4]: 4/5; row 1 keeps three 1s: sqrt(3)/2; row 2 unchanged. Flat: sqrt((16 + 3 + 3)/33)
    torch.testing.assert_close(q, torch.tensor([0.8, math.sqrt(3) / 2, math.sqrt(3) / 2], dtype=torch.float64))
    assert flat == pytest.approx(math.sqrt(22 / 33))
    # that step lost quality, so the search keeps a better iterate (here: the uniform rows, or a negative step)
    res = trim_rows(w, w.abs(), torch.eye(4), 0.5)
    assert res.quality >= res.quality_uniform == pytest.approx(math.sqrt(30 / 33))
    assert int(res.counts.sum()) == 6


def test_output_quality_matches_the_outputs():
    """The Gram form of q and Q against W X and Ŵ X computed directly."""
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(9, 13, generator=gen), torch.randn(13, 50, generator=gen)
    mask = torch.rand(9, 13, generator=gen) < 0.6
    q, flat = OutputQuality(w, x @ x.T)(mask)
    y, yh = w @ x, (w * ~mask) @ x
    torch.testing.assert_close(q.float(), torch.nn.functional.cosine_similarity(y, yh, dim=1), atol=1e-5, rtol=0)
    assert flat == pytest.approx(float(torch.nn.functional.cosine_similarity(y.flatten(), yh.flatten(), dim=0)),
                                 abs=1e-5)


# ----------------------------------------------------------------------------- the driver
def _dense_inputs(model, batch):
    """{weight name: X [C, tokens]} fed to every pruned Linear by the dense model (hooks of the test's own)."""
    out, handles = {}, []
    for name, _, mod in prunable_linears(model):
        handles.append(mod.register_forward_pre_hook(
            lambda _m, a, name=name: out.__setitem__(name, a[0].detach().reshape(-1, a[0].shape[-1]).T.clone())))
    with torch.no_grad():
        model(input_ids=batch)
    for h in handles:
        h.remove()
    return out


def _flat_cosine(w, wp, x):
    w, wp = w.detach(), wp.detach()
    return float(torch.nn.functional.cosine_similarity((w @ x).flatten().double(), (wp @ x).flatten().double(), dim=0))


@pytest.mark.parametrize("method", ["wanda", "magnitude", "taylor", "gblm"])
def test_trim_never_worse_than_its_base_metric(method):
    """One dense pass (both runs see the same inputs): on every matrix, the output cosine of TRIM's mask,
    recomputed here from the pruned weights and the dense inputs, is at least the base metric's, and
    higher on most; same zeros per matrix."""
    dense, batch = make(), ids()
    xs = _dense_inputs(dense, batch)
    base, trimmed = copy.deepcopy(dense), copy.deepcopy(dense)
    rb = unstructured_prune(base, batch, method, 0.6, progress=False, sequential=False)
    rt = unstructured_prune(trimmed, batch, method, 0.6, progress=False, sequential=False, trim=True)
    wd = dict(dense.named_parameters())
    wb, wt = dict(base.named_parameters()), dict(trimmed.named_parameters())
    better = 0
    for lb, lt in zip(rb["layers"], rt["layers"]):
        name = lt["name"]
        assert lb["zeros"] == lt["zeros"]
        cb = _flat_cosine(wd[name], wb[name], xs[name])
        ct = _flat_cosine(wd[name], wt[name], xs[name])
        assert ct >= cb - 1e-6, (name, cb, ct)
        assert lt["trim"]["quality"] == pytest.approx(ct, abs=1e-4)  # the report says what the weights do
        assert lt["trim"]["quality_uniform"] == pytest.approx(cb, abs=1e-4)
        better += ct > cb + 1e-6
    assert better >= len(rt["layers"]) // 2
    assert rt["trim_summary"]["improved"] == better


def test_sequential_trim_with_layer_ratios_keeps_every_matrix_count():
    model, batch = make(layers=3), ids()
    ratios = {0: 0.4, 1: 0.55, 2: 0.7}
    rep = unstructured_prune(model, batch, "wanda", 0.5, layer_ratios=ratios, progress=False, trim=True)
    assert rep["sequential"] is True
    for row in rep["layers"]:
        r, c = row["shape"]
        assert row["target"] == ratios[row["layer"]]
        assert row["masked"] == r * int(c * ratios[row["layer"]])  # the uniform row mask's count
        assert row["trim"]["row_removed_max"] >= row["trim"]["row_removed_min"]
    assert any(row["trim"]["row_removed_max"] > row["trim"]["row_removed_min"] for row in rep["layers"])


def test_trim_masks_follow_the_metric_order_within_rows():
    """Whatever a row's count, the weights it loses are its smallest by the metric."""
    model, batch = make(), ids()
    ref = copy.deepcopy(model)
    unstructured_prune(model, batch, "magnitude", 0.5, progress=False, trim=True)
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters()):
        if p.dim() == 2 and "layers" in name:
            gone = p == 0
            metric = p0.detach().abs()
            assert (metric.masked_fill(~gone, -1).amax(1) <= metric.masked_fill(gone, 1e9).amin(1)).all(), name


@pytest.mark.parametrize("kwargs,msg", [(dict(nm=(2, 4)), "N:M"), (dict(include_embeddings=True), "embeddings"),
                                        (dict(sparsity=0.97), "at most 0.95"),
                                        (dict(trim=TrimConfig(iterations=0)), "iterations"),
                                        (dict(trim=TrimConfig(steps=(0.1, -0.1))), "positive"),
                                        (dict(trim="yes"), "TrimConfig")])
def test_trim_bad_input(kwargs, msg):
    kw = dict(method="magnitude", sparsity=0.5, progress=False, trim=True)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=msg):
        unstructured_prune(make(), ids(), **kw)


def test_trim_needs_a_batch():
    with pytest.raises(ValueError, match="calibration batch"):
        unstructured_prune(make(), None, "magnitude", 0.5, progress=False, trim=True)


# ----------------------------------------------------------------------------- allocation names
def test_parse_allocation():
    assert parse_allocation("trim") == ("uniform", "trim")
    assert parse_allocation("uniform+trim") == ("uniform", "trim")
    assert parse_allocation("owl+trim") == ("owl", "trim")
    assert parse_allocation("farms") == ("farms", None)
    assert {"trim", "owl+trim", "alpha+trim", "farms+trim"} <= set(CHOICES)
    for bad, msg in [("trim+owl", "comes first"), ("owl+alpha", "both set per-layer"), ("magic", "unknown"),
                     ("owl+trim+x", "unknown"), ("", "allocation must")]:
        with pytest.raises(ValueError, match=msg):
            parse_allocation(bad)


# ----------------------------------------------------------------------------- CLI
WORDS = "the a of is to and in it that for on with as be by this are an or at from value object name".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-trim")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                 num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                 max_position_embeddings=128)).save_pretrained(d)
    word_tokenizer(WORDS).save_pretrained(d)
    return d


def cli(model_dir, *extra):
    return main(["--model", str(model_dir), "--num-examples", "2", "--seq-len", "16", "--eval-seq-lens", "16",
                 "--eval-tokens", "64", "--quiet", "--generate", "", *extra])


def test_cli_owl_plus_trim_end_to_end(model_dir, tmp_path, capsys):
    common = ("--unstructured", "--method", "wanda", "--ratio", "0.5")
    assert cli(model_dir, *common, "--allocation", "owl", "--json", str(tmp_path / "owl.json")) == 0
    rc = cli(model_dir, *common, "--allocation", "owl+trim", "--json", str(tmp_path / "trim.json"))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "TRIM rows" in text
    owl, trim = (json.loads((tmp_path / f).read_text()) for f in ("owl.json", "trim.json"))
    u = trim["unstructured"]
    assert u["rows"] == "trim" and owl["unstructured"]["rows"] == "uniform"
    assert u["layer_ratios"] == owl["unstructured"]["layer_ratios"]  # OWL's layer ratios, spread by TRIM
    assert u["overall"]["zeros"] == owl["unstructured"]["overall"]["zeros"]
    assert u["trim"]["matrices"] == 21 and u["trim"]["quality_mean"] >= u["trim"]["quality_uniform_mean"]
    assert len(u["trim_matrices"]) == 21 and all(v > 0 for v in trim["ppl_pruned"].values())


def test_cli_trim_alone_keeps_uniform_layers(model_dir, tmp_path, capsys):
    rc = cli(model_dir, "--unstructured", "--method", "magnitude", "--ratio", "0.5", "--allocation", "trim",
             "--no-eval", "--json", str(tmp_path / "r.json"))
    assert rc == 0, capsys.readouterr().err
    u = json.loads((tmp_path / "r.json").read_text())["unstructured"]
    assert u["layer_ratios"] is None and u["rows"] == "trim"
    assert u["overall"]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("args,msg", [(["--allocation", "trim"], "--unstructured"),
                                      (["--allocation", "owl+trim"], "--unstructured"),
                                      (["--unstructured", "--nm", "2:4", "--allocation", "trim"], "--nm")])
def test_cli_trim_bad_combinations(model_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    rc = cli(model_dir, "--out", str(out), *args)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not out.exists()


@pytest.mark.parametrize("name,msg", [("trim+owl", "comes first"), ("owl+farms", "both set per-layer"),
                                      ("tirm", "unknown allocation")])
def test_cli_bad_allocation_names(model_dir, capsys, name, msg):
    with pytest.raises(SystemExit) as e:
        cli(model_dir, "--unstructured", "--allocation", name)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------- quality benchmark
def _bench(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_trim_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quality_trim_cells_and_report(tmp_path):
    """us-wanda+trim next to us-wanda on the tiny random model: records, no N:M cell, the paired TRIM table."""
    quality, render_quality = _bench("quality"), _bench("render_quality")
    out = tmp_path / "res"
    args = ["--model", "tiny-random", "--threads", "1", "--seeds", "0,1", "--precisions", "fp32",
            "--methods", "us-wanda,us-wanda+trim", "--us-sparsities", "0.5,2:4", "--n-samples", "4", "--seq-len", "16",
            "--windows-128", "2", "--windows-long", "0", "--out", str(out)]
    written = quality.run(quality.build_parser().parse_args(args))
    by = {(r["method"], r["ratio"], r["seed"]): r for r in written}
    assert ("us-wanda+trim", "2:4", 0) not in by and ("us-wanda", "2:4", 0) in by
    for seed in (0, 1):
        t, b = by[("us-wanda+trim", 0.5, seed)], by[("us-wanda", 0.5, seed)]
        assert t["unstructured"]["zeros"] == b["unstructured"]["zeros"]
        assert t["unstructured"]["trim"]["quality_mean"] >= t["unstructured"]["trim"]["quality_uniform_mean"]
    text = render_quality.render(out, tmp_path / "Q.md", plots=False)
    assert "#### TRIM: per-row sparsity ratios" in text
    assert "| us-wanda+trim − us-wanda |" in text and "lower)" in text
    assert "cosine, TRIM rows" in text and "2 paired seed(s) so far" in text
    assert "Target (r=0.5, TRIM on the best of these base metrics by 128-token PPL, us-wanda)" in text
