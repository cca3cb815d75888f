"""The policy-gradient structural pruner: estimator, budget, masks, planted structure, CLI."""
import copy
import json

import pytest
import torch

from moreau_pruner import PruneConfig, discover, resolve_target
from moreau_pruner.prune.policy import (MaskedForward, PolicyConfig, UnitTable, final_removal, keep_mask, log_prob_grad,
                                  loo_baseline, project_budget, score_function_gradient,
                                  shift_logits_to_budget)
from moreau_pruner import prune_model


def tiny(seed=0, layers=2, hidden=32, inter=16, heads=4, kv=2, vocab=48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _ablation_costs(model, batch, cfg):
    """Loss increase when each unit alone is masked, as a flat vector over the UnitTable."""
    st = discover(model)
    table = UnitTable(resolve_target(st, cfg))
    hooks = MaskedForward(st, table)
    masks = torch.ones(table.size + 1, table.size, dtype=torch.bool)
    masks[torch.arange(1, table.size + 1), torch.arange(table.size)] = False
    losses = hooks.losses(batch, masks)
    hooks.remove()
    return table, losses[1:] - losses[0]


def planted_model(margin=0.02):
    """A tiny random Llama (weights at std 0.2, so every unit moves the logits) with planted units that
    carry no signal: MLP channels 0-3 of both layers and query heads 1 and 3 of layer 1 (one per KV
    group) are zeroed, and so is any other unit whose ablation costs less than ``margin``. The
    calibration rows are the dense model's own greedy continuations (it is confident on them), so every
    remaining unit measurably raises the loss when removed. Returns (model, batch, cfg, dead mask)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False, initializer_range=0.2)).eval()
    st = discover(model)
    cfg = PruneConfig(ratio=0.2, attn_layers="0:2", mlp_layers="0:2", granularity="query-heads")
    table = UnitTable(resolve_target(st, cfg))
    dead = torch.zeros(table.size, dtype=torch.bool)
    for seg in table.segments:
        if seg.kind == "mlp":
            dead[seg.start:seg.start + 4] = True
        elif seg.layer == 1:
            dead[seg.start + 1] = dead[seg.start + 3] = True

    def zero(dead):
        with torch.no_grad():
            for seg in table.segments:
                ls = st.layers[seg.layer]
                for u in torch.nonzero(dead[seg.start:seg.start + seg.n]).flatten().tolist():
                    if seg.kind == "mlp":
                        ls.gate.weight[u] = 0
                        ls.up.weight[u] = 0
                        ls.down.weight[:, u] = 0
                    else:
                        d = ls.head_dim
                        ls.q.weight[u * d:(u + 1) * d] = 0
                        ls.o.weight[:, u * d:(u + 1) * d] = 0

    zero(dead)
    with torch.no_grad():
        ids = torch.randint(0, 48, (8, 1), generator=torch.Generator().manual_seed(0))
        for _ in range(11):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    for _ in range(2):
        _, cost = _ablation_costs(model, ids, cfg)
        weak = (cost < margin) & ~dead
        for seg in table.segments:  # attention units go one per KV group
            if seg.per_group and weak[seg.start:seg.start + seg.n].any():
                weak[seg.start:seg.start + seg.n] = False
        dead |= weak
        zero(dead)
    _, cost = _ablation_costs(model, ids, cfg)
    assert cost[dead].abs().max() < 1e-6 and cost[~dead].min() > margin / 2  # the plant is as described
    return model, ids, cfg, dead


def test_log_prob_grad_is_bernoulli_score():
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    logp = (m * s.log() + (1 - m) * (1 - s).log()).sum()
    logp.backward()
    torch.testing.assert_close(log_prob_grad(m, s.detach())[0], s.grad)


@pytest.mark.parametrize("baseline", ["constant", "loo"])
def test_estimator_is_unbiased_on_a_toy_objective(baseline):
    """E[L(m)] = a·s + b·s0·s1 for L(m) = a·m + b·m0·m1; its gradient is a + b·(s1, s0, 0, ...)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([0.3, 0.6, 0.8, 0.1, 0.5], dtype=torch.float64)
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    b = 4.0
    exact = a.clone()
    exact[0] += b * s[1]
    exact[1] += b * s[0]
    n_steps, per_step = 4000, 8
    grads = []
    for _ in range(n_steps):
        m = (torch.rand(per_step, 5, generator=gen, dtype=torch.float64) < s).double()
        loss = m @ a + b * m[:, 0] * m[:, 1]
        base = loo_baseline(loss) if baseline == "loo" else 2.0
        grads.append(score_function_gradient(loss, m, s, base, eps=1e-6))
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / n_steps ** 0.5
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # and a baseline that uses the sample's own loss is biased: the estimator notices the difference
    biased = torch.stack([score_function_gradient(l := (m := (torch.rand(per_step, 5, generator=gen,
                                                                         dtype=torch.float64) < s).double()) @ a
                                                  + b * m[:, 0] * m[:, 1], m, s, l.mean(), eps=1e-6)
                          for _ in range(n_steps)]).mean(0)
    assert ((biased - exact).abs() > 4 * se).any()


def test_projection_meets_the_budget_and_is_idempotent():
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(50, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    cost = torch.cat([torch.full((10,), 20.0), torch.full((40,), 3.0)]).double()
    out = project_budget(p, cost, 150.0)
    assert float((out * cost).sum()) == pytest.approx(150.0, rel=1e-9)
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(project_budget(out, cost, 150.0), out)
    with pytest.raises(ValueError, match="budget"):
        project_budget(p, cost, float(cost.sum()) + 1)


def test_logit_shift_meets_the_budget_and_the_logit_search_runs():
    theta = torch.linspace(-4, 4, 30, dtype=torch.float64)
    cost = torch.cat([torch.full((5,), 10.0), torch.full((25,), 1.0)]).double()
    out = shift_logits_to_budget(theta, cost, 40.0)
    assert float((torch.sigmoid(out) * cost).sum()) == pytest.approx(40.0, rel=1e-9)
    torch.testing.assert_close(out - theta, torch.full_like(theta, float(out[0] - theta[0])))  # one common shift
    model = tiny(1, layers=2, inter=24)
    batch = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(1))
    cfg = PruneConfig(ratio=0.3, attn_layers="0:2", mlp_layers="0:2", granularity="query-heads")
    r = prune_model(model, batch, "policy-gradient", cfg, progress=False,
                    policy=PolicyConfig(steps=10, init="magnitude", parametrization="logit", lr=0.1))
    assert 0 <= r.policy["budget_gap"] < 3 * 32
    with pytest.raises(ValueError, match="parametrization"):
        PolicyConfig(parametrization="sigmoid")


def test_masked_forward_equals_the_pruned_model():
    """A mask applied by the hooks gives the loss of the model pruned to the same units."""
    model = tiny(3)
    batch = torch.randint(0, 48, (3, 10), generator=torch.Generator().manual_seed(3))
    for gran in ("query-heads", "kv-group"):
        m = copy.deepcopy(model)
        st = discover(m)
        cfg = PruneConfig(ratio=0.3, attn_layers="0:2", mlp_layers="0:2", granularity=gran)
        table = UnitTable(resolve_target(st, cfg))
        probs = torch.rand(table.size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        removed = final_removal(table, probs, 900)
        hooks = MaskedForward(st, table)
        keep = keep_mask(table, probs, removed)
        masked = hooks.losses(batch, keep.unsqueeze(0))
        hooks.remove()
        from moreau_pruner.score.importance import LayerScores
        from moreau_pruner.prune.apply import prune_structure

        scores, counts = [], {}
        for ls in st.layers:
            segs = {s.kind: s for s in table.segments if s.layer == ls.index}
            a, c = segs["attn"], segs["mlp"]
            scores.append(LayerScores(ls.index, probs[a.start:a.start + a.n].float(),
                                      probs[c.start:c.start + c.n].float()))
            counts[ls.index] = (removed[(ls.index, "attn")], removed[(ls.index, "mlp")])
        prune_structure(st, scores, cfg, counts=counts)
        with torch.no_grad():
            logits = m(input_ids=batch).logits
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        assert float(masked[0]) == pytest.approx(float(ref), rel=1e-5), gran


@pytest.mark.parametrize("gran", ["query-heads", "kv-group"])
def test_budget_is_met_exactly_and_the_seed_fixes_the_mask(gran):
    model = tiny(1, layers=3, inter=40)
    batch = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(1))
    cfg = PruneConfig(ratio=0.3, attn_layers="0:3", mlp_layers="0:3", granularity=gran)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        r = prune_model(m, batch, "policy-gradient", cfg, policy=PolicyConfig(steps=15, init="none", seed=5),
                        progress=False)
        channel = 3 * 32
        assert 0 <= r.policy["budget_gap"] < channel
        assert r.report.params_before - r.report.params_after == r.policy["removed"]
        # the target is what the one-shot local rule removes at the same ratio
        one_shot = copy.deepcopy(model)
        ref = prune_model(one_shot, batch, "magnitude", cfg, progress=False)
        assert r.policy["target_removed"] == ref.report.params_before - ref.report.params_after
        for layer in r.report.layers:  # query heads leave every KV group alike
            if layer["kept_query_heads"] is not None:
                assert len({len(g) for g in layer["kept_query_heads"]}) == 1
        runs.append((r.report.layers, [p.clone() for p in m.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.slow
def test_policy_gradient_finds_planted_dead_units():
    """Budget = exactly the planted units: the search, from no prior, removes those and nothing else."""
    model, batch, cfg, dead = planted_model()
    table = UnitTable(resolve_target(model, cfg))
    planted = int((table.cost * dead.double()).sum())
    before = sum(p.numel() for p in model.parameters())
    pol = PolicyConfig(steps=400, samples=16, batch_size=8, lr=0.02, init="none", baseline="loo", seed=0,
                       parametrization="probability")
    r = prune_model(model, batch, "policy-gradient", cfg, policy=pol, target_params=before - planted,
                    progress=False)
    assert r.policy["budget_gap"] == 0
    found = torch.zeros_like(dead)
    for seg, layer in zip([s for s in table.segments], [r.report.layers[s.layer] for s in table.segments]):
        if seg.kind == "mlp":
            kept = set(layer["kept_channels"] or range(seg.n))
            found[seg.start:seg.start + seg.n] = torch.tensor([u not in kept for u in range(seg.n)])
        else:
            groups = layer["kept_query_heads"] or [list(range(seg.n_rep))] * seg.n_kv
            kept = {g * seg.n_rep + j for g, heads in enumerate(groups) for j in heads}
            found[seg.start:seg.start + seg.n] = torch.tensor([u not in kept for u in range(seg.n)])
    assert torch.equal(found, dead), (torch.nonzero(found).flatten(), torch.nonzero(dead).flatten())
    assert r.policy["history"][-1]["loss"] < r.policy["history"][0]["loss"]
    assert r.policy["mask_loss_final"] < r.policy["mask_loss_init"]


def test_metric_init_starts_at_the_one_shot_plan():
    """With a metric init and no steps the final mask is that metric's one-shot local plan."""
    model = tiny(2, layers=3, inter=40)
    batch = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(2))
    cfg = PruneConfig(ratio=0.25, attn_layers="0:3", mlp_layers="0:3", granularity="query-heads")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    r = prune_model(a, batch, "policy-gradient", cfg, policy=PolicyConfig(steps=1, lr=1e-9, init="taylor"),
                    progress=False)
    ref = prune_model(b, batch, "taylor", cfg, progress=False)
    assert [l["kept_channels"] for l in r.report.layers] == [l["kept_channels"] for l in ref.report.layers]
    assert r.policy["backward_sequences"] == 4


def test_bad_input_is_refused_clearly():
    model = tiny(0)
    batch = torch.randint(0, 48, (2, 8))
    cfg = PruneConfig(ratio=0.2, attn_layers="0:2", mlp_layers="0:2", granularity="query-heads")
    with pytest.raises(ValueError, match="cannot meet the budget"):
        prune_model(model, batch, "policy-gradient", cfg, policy=PolicyConfig(steps=1), target_params=1000,
                    progress=False)
    with pytest.raises(ValueError, match="--init must be one of"):
        prune_model(model, batch, "policy-gradient", cfg, policy=PolicyConfig(init="random"), progress=False)
    with pytest.raises(ValueError, match="allocation"):
        prune_model(model, batch, "policy-gradient", cfg, allocation="owl", progress=False)
    with pytest.raises(ValueError, match="rounds"):
        prune_model(model, batch, "policy-gradient", cfg, rounds=2, progress=False)
    with pytest.raises(ValueError, match="uniform"):
        prune_model(model, batch, "policy-gradient", PruneConfig(ratio=0.2, uniform=True), progress=False)
    with pytest.raises(ValueError, match="loo"):
        PolicyConfig(samples=1, baseline="loo")
    with pytest.raises(ValueError, match="calibration batch"):
        prune_model(model, None, "policy-gradient", cfg, progress=False)


def _tiny_dir(tmp_path):
    from tests._tiny import word_tokenizer

    words = [f"w{i}" for i in range(45)]
    tok = word_tokenizer(words)
    model = tiny(0)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, 45, (3000,), generator=g).tolist()))
    return d, text


