"""Layer-wise ratio allocation (moreau_pruner.prune.allocation): OWL, AlphaPruning, FARMS."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner import PruneConfig, discover, resolve_target
from moreau_pruner.score.importance import model_scores
from moreau_pruner.prune.allocation import (allocate, alpha_ratios, esd, farms_esd, hill_alpha, owl_outlier_ratios,
                                      owl_ratios, prune_structure_allocated, structured_removal, structured_sizes,
                                      unstructured_sizes)
from moreau_pruner.prune.plan import _n_remove
from moreau_pruner.unstructured.prune import unstructured_prune


def make(seed=0, layers=4):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=64))
    with torch.no_grad():  # give the layers different spectra so the allocators differ
        for i, layer in enumerate(m.model.layers):
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj):
                lin.weight[:, : 2 + 3 * i] *= 1 + 4 * i
    return m


def ids(n=2, seq=8):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))


def test_hill_alpha_by_hand_and_on_pareto():
    # mid: xmin = eigs[N//2] = 4, n = 2: α = 1 + 2 / (ln 4 + ln 8 − 2 ln 4) = 1 + 2 / ln 2
    assert hill_alpha(torch.tensor([8.0, 1.0, 4.0, 2.0]), "mid") == pytest.approx(1 + 2 / math.log(2))
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pareto = (1 - u) ** (-1 / 2.0)  # density ∝ x^-3
    assert hill_alpha(pareto, "mid") == pytest.approx(3.0, abs=0.2)
    assert hill_alpha(pareto, "peak") == pytest.approx(3.0, abs=0.25)


def test_owl_map_by_hand():
    sizes = {0: 1, 1: 1, 2: 1}
    got = owl_ratios({0: 1.0, 1: 2.0, 2: 3.0}, 0.5, sizes, lam=0.08)  # more outliers → sparser less
    assert [got[k] for k in range(3)] == pytest.approx([0.58, 0.50, 0.42])
    got = owl_ratios({0: 1.0, 1: 2.0, 2: 3.0}, 0.5, {0: 1, 1: 1, 2: 2}, lam=0.08)
    assert (got[0] + got[1] + 2 * got[2]) / 4 == pytest.approx(0.5)
    assert got[0] - got[2] == pytest.approx(0.16)


def test_alpha_map_by_hand_and_clipping():
    got = alpha_ratios({0: 2.0, 1: 3.0, 2: 4.0}, 0.5, {0: 1, 1: 1, 2: 1}, epsilon=0.3)
    assert [got[k] for k in range(3)] == pytest.approx([0.35, 0.50, 0.65])
    sizes = {0: 3, 1: 1, 2: 1}
    got = alpha_ratios({0: 2.0, 1: 3.0, 2: 4.0}, 0.5, sizes, epsilon=0.3)
    assert sum(got[k] * sizes[k] for k in got) / 5 == pytest.approx(0.5)
    assert got[1] / got[0] == pytest.approx(1.0 / 0.7)
    got = alpha_ratios({0: 2.0, 1: 3.0, 2: 4.0}, 0.9, {0: 1, 1: 1, 2: 1}, epsilon=0.5, max_ratio=0.95)
    assert max(got.values()) <= 0.95 and sum(got.values()) / 3 == pytest.approx(0.9)


def test_owl_outliers_by_hand():
    m = make(layers=2)
    s = discover(m)
    names = {id(p): n for n, p in m.named_parameters()}
    acts = {names[id(lin.weight)]: torch.rand(lin.in_features, generator=torch.Generator().manual_seed(i)) + 0.1
            for i, lin in enumerate(l for ls in s.layers for l in (ls.q, ls.k, ls.v, ls.o, ls.gate, ls.up, ls.down))}
    got = owl_outlier_ratios(m, None, m=2.0, structure=s, act_norms=acts)
    ls = s.layers[1]
    a = torch.cat([(l.weight.abs() * acts[names[id(l.weight)]][None, :]).flatten()
                   for l in (ls.q, ls.k, ls.v, ls.o, ls.gate, ls.up, ls.down)])
    assert got[1] == pytest.approx(100.0 * float((a > 2.0 * a.mean()).sum()) / a.numel())


def test_farms_windows():
    w = torch.randn(100, 40, generator=torch.Generator().manual_seed(0))
    e = farms_esd(w, window=2000, q_ratio=1.0, ops=15)
    assert e.numel() == 15 * 40  # 15 row starts (step 4), one 40-wide column window
    torch.testing.assert_close(farms_esd(w[:40], ops=15), esd(w[:40]).to(e.dtype))  # square: the matrix itself
    # the last window reaches the last row
    e2 = farms_esd(w, window=30, ops=2)
    assert e2.numel() == 2 * 2 * 30


@pytest.mark.parametrize("method", ["owl", "alpha", "farms"])
def test_allocate_keeps_the_weighted_ratio(method):
    m = make()
    a = allocate(m, 0.5, method, batch=ids())
    assert a.weighted_ratio == pytest.approx(0.5, abs=1e-9)
    assert len(set(round(v, 6) for v in a.ratios.values())) > 1
    assert set(a.metric) == set(a.ratios) == {0, 1, 2, 3}
    if method != "owl":
        assert a.params["epsilon"] == 0.3
        hi = max(a.metric, key=a.metric.get)
        assert a.ratios[hi] == max(a.ratios.values())  # larger α → pruned more


def test_structured_allocation_total_within_one_channel_per_layer():
    m = make()
    s = discover(m)
    cfg = PruneConfig(ratio=0.3, attn_layers="0:1", mlp_layers="0:4")
    sizes = structured_sizes(resolve_target(s, cfg))
    assert set(sizes) == {0, 1, 2, 3}
    sizes = {l: 3 * 32 * s.layers[l].intermediate_size for l in range(4)}  # MLP part only: ∝ channels
    a = allocate(m, 0.3, "alpha", sizes=sizes, structure=s)
    scores = model_scores(s, "magnitude")
    rep = prune_structure_allocated(resolve_target(s, cfg), scores, a.ratios)
    removed = [entry["removed_channels"] for entry in rep.layers]
    assert removed == [_n_remove(40, a.ratios[l]) for l in range(4)]
    assert abs(sum(removed) - 0.3 * 4 * 40) <= 4
    assert [entry["ratio"] for entry in rep.layers] == [a.ratios[l] for l in range(4)]
    assert torch.isfinite(m(input_ids=ids(), labels=ids()).loss)


def _qwen2(layers=4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=40,
                                        num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                                        max_position_embeddings=64))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("granularity,round_to", [("kv-group", None), ("query-heads", None), ("query-heads", 8)])
def test_structured_removal_counts_what_pruning_removes(arch, granularity, round_to):
    """structured_removal(l, r) is exactly the parameters the local plan removes (head steps, biases,
    round_to), at ratios on both sides of the steps."""
    ratios = {0: 0.1, 1: 0.34, 2: 0.55, 3: 0.8}
    m = make() if arch == "llama" else _qwen2()
    s = discover(m)
    cfg = PruneConfig(ratio=0.3, attn_layers="0:4", mlp_layers="1:4", granularity=granularity, round_to=round_to)
    removal = structured_removal(resolve_target(s, cfg))
    rep = prune_structure_allocated(resolve_target(s, cfg), model_scores(s, "magnitude", granularity=granularity), ratios)
    assert rep.params_before - rep.params_after == sum(removal(l, r) for l, r in ratios.items())
    assert removal(0, 0.0) == 0 and removal(1, 0.5) > removal(1, 0.3)


@pytest.mark.parametrize("method", ["owl", "alpha"])
def test_structured_allocation_matches_the_parameters_uniform_removes(method):
    """With removal=, the fit targets uniform r's removed parameters (heads come in whole steps, so the
    weighted mean ratio alone can remove more): within half of the largest step, here a KV group."""
    m = make(layers=6)
    s = discover(m)
    cfg = PruneConfig(ratio=0.3, attn_layers="0:6", mlp_layers="0:6", granularity="kv-group")
    removal = structured_removal(resolve_target(s, cfg))
    uniform = sum(removal(l, 0.3) for l in range(6))
    a = allocate(m, 0.3, method, batch=ids(), sizes=structured_sizes(resolve_target(s, cfg)), structure=s, removal=removal)
    assert a.params["matched"] == "parameters removed" and len(set(a.ratios.values())) > 1
    rep = prune_structure_allocated(resolve_target(s, cfg), model_scores(s, "magnitude"), a.ratios)
    kv_group = 4 * 8 * 32  # q, k, v rows and o columns of one KV group (n_rep = 2, head_dim 8, hidden 32)
    assert abs((rep.params_before - rep.params_after) - uniform) <= kv_group / 2
    m2 = make(layers=6)
    s2 = discover(m2)
    plain = allocate(m2, 0.3, method, batch=ids(), sizes=structured_sizes(resolve_target(s2, cfg)), structure=s2)
    assert plain.params["matched"] == "weighted mean ratio"
    # the fixture does show the problem: the weighted-mean fit removes more than uniform
    assert sum(removal(l, r) for l, r in plain.ratios.items()) - uniform > \
        abs((rep.params_before - rep.params_after) - uniform)


def test_unstructured_allocation_total():
    m = make()
    s = discover(m)
    a = allocate(m, 0.5, "owl", batch=ids(), structure=s)
    rep = unstructured_prune(m, ids(), "wanda", layer_ratios=a.ratios, structure=s)
    sizes = unstructured_sizes(s)
    rows = sum(r["shape"][0] for r in rep["layers"])  # int(C·r) loses < 1 weight per row
    assert 0 <= 0.5 * sum(sizes.values()) - rep["overall"]["zeros"] <= rows
    for layer, r in a.ratios.items():
        assert rep["per_layer"][layer] == pytest.approx(r, abs=1 / 32)


def test_global_scope_is_refused():
    m = make(layers=2)
    s = discover(m)
    with pytest.raises(ValueError, match="local"):
        prune_structure_allocated(resolve_target(s, PruneConfig(ratio=0.2, scope="global")), model_scores(s, "magnitude"),
                                  {0: 0.1})
