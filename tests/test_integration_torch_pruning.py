"""MoreauImportance / TaylorImportance in Torch-Pruning's MetaPruner on tiny random models (no hub):
the MLP channels prune_model keeps, hidden-size pruning, Torch-Pruning's own GQA head pruning (why it
is refused) and a clear refusal of attention heads."""
import copy
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning", reason="needs Torch-Pruning (scripts/setup.sh installs it)")

from moreau_pruner import MoreauConfig, PruneConfig, prune_model  # noqa: E402
from moreau_pruner.integrations.torch_pruning import (MoreauImportance, TaylorImportance,  # noqa: E402
                                                      attention_modules)

from golden import tiny_model  # noqa: E402

BATCH = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
CONFIG = MoreauConfig(mode="reference", iters=2)


def meta_prune(model, importance, ratio=0.25):
    """MLP channels only: attention, embeddings, the head and down_proj (hidden size) are not roots."""
    ignored = [model.lm_head, model.model.embed_tokens, *attention_modules(model),
               *(layer.mlp.down_proj for layer in model.model.layers)]
    pruner = tp.pruner.MetaPruner(model, example_inputs=BATCH, importance=importance, pruning_ratio=ratio,
                                  ignored_layers=ignored, root_module_types=[nn.Linear],
                                  output_transform=lambda out: out.logits)
    pruner.step()
    return model


def every_mlp(ratio=0.25) -> PruneConfig:
    """Every layer's MLP (and the last layer's attention, which the comparison ignores: the scores come
    from the dense model either way)."""
    return PruneConfig(ratio=ratio, attn_layers="3:4", mlp_layers="0:4")


@pytest.mark.parametrize("kind,method", [("llama", "moreau"), ("qwen2", "moreau"), ("mistral", "taylor")])
def test_metapruner_keeps_the_mlp_channels_prune_model_keeps(kind, method):
    model = tiny_model(kind)
    want = copy.deepcopy(model)
    prune_model(want, BATCH, method, every_mlp(), moreau=CONFIG, progress=False)
    imp = MoreauImportance(model, BATCH, CONFIG) if method == "moreau" else TaylorImportance(model, BATCH)
    meta_prune(model, imp)
    for a, b in zip(model.model.layers, want.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(a.mlp, name).weight, getattr(b.mlp, name).weight), name
    if method == "moreau":
        assert imp.result is not None and imp.result.grads


def test_moreau_and_taylor_choose_differently():
    """The two importances are not the same score under another name."""
    a, b = tiny_model("llama"), tiny_model("llama")
    meta_prune(a, MoreauImportance(a, BATCH, MoreauConfig(mode="paper", iters=4, std=0.5)), ratio=0.5)
    meta_prune(b, TaylorImportance(b, BATCH), ratio=0.5)
    assert any(not torch.equal(x.mlp.gate_proj.weight, y.mlp.gate_proj.weight)
               for x, y in zip(a.model.layers, b.model.layers))


def test_attention_heads_are_refused_with_the_reason():
    model = tiny_model("mistral")
    imp = MoreauImportance(model, BATCH, CONFIG)
    attn = model.model.layers[0].self_attn
    heads = [(SimpleNamespace(target=SimpleNamespace(module=attn.k_proj), handler=tp.prune_linear_out_channels),
              list(range(16)))]
    with pytest.raises(ValueError, match="grouped-query heads .* ignores the q/o weights"):
        imp(heads)
    o_cols = [(SimpleNamespace(target=SimpleNamespace(module=attn.o_proj), handler=tp.prune_linear_in_channels),
               list(range(48)))]
    with pytest.raises(ValueError, match="prune attention with moreau_pruner.prune_model"):
        imp(o_cols)
    assert imp.result is None  # refused before any estimate


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="(?i)gpt2"):
        MoreauImportance(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)), BATCH)


# --- Torch-Pruning's own attention-head pruning on a grouped-query model --------------------------