def test_cli_runs_policy_gradient_and_refuses_what_does_not_apply(tmp_path, capsys):
    from moreau_pruner.cli.prune import main
    from moreau_pruner.io.pruned import load_pruned

    d, text = _tiny_dir(tmp_path)
    common = ["--model", str(d), "--calib-file", str(text), "--eval-file", str(text), "--num-examples", "4",
              "--seq-len", "16", "--eval-seq-lens", "16", "--eval-tokens", "256", "--generate", "", "--quiet",
              "--attn-layers", "0:2", "--granularity", "query-heads"]
    out = tmp_path / "pruned"
    rc = main(common + ["--method", "policy-gradient", "--init", "magnitude", "--pg-steps", "6", "--pg-samples", "2",
                        "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"] == "policy-gradient" and rep["policy"]["config"]["init"] == "magnitude"
    assert rep["policy"]["forward_sequences"] == 6 * 2 + 2 * 4 and rep["params_after"] < rep["params_before"]
    assert "policy gradient" in capsys.readouterr().out
    model, _ = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == rep["params_after"]
    for extra, msg in ((["--method", "taylor", "--init", "taylor"], "--init"),
                       (["--method", "policy-gradient", "--unstructured"], "unstructured"),
                       (["--method", "policy-gradient", "--rounds", "2"], "--rounds"),
                       (["--method", "policy-gradient", "--allocation", "owl"], "--allocation"),
                       (["--method", "policy-gradient", "--pg-steps", "0"], "steps")):
        out2 = tmp_path / "never"
        assert main(common + extra + ["--out", str(out2)]) == 2
        assert msg in capsys.readouterr().err
        assert not out2.exists()
