"""Unstructured / N:M pruning (moreau_pruner.unstructured.prune): metrics, masks, the driver."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner import MoreauConfig
from moreau_pruner.estimate import gradients, loop
from moreau_pruner.estimate import MoreauResult
from moreau_pruner.unstructured.prune import (activation_norms, metric_gblm, metric_magnitude, metric_moreau, metric_wanda,
                                        nm_mask, per_sample_gradient_norms, prunable_linears, relax_mask, row_mask,
                                        unstructured_prune)


def make(seed=0, layers=2):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64))


def ids(n=3, seq=8):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))


W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.0, -1.0, 2.0]])


def test_metrics_by_hand():
    g = torch.tensor([[2.0, 1.0, -1.0, 0.5], [4.0, 3.0, 1.0, -1.0]])
    act = torch.tensor([1.0, 2.0, 0.5, 0.25])
    torch.testing.assert_close(metric_magnitude(W), W.abs())
    torch.testing.assert_close(metric_moreau(W, g), torch.tensor([[2.0, 2.0, 3.0, 2.0], [2.0, 0.0, 1.0, 2.0]]))
    torch.testing.assert_close(metric_wanda(W, act), torch.tensor([[1.0, 4.0, 1.5, 1.0], [0.5, 0.0, 0.5, 0.5]]))
    gn = torch.tensor([[10.0, 0.0, 1.0, 2.0], [0.0, 5.0, 2.0, 1.0]])
    want = torch.tensor([[1 + 10.0, 4 + 0.0, 1.5 + 3.0, 1 + 8.0], [0.5 + 0.0, 0.0, 0.5 + 2.0, 0.5 + 2.0]])
    torch.testing.assert_close(metric_gblm(W, act, gn), want)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 2)
        self.lin = nn.Linear(2, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]))

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


def test_activation_norms_by_hand():
    m = Tiny()
    batch = torch.tensor([[0, 1], [2, 3]])  # tokens (1,0) (2,1) | (0,3) (1,1)
    got = activation_norms(m, batch, {"lin": m.lin}, micro_batch_size=1)["lin"]
    want = torch.tensor([(1 + 4 + 0 + 1) / 2, (0 + 1 + 9 + 1) / 2]).sqrt()  # Σ x² over tokens / n sequences
    torch.testing.assert_close(got, want)


def test_row_mask_is_exact_per_row():
    metric = torch.rand(7, 23, generator=torch.Generator().manual_seed(0))
    for r in (0.0, 0.1, 0.5, 0.77):
        mask = row_mask(metric, r)
        assert (mask.sum(1) == int(23 * r)).all()
        if int(23 * r):  # the masked ones are the smallest of their row
            assert (metric.masked_fill(~mask, -1).amax(1) <= metric.masked_fill(mask, 2).amin(1)).all()
    torch.testing.assert_close(row_mask(W.abs(), 0.5), torch.tensor([[True, True, False, False],
                                                                       [True, True, False, False]]))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exact_per_group(n, m):
    metric = torch.rand(5, 32, generator=torch.Generator().manual_seed(3))
    mask = nm_mask(metric, n, m)
    assert (mask.view(5, 32 // m, m).sum(2) == n).all()
    groups = metric.view(5, -1, m)
    gm = mask.view(5, -1, m)
    assert (groups.masked_fill(~gm, -1).amax(2) <= groups.masked_fill(gm, 2).amin(2)).all()


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.rand(2, 8), 4, 4)


def test_keep_low_ratio_is_seeded():
    mask = row_mask(torch.rand(10, 40, generator=torch.Generator().manual_seed(0)), 0.5)
    a = relax_mask(mask.clone(), 0.1, torch.Generator().manual_seed(5))
    b = relax_mask(mask.clone(), 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert int(mask.sum()) - int(a.sum()) == int(200 * 0.1)
    assert not (a & ~mask).any()  # only masked entries are re-enabled


def test_gblm_gradient_norms_by_hand():
    m = make()
    batch = ids(3)
    name = "model.layers.0.mlp.down_proj.weight"
    per = []
    for j in range(3):
        m.zero_grad()
        m(input_ids=batch[j:j + 1], labels=batch[j:j + 1]).loss.backward()
        per.append(dict(m.named_parameters())[name].grad.clone())
    m.zero_grad()
    l1 = per_sample_gradient_norms(m, batch, [name], "l1", 100.0)[name]
    l2 = per_sample_gradient_norms(m, batch, [name], "l2", 100.0)[name]
    torch.testing.assert_close(l1, sum((100 * g).abs() for g in per), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2, sum((100 * g) ** 2 for g in per).sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
def test_driver_per_row_sparsity_and_report(method):
    m = make()
    r = 0.4
    rep = unstructured_prune(m, ids(), method, sparsity=r)
    for name, _, lin in prunable_linears(m):
        cols = lin.weight.shape[1]
        assert ((lin.weight == 0).sum(1) == int(cols * r)).all(), name
    row = rep["layers"][0]
    assert row["zeros"] == row["masked"] and row["sparsity"] == row["zeros"] / row["numel"]
    assert set(rep["per_layer"]) == {0, 1}
    assert abs(rep["overall"]["sparsity"] - r) < 0.05
    assert m.model.embed_tokens.weight.ne(0).all()  # embeddings untouched by default


def test_driver_layer_ratios_and_nm():
    m = make()
    rep = unstructured_prune(m, None, "magnitude", sparsity=0.5, layer_ratios={0: 0.25, 1: 0.75})
    assert rep["per_layer"][0] < 0.3 < 0.7 < rep["per_layer"][1]
    m = make()
    rep = unstructured_prune(m, ids(), "wanda", nm=(2, 4))
    for _, _, lin in prunable_linears(m):
        z = (lin.weight == 0).view(lin.weight.shape[0], -1, 4).sum(2)
        assert (z == 2).all()
    assert rep["overall"]["sparsity"] == 0.5
    with pytest.raises(ValueError, match="layer_ratios"):
        unstructured_prune(make(), ids(), "wanda", nm=(2, 4), layer_ratios={0: 0.5})


def test_include_embeddings_prunes_the_published_set():
    m = make()
    rep = unstructured_prune(m, None, "magnitude", sparsity=0.5, include_embeddings=True)
    names = [row["name"] for row in rep["layers"]]
    assert "model.embed_tokens.weight" in names and names[-1] in ("lm_head.weight", "model.embed_tokens.weight")
    assert (m.model.embed_tokens.weight == 0).float().mean() == 0.5
    with pytest.raises(ValueError, match="activation"):
        unstructured_prune(make(), ids(), "wanda", include_embeddings=True)


def test_moreau_uses_the_estimator_unchanged(monkeypatch):
    """One call of the estimate (the structured path's, strategy picked as there), scoring exactly the
    pruned weights; its Ĝ drives the mask."""
    calls = []
    real = loop.estimate

    def spy(model, batch, config=None, score=None, **kw):
        calls.append((config, list(score), kw["strategy"]))
        return real(model, batch, config, score=score, **kw)

    monkeypatch.setattr(loop, "estimate", spy)
    m = make()
    cfg = MoreauConfig(iters=2, avg_last=2)
    rep = unstructured_prune(m, ids(), "moreau", sparsity=0.5, moreau=cfg, progress=False)
    assert len(calls) == 1 and calls[0][0] is cfg and calls[0][2] == "auto"
    assert calls[0][1] == [name for name, _, _ in prunable_linears(m)]
    assert len(rep["moreau"]["log"]) == 2

    # with a known Ĝ the mask is the |Ĝ⊙W| mask: Ĝ_ij = (C - j) / |W_ij| makes the metric decrease
    # along each row, so the last k columns go (magnitude would pick others)
    def fake(model, batch, config=None, score=None, **kw):
        params = dict(model.named_parameters())
        out = {}
        for n in score:
            w = params[n].detach()
            out[n] = torch.arange(w.shape[1], 0, -1, dtype=torch.float32)[None, :] / w.abs()
        return MoreauResult(grads=out, config=config)

    monkeypatch.setattr(loop, "estimate", fake)
    m = make()
    unstructured_prune(m, ids(), "moreau", sparsity=0.5, progress=False)
    w = m.model.layers[1].mlp.up_proj.weight
    assert (w[:, 16:] == 0).all() and (w[:, :16] != 0).all()


@pytest.mark.slow
def test_smollm2_moreau_unstructured_with_alpha_allocation(smollm2):
    from moreau_pruner.prune.allocation import allocate

    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 20
    row = torch.tensor(tok(text)["input_ids"][:32])
    batch = torch.stack([row, row.roll(5)])
    alloc = allocate(model, 0.5, "alpha")
    assert abs(alloc.weighted_ratio - 0.5) < 1e-9 and len(alloc.ratios) == model.config.num_hidden_layers
    rep = unstructured_prune(model, batch, "moreau", layer_ratios=alloc.ratios,
                             moreau=MoreauConfig(iters=2, avg_last=2), progress=False)
    assert abs(rep["overall"]["sparsity"] - 0.5) < 0.01
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss
    assert torch.isfinite(loss)


def _sequential_by_definition(model, batch, method, r, gnorms=None):
    """The papers' loop written with the one-pass function: layer L's norms from a forward of the
    model whose layers < L are already pruned (layers >= L cannot change layer L's inputs)."""
    targets = prunable_linears(model)
    for layer in sorted({l for _, l, _ in targets}):
        mods = {name: mod for name, l, mod in targets if l == layer}
        acts = activation_norms(model, batch, mods)
        for name, mod in mods.items():
            metric = (metric_wanda(mod.weight, acts[name]) if method == "wanda"
                      else metric_gblm(mod.weight, acts[name], gnorms[name]))
            with torch.no_grad():
                mod.weight.masked_fill_(row_mask(metric, r), 0)


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_sequential_norms_follow_the_pruned_layers(method):
    batch, r = ids(n=4, seq=12), 0.6
    ref = make(layers=3)
    gnorms = None
    if method == "gblm":  # gradients of the dense model, as the driver does
        gnorms = per_sample_gradient_norms(ref, batch, [n for n, _, _ in prunable_linears(ref)], "l2", 100.0)
    _sequential_by_definition(ref, batch, method, r, gnorms)
    seq = make(layers=3)
    rep = unstructured_prune(seq, batch, method, sparsity=r, micro_batch_size=3)
    one = make(layers=3)
    unstructured_prune(one, batch, method, sparsity=r, sequential=False)
    assert rep["sequential"] is True and [row["name"] for row in rep["layers"]] == \
        [n for n, _, _ in prunable_linears(seq)]
    for (name, _, a), (_, _, b), (_, _, c) in zip(prunable_linears(ref), prunable_linears(seq), prunable_linears(one)):
        assert torch.equal(a.weight == 0, b.weight == 0), name
        if ".layers.0." in name:  # layer 0 sees the dense inputs either way
            assert torch.equal(b.weight == 0, c.weight == 0), name
    # later layers do see different inputs at this sparsity
    diff = [n for (n, _, b), (_, _, c) in zip(prunable_linears(seq), prunable_linears(one))
            if not torch.equal(b.weight == 0, c.weight == 0)]
    assert diff and all(".layers.0." not in n for n in diff)


def test_precomputed_moreau_estimate_is_reused():
    """grads= skips the estimate and gives the mask the estimate itself would give."""
    batch = ids()
    a = make()
    rep_a = unstructured_prune(a, batch, "moreau", sparsity=0.5, moreau=MoreauConfig(iters=2, avg_last=2, seed=3))
    b = make()
    names = [n for n, _, _ in prunable_linears(b)]
    est = loop.estimate(b, batch, MoreauConfig(iters=2, avg_last=2, seed=3), "reference", score=names, progress=False)
    rep_b = unstructured_prune(b, None, "moreau", sparsity=0.5, grads=est.grads)
    assert rep_b["moreau"] == {"precomputed": True} and "log" in rep_a["moreau"]
    for (n, _, x), (_, _, y) in zip(prunable_linears(a), prunable_linears(b)):
        assert torch.equal(x.weight, y.weight), n
    assert set(est.grads) == set(names)  # the caller's dict is not consumed
    with pytest.raises(ValueError, match="lacks"):
        unstructured_prune(make(), None, "moreau", grads={names[0]: est.grads[names[0]]})
    with pytest.raises(ValueError, match="only applies"):
        unstructured_prune(make(), batch, "wanda", grads=est.grads)


def test_moreau_gets_the_lean_strategy_and_reports_it():
    """The estimate runs on the lean strategy when it applies (no full gradient buffer), as the
    structured path does, and the report says which strategy ran; its mask is the one the
    reference strategy's Ĝ gives (test_precomputed_moreau_estimate_is_reused)."""
    rep = unstructured_prune(make(), ids(), "moreau", sparsity=0.5, moreau=MoreauConfig(iters=2, avg_last=2),
                             progress=False)
    assert rep["estimator_path"] == "lean"
    rep = unstructured_prune(make(), ids(), "moreau", sparsity=0.5, progress=False,
                             moreau=MoreauConfig(iters=2, avg_last=2, mode="paper", group="structure"))
    assert rep["estimator_path"] == "reference"  # structure groups: only the reference strategy has them
    assert "estimator_path" not in unstructured_prune(make(), ids(), "taylor", sparsity=0.5)


def test_taylor_is_the_plain_gradient_metric():
    batch = ids()
    a = make()
    rep = unstructured_prune(a, batch, "taylor", sparsity=0.5)
    b = make()
    names = [n for n, _, _ in prunable_linears(b)]
    g = gradients.gradient(b, batch, names)
    for name, _, lin in prunable_linears(b):
        with torch.no_grad():
            lin.weight.masked_fill_(row_mask(metric_moreau(lin.weight, g[name]), 0.5), 0)
    for (n, _, x), (_, _, y) in zip(prunable_linears(a), prunable_linears(b)):
        assert torch.equal(x.weight, y.weight), n
    assert rep["taylor"] == {"precomputed": False} and rep["overall"]["sparsity"] == 0.5
