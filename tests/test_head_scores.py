"""The attention-unit score arithmetics (importance.HEAD_SCORES) pinned on hand-computed values,
their plumbing through the library and the CLI, and the head-score benchmark on a tiny model."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner import PruneConfig, compute_scores, discover
from moreau_pruner.score.importance import model_scores
from moreau_pruner.cli.prune import main as cli_main
from moreau_pruner.data import calibration_batch, calibration_text
from moreau_pruner.score.importance import HEAD_SCORES, align_query_channels, attention_scores, layer_scores
from moreau_pruner.prune.plan import plan_local
from moreau_pruner.prune.target import PruneTarget
from moreau_pruner.model.structure import LayerStructure

from _tiny import word_tokenizer

# A GQA layer with H = 4 query heads over H_kv = 2 KV heads (n_rep = 2), head_dim d = 2 and hidden
# size 1, so every q/k/v row and every o column holds one weight and its saliency |w·g| is that
# channel's part. Query head h owns q rows / o columns 2h, 2h+1; KV head k owns k/v rows 2k, 2k+1;
# repeat_kv feeds KV head 0 to query heads 0, 1 and KV head 1 to query heads 2, 3.
S_Q = [1., 2., 3., 4., 5., 6., 7., 8.]  # heads 0..3: [1,2] [3,4] [5,6] [7,8]
S_K = [30., 0., 0., 0.]
S_V = [1., 1., 1., 1.]
S_O = [0., 0., 20., 20., 0., 0., 0., 0.]  # only query head 1 matters to o
# The weights carry the values with alternating signs and the gradients are -1 / +1, so W ⊙ G has
# negative entries: the score must take |W ⊙ G| before summing.


def _lin(values, rows):
    lin = nn.Linear(1, len(values), bias=False) if rows else nn.Linear(len(values), 1, bias=False)
    w = torch.tensor([v * (-1) ** i for i, v in enumerate(values)])
    lin.weight.data = w.view(-1, 1) if rows else w.view(1, -1)
    return lin


def _layer():
    q, k, v, o = _lin(S_Q, True), _lin(S_K, True), _lin(S_V, True), _lin(S_O, False)
    gate, up, down = _lin([1., 2.], True), _lin([3., 4.], True), _lin([5., 6.], False)
    holder = nn.Module()
    for name, lin in zip(("q", "k", "v", "o", "gate", "up", "down"), (q, k, v, o, gate, up, down)):
        holder.add_module(name, lin)
    ls = LayerStructure(0, holder, q, k, v, o, gate, up, down, head_dim=2)
    names = {id(lin.weight): f"{n}.weight" for n, lin in holder.named_children()}
    grads = {f"{n}.weight": -torch.sign(lin.weight.detach()) for n, lin in holder.named_children()}
    return ls, grads, names


# KV-group scores by hand. Parts per unit (each matrix summed over the unit's channels):
#   KV 0: q = 1+2+3+4 = 10, k = 30+0 = 30, v = 1+1 = 2, o = 0+0+20+20 = 40
#   KV 1: q = 5+6+7+8 = 26, k = 0,        v = 2,       o = 0
# LLM-Pruner aligns q/o onto the 4 KV channels first. repeat_kv (llm-pruner): KV channel 2k+i takes
# channel i of query heads 2k and 2k+1: q -> [1+3, 2+4, 5+7, 6+8] = [4, 6, 12, 14],
# o -> [0+20, 0+20, 0, 0] = [20, 20, 0, 0]. Upstream's view(n_rep, H_kv·d).sum(0): channel c takes
# q/o channels c and c+4, i.e. query heads k and k+2: q -> [6, 8, 10, 12], o -> [0, 0, 20, 20].
KV_EXPECTED = {
    # sum: unit = 10+30+2+40 = 82 | 26+0+2+0 = 28; llm-pruner: channels [4+30+1+20, 6+0+1+20, 12+1, 14+1]
    # = [55, 27, 13, 15] -> [82, 28]; upstream: [6+30+1+0, 8+1, 10+1+20, 12+1+20] = [37, 9, 31, 33] -> [46, 64]
    ("sum", "unit"): [82., 28.],
    ("sum", "llm-pruner"): [82., 28.],
    ("sum", "llm-pruner-upstream"): [46., 64.],
    # mean over the 4 matrices: the sums / 4
    ("mean", "unit"): [20.5, 7.],
    ("mean", "llm-pruner"): [20.5, 7.],
    ("mean", "llm-pruner-upstream"): [11.5, 16.],
    # max: unit = max(10,30,2,40) = 40 | max(26,0,2,0) = 26; llm-pruner per channel
    # [max(30,1,4,20), max(0,1,6,20), max(0,1,12,0), max(0,1,14,0)] = [30, 20, 12, 14] -> [50, 26];
    # upstream [max(30,1,6,0), max(0,1,8,0), max(0,1,10,20), max(0,1,12,20)] = [30, 8, 20, 20] -> [38, 40]
    ("max", "unit"): [40., 26.],
    ("max", "llm-pruner"): [50., 26.],
    ("max", "llm-pruner-upstream"): [38., 40.],
    # first: the root matrix, q for ours, k for LLM-Pruner (it roots a GQA group at k_proj)
    ("first", "unit"): [10., 26.],
    ("first", "llm-pruner"): [30., 0.],
    ("first", "llm-pruner-upstream"): [30., 0.],
}


@pytest.mark.parametrize("reduction,head_score", sorted(KV_EXPECTED))
def test_kv_group_scores_by_hand(reduction, head_score):
    ls, grads, names = _layer()
    sc = layer_scores(ls, grads, names, reduction, granularity="kv-group", head_score=head_score)
    assert sc.attention.tolist() == KV_EXPECTED[(reduction, head_score)]
    # MLP channels: gate/up rows and down columns, combined per channel the same way for every arithmetic
    assert sc.mlp.tolist() == {"sum": [9., 12.], "mean": [3., 4.], "max": [5., 6.], "first": [1., 2.]}[reduction]


def test_kv_group_choice_differs_only_with_upstreams_fold():
    """At one KV group removed, ours and the repaired LLM-Pruner order remove KV head 1 (28 < 82);
    upstream's fold removes KV head 0 (46 < 64), although KV head 0 feeds query head 1, o's only user."""
    ls, grads, names = _layer()
    kept = {}
    for hs in HEAD_SCORES:
        sc = layer_scores(ls, grads, names, granularity="kv-group", head_score=hs)
        cfg = PruneConfig(ratio=0.5, attn_layers="0:1", mlp_layers="0:1")
        kept[hs] = plan_local(PruneTarget(discover_like(ls), cfg, range(0, 1), range(0, 0)), [sc], {0: (1, None)})[0].kv_keep
    assert kept == {"unit": [0], "llm-pruner": [0], "llm-pruner-upstream": [1]}


def discover_like(ls):
    """The one-layer structure plan_local reads (only .layers)."""
    return type("S", (), {"layers": [ls]})()


def test_query_heads_by_hand():
    """Query-head units hold q rows and o columns only: per head q = [3, 7, 11, 15], o = [0, 40, 0, 0].
    Without k/v there is nothing to align, so every arithmetic gives the same sums; max per channel
    (h1: max(3,20) + max(4,20) = 40) equals max per unit here (max(7, 40) = 40)."""
    ls, grads, names = _layer()
    for hs in HEAD_SCORES:
        sc = layer_scores(ls, grads, names, "sum", granularity="query-heads", head_score=hs)
        assert sc.attention.tolist() == [3., 47., 11., 15.]
        sc = layer_scores(ls, grads, names, "max", granularity="query-heads", head_score=hs)
        assert sc.attention.tolist() == [3., 40., 11., 15.]


def test_alignment_maps():
    """repeat_kv: KV channel k·d+i <- query heads k·n_rep .. k·n_rep+n_rep-1; upstream: heads k, k+H_kv, ..."""
    h, hkv, d = 6, 2, 1  # n_rep = 3; channel value = 10^head so the sum shows which heads landed where
    x = torch.tensor([10. ** j for j in range(h)], dtype=torch.float64)
    assert align_query_channels(x, hkv, d).tolist() == [111., 111000.]  # heads 0,1,2 | 3,4,5
    assert align_query_channels(x, hkv, d, upstream=True).tolist() == [10101., 101010.]  # heads 0,2,4 | 1,3,5


def test_sum_and_mean_agree_max_prod_first_do_not():
    """Summing over channels and over matrices commute: unit and llm-pruner are equal under sum and
    mean on any parts; under max, prod and first they are different arithmetics."""
    g = torch.Generator().manual_seed(0)
    h, hkv, d = 8, 2, 4
    q, o = torch.rand(h * d, generator=g, dtype=torch.float64), torch.rand(h * d, generator=g, dtype=torch.float64)
    k, v = torch.rand(hkv * d, generator=g, dtype=torch.float64), torch.rand(hkv * d, generator=g, dtype=torch.float64)
    for red in ("sum", "mean"):
        a = attention_scores(q, k, v, o, h, hkv, d, red, "kv-group", "unit")
        b = attention_scores(q, k, v, o, h, hkv, d, red, "kv-group", "llm-pruner")
        torch.testing.assert_close(a, b)
    for red in ("max", "prod", "first"):
        a = attention_scores(q, k, v, o, h, hkv, d, red, "kv-group", "unit")
        b = attention_scores(q, k, v, o, h, hkv, d, red, "kv-group", "llm-pruner")
        assert not torch.allclose(a, b)


def _tiny_gqa(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_bad_head_score_is_a_clear_error_before_any_work():
    m = _tiny_gqa()
    with pytest.raises(ValueError, match="head_score must be one of"):
        model_scores(discover(m), "magnitude", head_score="llm_pruner")
    with pytest.raises(ValueError, match="head_score must be one of"):  # before the backward pass
        compute_scores(m, torch.zeros(1, 4, dtype=torch.long), "taylor", head_score="per-head")


WORDS = ("the a of is to and in it that for on with as be by this are an or at from statement expression value "
         "object function name class return if else python module type list string number").split()


def test_cli_head_score_reaches_the_scores(tmp_path, capsys):
    """moreau-prune --head-score X prunes the KV groups that model_scores(head_score=X) ranks lowest on
    the CLI's own calibration batch; on this model upstream's fold keeps different groups than ours."""
    d = tmp_path / "tiny"
    _tiny_gqa(seed=6).save_pretrained(d)
    tok = word_tokenizer(WORDS)
    tok.save_pretrained(d)
    batch = calibration_batch(tok, calibration_text("pydoc"), n_samples=2, seq_len=16, seed=0)
    want = {}
    for hs in HEAD_SCORES:
        model = LlamaForCausalLM.from_pretrained(d).eval()
        cfg = PruneConfig(ratio=0.5, attn_layers="0:3", mlp_layers="0:3", granularity="kv-group")
        scores, _, _ = compute_scores(model, batch, "taylor", cfg, head_score=hs, progress=False)
        want[hs] = [sorted(torch.argsort(s.attention, stable=True)[1:].tolist()) for s in scores]
    assert want["unit"] == want["llm-pruner"] != want["llm-pruner-upstream"]
    for hs in HEAD_SCORES:
        out = tmp_path / f"{hs}.json"
        rc = cli_main(["--model", str(d), "--method", "taylor", "--num-examples", "2", "--seq-len", "16",
                       "--attn-layers", "0:3", "--mlp-layers", "0:3", "--granularity", "kv-group", "--ratio", "0.5",
                       "--no-eval", "--quiet", "--head-score", hs, "--json", str(out)])
        assert rc == 0, capsys.readouterr().err
        rep = json.loads(out.read_text())
        assert rep["settings"]["head_score"] == hs
        assert [layer["kept_kv_groups"] for layer in rep["layers"]] == want[hs]


def _bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "head_scores.py"
    spec = importlib.util.spec_from_file_location("head_scores", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["head_scores"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_head_scores_benchmark_on_a_tiny_model(tmp_path):
    bench = _bench()
    common = ["--model", "tiny-random", "--out", str(tmp_path), "--attn-layers", "0:3", "--ratio", "0.5",
              "--windows", "2", "--heldout", "pydoc", "--threads", "1", "--quiet"]
    assert bench.main(common + ["--seeds", "0,1"]) == 0
    # a second run adds the random-scores baseline; the dense perplexity is not measured again
    assert bench.main(common + ["--seeds", "0", "--granularities", "kv-group", "--head-scores", "random-scores"]) == 0
    recs = bench.read(tmp_path / "records.jsonl")
    pruned = [r for r in recs if r["kind"] == "pruned"]
    assert len(pruned) == 2 * 2 * len(HEAD_SCORES) + 1 and [r["kind"] for r in recs].count("dense") == 1
    assert pruned[-1]["head_score"] == "random-scores" and pruned[-1]["granularity"] == "kv-group"
    for r in pruned:  # attention only: the MLPs keep their width, every pruned layer lost one KV group
        assert r["mlp"] == "unpruned" and r["ppl_128"]["pydoc"] > 0
        n = r["units_removed_per_layer"]
        if r["granularity"] == "kv-group":
            assert n >= 1 and all(len(kept) == 4 - n for kept in r["kept"].values())  # of 4 KV groups
        else:
            assert n >= 1 and all(len(g) == 2 - n for kept in r["kept"].values() for g in kept)  # n_rep = 2
    by = {(r["seed"], r["granularity"], r["head_score"]): r for r in pruned}
    for seed in (0, 1):  # sum: ours and the repaired LLM-Pruner order keep the same units, one model
        assert by[(seed, "kv-group", "unit")]["kept"] == by[(seed, "kv-group", "llm-pruner")]["kept"]
        assert by[(seed, "kv-group", "llm-pruner")]["ppl_shared_with_identical_model"]
    text = (tmp_path / "README.md").read_text()
    assert "ours − llm-pruner-upstream" in text and "ours − random-scores" in text
    assert "Kept units per layer" in text