def gqa_layer_model(attention: str = "sdpa", heads: int = 8):
    """One decoder layer, ``heads`` query heads in 2 KV groups, head_dim 4 (with 8: query heads 0-3 share KV
    head 0, 4-7 KV head 1); ``attention``: the transformers attention implementation Torch-Pruning traces."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=4 * heads, intermediate_size=8, num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=2, head_dim=4, max_position_embeddings=64, tie_word_embeddings=False,
                      attn_implementation=attention)
    return LlamaForCausalLM(cfg).eval()


@contextmanager
def rotary_untraced():
    """Trace LLaMA attention without its rotary embedding. Torch-Pruning 1.6 cannot build the attention
    group through it: ``rotate_half`` (slice a head into halves, concatenate them swapped) closes a loop in
    its two-way dependency graph whose slice/concat index maps shift the channel indices on every turn, so
    ``_fix_dependency_graph_non_recursive`` never meets the same indices twice and never ends
    (test_attention_group_runs_away_through_the_rotary_embedding). Rotary only pairs channels inside one
    head, so the graph traced without it has the same heads and the same layers in each group."""
    import transformers.models.llama.modeling_llama as modeling

    old = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = old


class _RunAway(Exception):
    pass


def test_attention_group_runs_away_through_the_rotary_embedding(monkeypatch):
    """Why Torch-Pruning's attention group of a LLaMA does not finish (seen as a hang of minutes even on a
    one-layer model): the indices it propagates grow past every layer's width, so the loop, which stops
    only on indices it has seen, cannot end. Without the rotary trace the same group builds at once."""
    model = gqa_layer_model()
    x = torch.randint(0, 32, (1, 6))
    widest = max(m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Linear))
    add = tp.dependency.group.Group.add_dep

    def bounded(self, dep, idxs):
        top = max(int(getattr(i, "idx", i)) for i in idxs)  # plain or Torch-Pruning's _HybridIndex
        if top >= 10 * widest:
            raise _RunAway(f"index {top} on {dep.target} after {len(self._group)} dependencies")
        return add(self, dep, idxs)

    monkeypatch.setattr(tp.dependency.group.Group, "add_dep", bounded)
    k_proj = model.model.layers[0].self_attn.k_proj
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, output_transform=lambda out: out.logits)
    with pytest.raises(_RunAway):
        graph.get_pruning_group(k_proj, tp.prune_linear_out_channels, idxs=list(range(8)))
    with rotary_untraced():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, output_transform=lambda out: out.logits)
    group = graph.get_pruning_group(k_proj, tp.prune_linear_out_channels, idxs=list(range(8)))
    attn = model.model.layers[0].self_attn
    assert {dep.target.module for dep, _ in group} >= {attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj}


def surviving_heads(now, before, head_dim=4):
    """The original query heads whose q_proj rows are still there (a zeroed head matches every zeroed one)."""
    blocks = now.reshape(-1, head_dim, now.shape[1])
    return [h for h, old in enumerate(before.reshape(-1, head_dim, before.shape[1]))
            if any(torch.equal(b, old) for b in blocks)]


def zero_heads(weight, head_dim=4) -> int:
    return int((weight.reshape(-1, head_dim * weight.shape[1]) == 0).all(1).sum())


WORTHLESS = (0, 4)  # one query head per KV group


def planted_gqa_model(attention: str = "sdpa"):
    """Query heads 0 and 4 are worthless (zero q rows and o columns); key/value channels 0 and 4 are
    large. Torch-Pruning's reshape of KV-width scores into 8 "query heads" of one channel credits those
    channels to heads 0 and 4."""
    model = gqa_layer_model(attention)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for h in WORTHLESS:
            attn.q_proj.weight[4 * h:4 * h + 4] = 0
            attn.o_proj.weight[:, 4 * h:4 * h + 4] = 0
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[[0, 4]] *= 10
    return model


def head_pruner(model, importance, ratio=0.25):
    """Torch-Pruning's GQA head pruning as documented (num_heads per projection, prune_num_heads), one query
    head of four per KV group, attention only; traced without the rotary embedding so the group builds."""
    attn = model.model.layers[0].self_attn
    ignored = [model.lm_head, model.model.embed_tokens, *model.model.layers[0].mlp.children()]
    with rotary_untraced():
        return tp.pruner.MetaPruner(model, example_inputs=torch.randint(0, 32, (1, 6)), importance=importance,
                                    pruning_ratio=ratio, head_pruning_ratio=ratio, prune_num_heads=True,
                                    prune_head_dims=False, num_heads={attn.q_proj: attn.q_proj.out_features // 4,
                                                                      attn.k_proj: 2, attn.v_proj: 2},
                                    ignored_layers=ignored, root_module_types=[nn.Linear],
                                    output_transform=lambda out: out.logits)


class RecordedMagnitude(tp.importance.GroupMagnitudeImportance):
    """Torch-Pruning's L1 group importance, remembering the width of each score vector it returned."""

    def __init__(self):
        super().__init__(p=1)
        self.widths = []

    def __call__(self, group):
        imp = super().__call__(group)
        self.widths.append(len(imp))
        return imp


