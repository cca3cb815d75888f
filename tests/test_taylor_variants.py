"""LLM-Pruner Taylor variants for the structured path (moreau_pruner.score.taylor)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner import PruneConfig, discover, prune_structure
from moreau_pruner.estimate import gradient
from moreau_pruner.estimate.gradients import fisher_diagonal
from moreau_pruner.score.importance import model_scores
from moreau_pruner.score.taylor import VARIANTS, effective_gradients, taylor_scores

ALL = PruneConfig(ratio=0.25, attn_layers="0:2", mlp_layers="0:2")


def make(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64))


def ids(n=3, seq=8):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))


def grads_by_hand(m, batch):
    """Batch gradient g and per-row gradients g_n of the MLP weights of layer 1 (plain autograd)."""
    mlp = m.model.layers[1].mlp
    ws = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]

    def grad(x):
        m.zero_grad()
        m(input_ids=x, labels=x).loss.backward()
        return [w.grad.clone() for w in ws]

    g = grad(batch)
    per = [grad(batch[j:j + 1]) for j in range(batch.shape[0])]
    m.zero_grad()
    fisher = [sum(p[i] ** 2 for p in per) / len(per) for i in range(3)]
    return [w.detach() for w in ws], g, fisher


def channel(ws, sal, c, vectorize=False):
    """MLP channel c's score from per-weight salience: gate row c + up row c + down column c."""
    parts = [sal[0][c], sal[1][c], sal[2][:, c]]
    return sum(p.sum().abs() if vectorize else p.abs().sum() for p in parts)


def test_fisher_is_mean_of_squared_per_sample_gradients():
    m = make()
    batch = ids()
    ws, _, fisher = grads_by_hand(m, batch)
    got = fisher_diagonal(m, batch, ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(got["model.layers.1.mlp.gate_proj.weight"], fisher[0], rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"], fisher[2], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_scores_by_hand(variant):
    m = make()
    batch = ids()
    ws, g, f = grads_by_hand(m, batch)
    if variant in ("param_first", "vectorize"):
        sal = [w * gi for w, gi in zip(ws, g)]
    elif variant == "param_second":
        sal = [w * fi * w for w, fi in zip(ws, f)]
    else:
        sal = [w * gi - 0.5 * w * fi * w for w, gi, fi in zip(ws, g, f)]
    scores, info = taylor_scores(m, batch, variant, ALL)
    assert info["variant"] == variant
    for c in (0, 7, 39):
        want = channel(ws, sal, c, vectorize=variant == "vectorize")
        torch.testing.assert_close(scores[1].mlp[c], want, rtol=1e-4, atol=1e-12)


def test_param_first_is_the_taylor_baseline():
    m = make()
    batch = ids()
    s = discover(m)
    names = [n for n, _ in m.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    base = model_scores(s, "taylor", gradient(m, batch, names))
    got, _ = taylor_scores(m, batch, "param_first", ALL, structure=s)
    for a, b in zip(base, got):
        torch.testing.assert_close(a.mlp, b.mlp)
        torch.testing.assert_close(a.attention, b.attention)


def test_effective_gradients_need_their_inputs():
    m = make()
    with pytest.raises(ValueError, match="Fisher"):
        effective_gradients(m, "param_mix", {}, None)
    with pytest.raises(ValueError, match="variant"):
        effective_gradients(m, "param_third", {}, {})


@pytest.mark.parametrize("variant", ["param_mix", "vectorize"])
def test_scores_feed_prune_structure_unchanged(variant):
    m = make()
    batch = ids()
    s = discover(m)
    cfg = PruneConfig(ratio=0.25, attn_layers="0:2", mlp_layers="0:2", granularity="query-heads")
    scores, _ = taylor_scores(m, batch, variant, cfg, structure=s)
    rep = prune_structure(s, scores, cfg)
    assert rep.params_after < rep.params_before
    assert [ls.intermediate_size for ls in s.layers] == [30, 30]
    assert torch.isfinite(m(input_ids=batch, labels=batch).loss)
