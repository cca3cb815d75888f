"""Structure discovery, importance and structural pruning (SPEC §4-§5)."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from moreau_pruner import (PruneConfig, UnsupportedArchitecture, count_parameters, discover, prune_model,
                           prune_structure)
from moreau_pruner.score.importance import LayerScores, model_scores, reduce_parts
from moreau_pruner.prune.plan import _n_remove
from moreau_pruner.model.structure import default_layer_range

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, max_position_embeddings=64)


def make(kind="llama", heads=4, kv=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(SMALL, num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, **kw)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**cfg))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**cfg))
    return Qwen2ForCausalLM(Qwen2Config(**cfg))


def ids(n=2, seq=10):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))


def test_discover_reads_heads_from_shapes():
    s = discover(make(heads=4, kv=2))
    assert s.num_layers == 3 and s.head_dim == 8 and s.hidden_size == 32
    ls = s.layers[0]
    assert (ls.n_heads, ls.n_kv_heads, ls.n_rep, ls.intermediate_size) == (4, 2, 2, 40)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        discover(gpt2)


def test_published_arithmetic():
    # LLaMA-7B, r = 0.25: 2752 of 11008 channels, 1024 of the 4096 q/o width = 8 heads of 128
    assert _n_remove(11008, 0.25) == 2752
    assert _n_remove(4096, 0.25) // 128 == 8
    assert default_layer_range(32) == (4, 30)
    assert default_layer_range(30) == (4, 28)


@pytest.mark.parametrize("reduction,want", [("sum", [6.0, 6.0]), ("mean", [2.0, 2.0]), ("max", [3.0, 4.0]),
                                            ("prod", [6.0, 4.0]), ("first", [1.0, 4.0])])
def test_reductions(reduction, want):
    parts = [torch.tensor([1.0, 4.0]), torch.tensor([2.0, 1.0]), torch.tensor([3.0, 1.0])]
    torch.testing.assert_close(reduce_parts(parts, reduction), torch.tensor(want))


def test_magnitude_scores_by_hand():
    m = make(heads=4, kv=2)
    s = discover(m)
    ls = s.layers[1]
    sc = model_scores(s, "magnitude")[1]
    q, k, v, o = (ls.q.weight.abs(), ls.k.weight.abs(), ls.v.weight.abs(), ls.o.weight.abs())
    unit1 = q[16:32].sum() + k[8:16].sum() + v[8:16].sum() + o[:, 16:32].sum()  # KV group 1 = query heads 2, 3
    torch.testing.assert_close(sc.attention[1], unit1)
    ch = 7
    torch.testing.assert_close(sc.mlp[ch], ls.gate.weight[ch].abs().sum() + ls.up.weight[ch].abs().sum()
                               + ls.down.weight[:, ch].abs().sum())
    qh = model_scores(s, "magnitude", granularity="query-heads")[1]
    torch.testing.assert_close(qh.attention[3], q[24:32].sum() + o[:, 24:32].sum())


def test_gqa_keeps_the_dominant_kv_group():
    """Query heads 2 and 3 (KV group 1) dominate, head 2 more than head 3.

    The correct grouping (h // n_rep) keeps group 1. Upstream LLM-Pruner's fold
    ``view(n_rep, -1).sum(0)`` pairs heads (0, 2) and (1, 3) and would keep group 0.
    """
    m = make(heads=4, kv=2)
    ls = discover(m).layers[0]
    d = 8
    with torch.no_grad():
        for h, scale in enumerate([0.01, 0.01, 10.0, 5.0]):
            ls.q.weight[h * d:(h + 1) * d] = scale
            ls.o.weight[:, h * d:(h + 1) * d] = scale
        ls.k.weight.fill_(1.0)
        ls.v.weight.fill_(1.0)
    k_rows = ls.k.weight[8:16].clone()
    s = discover(m)
    scores = model_scores(s, "magnitude")
    upstream = scores[0]  # what the wrong fold would compute from query heads
    qh = model_scores(s, "magnitude", granularity="query-heads")[0].attention
    wrong = qh.view(2, 2).sum(0)  # view(n_rep, -1).sum(0): heads (0,2) and (1,3)
    assert wrong.argmax() == 0  # the upstream fold would keep group 0
    report = prune_structure(s, scores, PruneConfig(ratio=0.5, attn_layers=(0, 1), mlp_layers=(0, 1)))
    assert report.layers[0]["kept_kv_groups"] == [1]
    assert upstream.attention.argmax() == 1
    assert torch.equal(ls.k.weight, k_rows)
    assert torch.equal(ls.q.weight, torch.full((16, 32), 10.0).index_copy(0, torch.arange(8, 16),
                                                                           torch.full((8, 32), 5.0)))


def _zeroed_reference(model, layer, o_cols=(), down_cols=()):
    """Removing a head (or channel) equals zeroing its o_proj (down_proj) input columns."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for c in o_cols:
            ref.model.layers[layer].self_attn.o_proj.weight[:, c] = 0
        for c in down_cols:
            ref.model.layers[layer].mlp.down_proj.weight[:, c] = 0
    return ref


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("granularity", ["kv-group", "query-heads"])
def test_pruning_equals_zeroing_removed_units(kind, granularity):
    m = make(kind, heads=6, kv=2, hidden_size=48)  # n_rep = 3
    x = ids()
    s = discover(m)
    scores = model_scores(s, "random", seed=3, granularity=granularity)
    cfg = PruneConfig(ratio=0.5, attn_layers=(1, 2), mlp_layers=(1, 2), granularity=granularity)
    # find what will be removed by planning on a copy
    import copy

    probe = copy.deepcopy(m)
    rep = prune_structure(discover(probe), scores, cfg)
    lay = rep.layers[1]
    d = 8
    if granularity == "kv-group":
        removed_heads = [h for h in range(6) if h // 3 not in lay["kept_kv_groups"]]
    else:
        kept = {g * 3 + j for g, keep in enumerate(lay["kept_query_heads"]) for j in keep}
        removed_heads = [h for h in range(6) if h not in kept]
    assert removed_heads
    kept_ch = set(range(40)) - set()
    ref_scores = scores[1].mlp
    n_rm = 40 - lay["intermediate_size"]
    removed_ch = torch.argsort(ref_scores, stable=True)[:n_rm].tolist()
    kept_ch -= set(removed_ch)
    assert lay["kept_channels"] == sorted(kept_ch)
    o_cols = [h * d + i for h in removed_heads for i in range(d)]
    ref = _zeroed_reference(m, 1, o_cols, removed_ch)
    prune_structure(s, scores, cfg)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    a = m.model.layers[1].self_attn
    if granularity == "query-heads":
        assert a.num_key_value_groups == len(lay["kept_query_heads"][0]) < 3
        assert m.model.layers[1].self_attn.k_proj.out_features == 16  # KV heads stay
    if kind == "qwen2":
        assert a.q_proj.bias.shape[0] == a.q_proj.out_features


def test_local_counts_and_ranges():
    m = make(heads=4, kv=4)  # MHA: a unit is one head
    res = prune_model(m, None, "magnitude", PruneConfig(ratio=0.5, attn_layers="1:3", mlp_layers="0:2"),
                      progress=False)
    widths = [(l["num_attention_heads"], l["intermediate_size"]) for l in res.report.layers]
    assert widths == [(4, 20), (2, 20), (2, 40)]
    assert res.report.params_after == count_parameters(m) < res.report.params_before


def test_never_removes_every_unit():
    m = make(heads=2, kv=1)  # one KV group per layer
    res = prune_model(m, None, "magnitude", PruneConfig(ratio=0.99, attn_layers="0:3", mlp_layers="0:3"),
                      progress=False)
    assert all(l["num_attention_heads"] == 2 and l["intermediate_size"] >= 1 for l in res.report.layers)


def test_round_to_keeps_multiples():
    m = make()
    res = prune_model(m, None, "magnitude", PruneConfig(ratio=0.3, attn_layers="0:3", mlp_layers="0:3", round_to=8),
                      progress=False)
    assert all(l["intermediate_size"] % 8 == 0 for l in res.report.layers)


def test_global_removes_about_ratio_of_unit_weights():
    m = make(heads=4, kv=4)
    before = count_parameters(m)
    res = prune_model(m, None, "magnitude", PruneConfig(ratio=0.3, scope="global", attn_layers="0:3",
                                                        mlp_layers="0:3"), progress=False)
    unit_weights = 3 * (4 * 8 * 32 * 4 + 40 * 3 * 32)
    removed = before - res.report.params_after
    assert 0.3 * unit_weights <= removed < 0.3 * unit_weights + 4 * 8 * 32 * 4  # at most one unit over


@pytest.mark.parametrize("method", ["moreau", "taylor", "magnitude", "random"])
def test_every_method_prunes_and_runs(method):
    m = make("mistral")
    x = ids()
    from moreau_pruner import MoreauConfig

    res = prune_model(m, x, method, PruneConfig(ratio=0.5, attn_layers="0:3", mlp_layers="0:3"),
                      moreau=MoreauConfig(iters=2), progress=False)
    assert res.report.params_after < res.report.params_before
    assert torch.isfinite(m(x).logits).all()
    assert (res.estimate is not None) == (method == "moreau")


@pytest.mark.parametrize("cfg,msg", [(dict(ratio=0.0), "ratio"), (dict(ratio=1.0), "ratio"),
                                     (dict(attn_layers="2:9"), "outside"), (dict(mlp_layers="x:1"), "START:END"),
                                     (dict(scope="both"), "scope"), (dict(granularity="heads"), "granularity")])
def test_bad_prune_config(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        PruneConfig(**cfg).layer_ranges(3)


def test_scores_that_do_not_match_are_rejected():
    m = make()
    s = discover(m)
    bad = [LayerScores(i, torch.ones(3), torch.ones(40)) for i in range(3)]
    with pytest.raises(ValueError, match="do not match"):
        prune_structure(s, bad, PruneConfig(ratio=0.5))
    nan = [LayerScores(i, torch.full((2,), float("nan")), torch.ones(40)) for i in range(3)]
    with pytest.raises(ValueError, match="NaN"):
        prune_structure(s, nan, PruneConfig(ratio=0.5))


@pytest.mark.parametrize("granularity", ["kv-group", "query-heads"])
@pytest.mark.parametrize("ranges", [("0:3", "0:3"), ("1:3", "0:2")])
def test_ratio_for_params_local_reaches_the_target_by_less_than_one_step(granularity, ranges):
    from moreau_pruner import ratio_for_params

    m = make(heads=4, kv=2)
    s = discover(m)
    before = count_parameters(m)
    cfg = PruneConfig(attn_layers=ranges[0], mlp_layers=ranges[1], granularity=granularity)
    step = 3 * 32 * len(range(*map(int, ranges[1].split(":"))))  # one MLP channel in every MLP layer
    for target in (before - 1, before - 1000, before - 3000):  # small enough that no head goes (r < 0.5)
        r = ratio_for_params(s, target, cfg)
        after = prune_model(make(heads=4, kv=2), None, "magnitude", PruneConfig(**{**cfg.__dict__, "ratio": r}),
                            progress=False).report.params_after
        assert target - step < after <= target  # the first step that reaches the target
        assert r == round(r, 9)  # rounded to a short decimal


def test_ratio_for_params_global_uses_the_scores():
    from moreau_pruner import ratio_for_params
    from moreau_pruner.score.importance import model_scores

    m = make(heads=4, kv=4)
    s = discover(m)
    cfg = PruneConfig(scope="global", attn_layers="0:3", mlp_layers="0:3", granularity="query-heads")
    scores = model_scores(s, "magnitude", None, granularity="query-heads")
    target = count_parameters(m) - 5000
    r = ratio_for_params(s, target, cfg, scores)
    after = prune_structure(s, scores, PruneConfig(**{**cfg.__dict__, "ratio": r})).params_after
    assert target - 4 * 8 * 32 * 2 < after <= target  # within the largest unit (a query head of every layer's
    with pytest.raises(ValueError, match="scores"):  # rank is 2*8*32 per head; channels are 96)
        ratio_for_params(s, target, cfg)


@pytest.mark.parametrize("target,msg", [(10 ** 9, "not below"), (100, "out of reach")])
def test_ratio_for_params_unreachable(target, msg):
    from moreau_pruner import ratio_for_params

    s = discover(make())
    with pytest.raises(ValueError, match=msg):
        ratio_for_params(s, target, PruneConfig(attn_layers="0:3", mlp_layers="0:3"))


def test_all_and_open_ended_layer_ranges():
    assert PruneConfig(attn_layers="all", mlp_layers="ALL").layer_ranges(3) == (range(0, 3), range(0, 3))
    assert PruneConfig(attn_layers="all", uniform=True).layer_ranges(3) == (range(0, 3), range(0, 3))
    assert PruneConfig(attn_layers="1:", mlp_layers=":2").layer_ranges(3) == (range(1, 3), range(0, 2))
    with pytest.raises(ValueError, match="outside"):
        PruneConfig(attn_layers="3:").layer_ranges(3)
    assert PruneConfig(attn_layers="published", mlp_layers="published-to-end").layer_ranges(30) == (range(4, 28),
                                                                                                range(4, 30))
    assert PruneConfig(attn_layers="published-to-end").layer_ranges(32)[0] == range(4, 32)