def test_torch_pruning_ranks_sdpa_gqa_query_heads_from_kv_width_scores():
    """With transformers' default (SDPA) attention Torch-Pruning scores the attention group at the key/value
    width and keeps both worthless query heads; traced with eager attention (repeat_kv) it scores at the query
    width and drops them; prune_model keeps the useful heads; MoreauImportance refuses the group."""
    useful = [h for h in range(8) if h not in WORTHLESS]
    before = gqa_layer_model().model.layers[0].self_attn.q_proj.weight.detach().clone()
    runs = {}
    for attention in ("sdpa", "eager"):
        model, imp = planted_gqa_model(attention), RecordedMagnitude()
        head_pruner(model, imp).step()
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.shape == (24, 32) and attn.k_proj.weight.shape == (8, 32)  # 1 head of 4 per group
        runs[attention] = imp.widths, zero_heads(attn.q_proj.weight)
    assert runs["sdpa"] == ([8], 2)  # KV-width scores (k_proj: 8 rows, q_proj: 32); both zeroed heads kept
    assert runs["eager"] == ([32], 0)  # query-width scores; the zeroed heads are the ones removed

    ours = planted_gqa_model()
    prune_model(ours, BATCH % 32, "moreau", PruneConfig(ratio=0.25, attn_layers="0:1", mlp_layers="0:1",
                                                          granularity="query-heads"), moreau=CONFIG, progress=False)
    assert surviving_heads(ours.model.layers[0].self_attn.q_proj.weight, before) == useful

    model = planted_gqa_model()
    with pytest.raises(ValueError, match="grouped-query heads"):
        head_pruner(model, MoreauImportance(model, BATCH % 32, CONFIG)).step()


def hidden_size_pruner(model, importance, ratio=0.25):
    """Hidden size (embedding channels) only: q/k/v, gate/up and the head are not roots, so the one group
    left is the residual stream (embedding, o_proj and down_proj rows, every layer's input columns, norms)."""
    ignored = [model.lm_head, *(m for layer in model.model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj))]
    return tp.pruner.MetaPruner(model, example_inputs=BATCH, importance=importance, pruning_ratio=ratio,
                                ignored_layers=ignored, root_module_types=[nn.Linear, nn.Embedding],
                                output_transform=lambda out: out.logits)


def residual_scores(model, grads) -> torch.Tensor:
    """Σ|W ⊙ Ĝ| per hidden channel over the layers that read the residual stream (columns of q/k/v,
    gate/up and the head) and those that write it (rows of o_proj and down_proj)."""
    params = {id(p): n for n, p in model.named_parameters()}

    def taylor(layer):
        return (layer.weight.detach() * grads[params[id(layer.weight)]]).abs()

    total = taylor(model.lm_head).sum(0)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            total = total + taylor(reader).sum(0)
        total = total + taylor(attn.o_proj).sum(1) + taylor(mlp.down_proj).sum(1)
    return total


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hidden_size_pruning_with_moreau_importance(kind):
    """One group, scored Σ|W ⊙ Ĝ| over its linear layers (the tied head's Ĝ is the embedding's); the 36
    best of 48 channels are kept everywhere and the model still computes."""
    model = tiny_model(kind)
    before = model.model.embed_tokens.weight.detach().clone()
    scores = []

    class Recorded(MoreauImportance):
        def __call__(self, group):
            scores.append(super().__call__(group))
            return scores[-1]

    imp = Recorded(model, BATCH, CONFIG, group_reduction="sum", normalizer=None)
    groups = list(hidden_size_pruner(model, imp).step(interactive=True))
    assert len(groups) == len(scores) == 1
    want = residual_scores(model, imp.result.grads)
    torch.testing.assert_close(scores[0], want, rtol=1e-5, atol=1e-7)
    keep = torch.sort(torch.topk(want, 36).indices).values
    groups[0].prune()
    assert torch.equal(model.model.embed_tokens.weight, before[:, keep])
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.in_features == layer.mlp.down_proj.out_features == 36
        assert layer.input_layernorm.weight.shape == (36,)
    assert model.lm_head.in_features == 36
    with torch.no_grad():
        logits = model(BATCH).logits
    assert logits.shape == (4, 16, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_torch_pruning_skips_gqa_heads_when_the_kv_width_is_covered(attention):
    """4 query heads in 2 KV groups, one removed per group: the 8 query-channel indices Torch-Pruning maps
    channel for channel onto k/v cover their whole width, its over-pruning check refuses the group, and
    nothing is pruned, silently."""
    model = gqa_layer_model(attention, heads=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_pruner(model, tp.importance.GroupMagnitudeImportance(p=1), ratio=0.5).step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
