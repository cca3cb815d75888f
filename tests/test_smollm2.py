"""The real embedded model (SmolLM2-135M-Instruct, GGUF): the published mechanics show, and
pruning 20 % of the pruned layers leaves a model with finite perplexity that still generates."""
import copy

import pytest
import torch

from moreau_pruner import MoreauConfig, PruneConfig, discover, estimate, prune_model
from moreau_pruner.data import calibration_batch, calibration_text, heldout_text, tokenize_text
from moreau_pruner.evaluate.perplexity import generate_text, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture
def smol(smollm2_shared):
    return smollm2_shared


@pytest.fixture(scope="module")
def batch(smollm2_shared):
    _, tok = smollm2_shared
    return calibration_batch(tok, calibration_text("pydoc"), n_samples=10, seq_len=64, seed=0)


def test_structure_is_smollm2(smol):
    s = discover(smol[0])
    assert s.num_layers == 30
    assert (s.layers[0].n_heads, s.layers[0].n_kv_heads, s.head_dim, s.layers[0].intermediate_size) == (9, 3, 64, 1536)


def test_published_mechanics(smol, batch):
    """‖δ‖² alternates big/small from step 1 on; on big steps row RMS ≈ s; reflected rows flip sign."""
    model, _ = smol
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = MoreauConfig(iters=4)
    name = "model.layers.10.mlp.gate_proj.weight"
    snaps = {}
    res = estimate(model, batch, cfg, "reference", score=[name], progress=False,
                   on_step=lambda t, d: snaps.update({t: d[name].clone()}))
    l2 = [r["l2"] for r in res.log]
    assert l2[0] == 0.0
    assert l2[1] > 10 * l2[2] and l2[3] > 10 * l2[2], l2  # big, small, big
    rms = snaps[0].pow(2).mean(1).sqrt()  # δ_1: a big step
    frac = ((rms > 0.5 * cfg.soft) & (rms <= cfg.soft)).float().mean()
    assert frac > 0.9, float(frac)
    # δ_1 = u (1 - s/r) with r << s: the row is reflected, so δ_1 points against u = -γg, i.e. along g
    # and against the next small iterate's direction; successive big iterates keep a consistent sign.
    # Measured (seed 0, this batch, 2-core CPU): δ_1 vs δ_3 (big, big) flip 0.095 of the signs, δ_1 vs
    # δ_2 (big, small) 0.998. Random signs flip 0.5 of both; without the reflection δ_1 and δ_2 would
    # share most signs.
    flips = (torch.sign(snaps[0]) != torch.sign(snaps[2])).float().mean()
    assert flips < 0.15, float(flips)
    reflected = (torch.sign(snaps[0]) != torch.sign(snaps[1])).float().mean()
    assert reflected > 0.95, float(reflected)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in res.log])))


#: pruned / dense perplexity bound of the r = 0.2 prune below (6 held-out windows of 128 tokens).
#: Measured on a 2-core CPU: dense 26.15; Moreau (4 steps) 34.97 = 1.34x, first-order Taylor 31.68 =
#: 1.21x; random scores 62.6 / 64.9 / 61.3 / 57.5 = 2.39x / 2.48x / 2.35x / 2.20x (seeds 0-3) and
#: magnitude 974 = 37x. 1.75x leaves the estimator 30 % of margin and fails a random-scores prune.
PPL_RATIO_BOUND = 1.75


def test_prune_20_percent_still_works(smollm2, smollm2_shared, batch):
    model, tok = smollm2
    ids = tokenize_text(tok, heldout_text("pydoc"))
    dense = perplexity(model, None, ids, seq_len=128, max_windows=6, progress=False)
    # the bound discriminates: random scores on the same layers and ratio exceed it
    rand = copy.deepcopy(smollm2_shared[0])
    prune_model(rand, None, "random", PruneConfig(ratio=0.2, granularity="query-heads"), seed=3, progress=False)
    ppl_random = perplexity(rand, None, ids, seq_len=128, max_windows=6, progress=False)
    del rand
    assert ppl_random > PPL_RATIO_BOUND * dense, (dense, ppl_random)
    res = prune_model(model, batch, "moreau", PruneConfig(ratio=0.2, granularity="query-heads"),
                      moreau=MoreauConfig(iters=4), progress=False)
    rep = res.report
    assert rep.attn_layers == list(range(4, 28))
    pruned_layers = [l for l in rep.layers if l["layer"] in rep.attn_layers]
    # MLP: 1536 - int(1536 * 0.8) = 308 channels go. Attention: n = 576 - int(576 * 0.8) = 116 of the
    # q/o width, less than the 3 * 64 that one query head per KV group costs, so (SPEC §5's floor)
    # no head goes at r = 0.2 with either granularity: SmolLM2's n_rep equals its H_kv.
    assert all(l["num_attention_heads"] == 9 and l["intermediate_size"] == 1228 for l in pruned_layers)
    assert 0.75 < rep.kept_fraction < 0.95
    ppl = perplexity(model, None, ids, seq_len=128, max_windows=6, progress=False)
    assert torch.isfinite(torch.tensor(ppl)) and ppl < PPL_RATIO_BOUND * dense, (dense, ppl)
    text = generate_text(model, tok, "The Python interpreter", max_new_tokens=12)
    assert len(text.strip()) > 0


@pytest.mark.parametrize("granularity,heads,kv", [("query-heads", 6, 3), ("kv-group", 6, 2)])
def test_one_third_removes_heads(smollm2, granularity, heads, kv):
    model = smollm2[0]
    rep = prune_model(model, None, "magnitude", PruneConfig(ratio=0.34, granularity=granularity),
                      progress=False).report
    layer = rep.layers[10]
    assert (layer["num_attention_heads"], layer["num_key_value_heads"]) == (heads, kv)
    assert model.model.layers[10].self_attn.num_key_value_groups == heads // kv
