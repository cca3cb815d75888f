"""Iterative pruning (``prune_model(rounds=K)``, ``moreau-prune --rounds K``)."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moreau_pruner import MoreauConfig, PruneConfig, compute_scores, count_parameters, discover, prune_model, prune_structure
from moreau_pruner.prune.rounds import share as _share

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, max_position_embeddings=64,
             head_dim=8)


def make(kind="llama", heads=8, kv=2, seed=0):
    torch.manual_seed(seed)
    cfg = dict(SMALL, num_attention_heads=heads, num_key_value_heads=kv)
    return LlamaForCausalLM(LlamaConfig(**cfg)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**cfg))


def batch(n=4, seq=12):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(3))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


MOREAU = MoreauConfig(mode="paper", iters=3, avg_last=2)


@pytest.mark.parametrize("method", ["moreau", "taylor", "magnitude", "random"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_one_round_is_one_shot(method, scope):
    cfg = PruneConfig(ratio=0.5, attn_layers=(0, 3), mlp_layers=(0, 3), scope=scope)
    a, b = make(), make()
    ids = batch()
    res = prune_model(a, ids, method, cfg, moreau=MOREAU, rounds=1, progress=False)
    s = discover(b)
    scores, _, _ = compute_scores(b, ids, method, cfg, MOREAU, progress=False, structure=s)
    rep = prune_structure(s, scores, cfg)
    assert res.report.layers == rep.layers and res.report.params_after == rep.params_after
    assert torch.equal(logits(a, ids), logits(b, ids))


@pytest.mark.parametrize("granularity,kind,method", [("kv-group", "llama", "taylor"), ("query-heads", "llama", "taylor"),
                                                     ("kv-group", "qwen2", "taylor"), ("query-heads", "qwen2", "random"),
                                                     ("kv-group", "llama", "moreau")])
def test_rounds_reach_the_one_shot_size(granularity, kind, method):
    heads, kv = (8, 4) if granularity == "kv-group" else (8, 2)
    cfg = PruneConfig(ratio=0.5, attn_layers=(0, 3), mlp_layers=(1, 3), granularity=granularity)
    ids = batch()
    one = prune_model(make(kind, heads, kv), ids, method, cfg, moreau=MOREAU, progress=False).report
    for k in (2, 3):
        model = make(kind, heads, kv)
        rep = prune_model(model, ids, method, cfg, moreau=MOREAU, rounds=k, progress=False).report
        assert rep.rounds == k
        assert rep.params_after == one.params_after == count_parameters(model)
        assert [l["num_attention_heads"] for l in rep.layers] == [l["num_attention_heads"] for l in one.layers]
        assert [l["intermediate_size"] for l in rep.layers] == [l["intermediate_size"] for l in one.layers]
        assert [l["removed_channels"] for l in rep.layers] == [l["removed_channels"] for l in one.layers]


def test_round_report_indices_refer_to_the_original_model():
    dense = make(heads=8, kv=4)
    model = copy.deepcopy(dense)
    cfg = PruneConfig(ratio=0.6, attn_layers=(0, 3), mlp_layers=(0, 3))
    rep = prune_model(model, batch(), "taylor", cfg, rounds=3, progress=False).report
    d = 8
    for i, entry in enumerate(rep.layers):
        new, old = model.model.layers[i], dense.model.layers[i]
        ch = torch.tensor(entry["kept_channels"])
        assert torch.equal(new.mlp.gate_proj.weight, old.mlp.gate_proj.weight[ch])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, ch])
        kv_rows = torch.tensor([g * d + j for g in entry["kept_kv_groups"] for j in range(d)])
        assert torch.equal(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight[kv_rows])
        assert entry["removed_kv_heads"] == 4 - len(entry["kept_kv_groups"])
        assert entry["removed_channels"] == 40 - len(entry["kept_channels"])


def test_rounds_rescore_the_partly_pruned_model():
    # the second round scores the model the first round left: its scores have the pruned widths
    cfg = PruneConfig(ratio=0.5, attn_layers=(0, 3), mlp_layers=(0, 3))
    res = prune_model(make(heads=8, kv=4), batch(), "taylor", cfg, rounds=2, progress=False)
    mid = 40 - _share(20, 1, 2)
    assert all(sc.mlp.numel() == mid for sc in res.scores)
    assert all(l["intermediate_size"] == 20 for l in res.report.layers)


def test_global_rounds_keep_the_target_size():
    cfg = PruneConfig(ratio=0.4, attn_layers=(0, 3), mlp_layers=(0, 3), scope="global")
    one = prune_model(make(heads=8, kv=4), batch(), "magnitude", cfg, progress=False).report
    rep = prune_model(make(heads=8, kv=4), batch(), "magnitude", cfg, rounds=3, progress=False).report
    # greedy removal overshoots by less than one unit per round
    biggest_unit = 2 * (2 * 8 * 32) + 2 * 8 * 32
    assert abs(rep.params_after - one.params_after) <= 3 * biggest_unit
    assert rep.params_after < count_parameters(make(heads=8, kv=4))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_rounds(bad):
    with pytest.raises(ValueError, match="rounds"):
        prune_model(make(), batch(), "magnitude", PruneConfig(ratio=0.2), rounds=bad, progress=False)


def test_share_spreads_the_removal():
    assert [_share(10, k, 3) for k in (1, 2, 3)] == [3, 7, 10]
    assert [_share(1, k, 4) for k in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert _share(0, 1, 2) == 0


def test_uniform_rounds_stay_uniform():
    cfg = PruneConfig(ratio=0.5, attn_layers=(0, 3), mlp_layers=(0, 3), uniform=True)
    one = prune_model(make(heads=8, kv=4), batch(), "taylor", cfg, progress=False).report
    model = make(heads=8, kv=4)
    rep = prune_model(model, batch(), "taylor", cfg, rounds=2, progress=False).report
    assert rep.params_after == one.params_after and rep.uniform == one.uniform is not None
    assert len({(l["num_attention_heads"], l["intermediate_size"]) for l in rep.layers}) == 1
    assert model.config.intermediate_size == rep.layers[0]["intermediate_size"]
