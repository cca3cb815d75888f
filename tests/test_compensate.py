"""Weight compensation after structured pruning (moreau_pruner.prune.compensate, SPEC §11): the solve,
the layer walk, every structured path, save/reload, FSDP2 against one process, and bad input."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moreau_pruner import MoreauConfig, PruneConfig, discover, load_pruned, prune_model, save_pruned, save_uniform
from moreau_pruner.prune import compensate as C
from moreau_pruner.prune.compensate import CompensateConfig, compensate_linear, compensate_model
from moreau_pruner.prune.apply import apply_plan
from moreau_pruner.prune.plan import LayerPlan
from moreau_pruner.prune.policy import PolicyConfig

from test_distributed import _free_port, _tiny_dir

BATCH = torch.randint(3, 61, (8, 24), generator=torch.Generator().manual_seed(1))


def _tiny(kind="llama", seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    kw.update(over)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape))
    return model.eval()


def _logits(model, x=None):
    x = BATCH[:2, :16] if x is None else x
    with torch.no_grad():
        return model(x).logits


# ----------------------------------------------------------------------------- the solve
def _planted(n=200, k=12, seed=0):
    """Inputs X [n, k+1] whose last column is an exact combination of the others, and a weight [5, k+1]."""
    g = torch.Generator().manual_seed(seed)
    xk = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.cat([xk, (xk @ a)[:, None]], 1)
    w = torch.randn(5, k + 1, generator=g, dtype=torch.float64)
    return x, w, a


def _stats(x):
    return x.T @ x, x.sum(0), x.shape[0]


@pytest.mark.parametrize("mode", C.MODES)
def test_nothing_removed_changes_nothing(mode):
    x, w, _ = _planted()
    g, s, n = _stats(x)
    keep = torch.arange(w.shape[1])
    c = compensate_linear(w, g, s, n, keep, mode, damping=0.1)
    assert torch.equal(c.weight, w)
    assert c.bias is None if mode == "weights" else torch.equal(c.bias, torch.zeros(5, dtype=torch.float64))
    assert c.error_before == 0.0 and c.error_after == pytest.approx(0.0, abs=1e-9)
    # and in a model: plans that keep everything leave every weight as it was
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s_ = discover(model)
    plans = [LayerPlan(ls.index, q_keep=[list(range(ls.n_rep))] * ls.n_kv_heads,
                       mlp_keep=list(range(ls.intermediate_size))) for ls in s_.layers]
    rep = compensate_model(s_, plans, BATCH, CompensateConfig(mode=mode))
    assert rep["layers"] == [] and rep["bias_switches"] == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_planted_combination_is_reconstructed_exactly():
    """The removed input is an exact linear combination of the kept ones: W'_K = W_K + w_s aᵀ, no error left."""
    x, w, a = _planted()
    g, s, n = _stats(x)
    keep = torch.arange(12)
    c = compensate_linear(w, g, s, n, keep, "weights", damping=0.0)
    torch.testing.assert_close(c.weight[:, :12], w[:, :12] + w[:, 12:] * a[None, :], rtol=1e-7, atol=1e-9)
    assert torch.equal(c.weight[:, 12], torch.zeros(5, dtype=torch.float64))
    assert c.error_before > 1.0 and c.error_after <= 1e-12 * c.energy
    torch.testing.assert_close(x[:, :12] @ c.weight[:, :12].T, x @ w.T, rtol=1e-8, atol=1e-8)
    # the damped solve is the closed form W_K + W_S G[S,K] (G[K,K] + λI)⁻¹, λ = f·mean(diag G[K,K])
    c = compensate_linear(w, g, s, n, keep, "weights", damping=0.05)
    gkk = g[:12, :12]
    lam = 0.05 * gkk.diagonal().mean()
    want = w[:, :12] + w[:, 12:] @ g[12:, :12] @ torch.linalg.inv(gkk + lam * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(c.weight[:, :12], want, rtol=1e-9, atol=1e-12)
    assert 0 < c.error_after < c.error_before


def test_bias_modes():
    """bias: b' = W_S mean(X_S); weights+bias: least squares with an intercept, never worse than either."""
    g0 = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, generator=g0, dtype=torch.float64) + torch.linspace(-2, 2, 10, dtype=torch.float64)
    w = torch.randn(4, 10, generator=g0, dtype=torch.float64)
    g, s, n = _stats(x)
    keep = torch.tensor([0, 2, 3, 5, 7, 8])
    drop = torch.tensor([1, 4, 6, 9])
    b = compensate_linear(w, g, s, n, keep, "bias")
    torch.testing.assert_close(b.bias, w[:, drop] @ x[:, drop].mean(0))
    assert torch.equal(b.weight[:, keep], w[:, keep])
    wb = compensate_linear(w, g, s, n, keep, "weights+bias", damping=0.0)
    ww = compensate_linear(w, g, s, n, keep, "weights", damping=0.0)
    # the exact affine least-squares fit
    design = torch.cat([x[:, keep], torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, x @ w.T).solution
    torch.testing.assert_close(wb.weight[:, keep], sol[:-1].T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(wb.bias, sol[-1], rtol=1e-7, atol=1e-9)
    resid = x @ w.T - x[:, keep] @ wb.weight[:, keep].T - wb.bias
    assert wb.error_after == pytest.approx(float((resid ** 2).sum()), rel=1e-6)
    assert wb.error_after <= min(ww.error_after, b.error_after) < b.error_before


@pytest.mark.parametrize("mode", C.MODES)
def test_singular_gram_matrices(mode):
    """Duplicated and all-zero kept inputs: the default damping solves it; without damping the damping is
    raised (and reported) instead of failing, and the fit is finite and never worse than dropping."""
    x, w, _ = _planted(k=6)
    x = torch.cat([x, x[:, :2], torch.zeros(x.shape[0], 2, dtype=torch.float64)], 1)  # dup + zero columns
    w = torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g, s, n = _stats(x)
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 7, 8, 9, 10])  # column 6 (the combination) goes; 7, 8 dup 0, 1
    ok = compensate_linear(w, g, s, n, keep, mode, damping=0.01)
    assert ok.damping == 0.01 and torch.isfinite(ok.weight).all()
    raised = compensate_linear(w, g, s, n, keep, mode, damping=0.0)
    assert torch.isfinite(raised.weight).all()
    if mode != "bias":
        assert raised.damping > 0
        assert raised.error_after <= 1e-6 * raised.energy  # still an exact fit
    assert raised.error_after <= raised.error_before
    # all kept inputs zero: nothing to fit, the weights stay
    z = compensate_linear(w, torch.zeros_like(g), torch.zeros_like(s), n, keep, mode, damping=0.0)
    assert torch.equal(z.weight[:, keep], w[:, keep])
    with pytest.raises(ValueError, match="not finite"):
        compensate_linear(w, g * float("nan"), s, n, keep, mode)


# ----------------------------------------------------------------------------- in a model
def _dense_layer_inputs(dense, pruned, layer):
    """The o_proj / down_proj inputs of the DENSE layer ``layer`` fed with the hidden states that enter
    that layer in ``pruned`` (the calibration activations the compensation fitted)."""
    seen = {}
    h = pruned.model.layers[layer].register_forward_pre_hook(
        lambda m, args, kw: seen.setdefault("x", (args, kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            pruned(BATCH)
    finally:
        h.remove()
    args, kw = seen["x"]
    block = dense.model.layers[layer]
    xs = {}
    hooks = [block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: xs.setdefault("o", a[0])),
             block.mlp.down_proj.register_forward_pre_hook(lambda m, a: xs.setdefault("down", a[0]))]
    try:
        with torch.no_grad():
            block(*args, **kw)
    finally:
        for x in hooks:
            x.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in xs.items()}


@pytest.mark.parametrize("mode", C.MODES)
def test_every_pruned_layer_reconstructs_better(mode):
    """Measured on the activations themselves (not through the report): every compensated o_proj and
    down_proj is closer to the dense layer's output than the same pruning without compensation, and the
    report's errors are those measured."""
    dense = _tiny()
    cfg = PruneConfig(ratio=0.4, attn_layers="0:3", granularity="query-heads")
    plain = copy.deepcopy(dense)
    prune_model(plain, BATCH, "magnitude", cfg, progress=False)
    comp = copy.deepcopy(dense)
    rep = prune_model(comp, BATCH, "magnitude", cfg, progress=False, compensate=CompensateConfig(mode=mode)).report
    rows = rep.compensation["layers"]
    assert {(r["layer"], r["module"]) for r in rows} == {(i, m) for i in range(3) for m in ("o_proj", "down_proj")}
    for r in rows:
        layer, kind = r["layer"], "o" if r["module"] == "o_proj" else "down"
        x = _dense_layer_inputs(dense, comp, layer)[kind]
        get = (lambda m: m.model.layers[layer].self_attn.o_proj) if kind == "o" else \
            (lambda m: m.model.layers[layer].mlp.down_proj)
        w = get(dense).weight.detach().double()
        entry = rep.layers[layer]
        heads = [g * 3 + j for g, keep in enumerate(entry["kept_query_heads"]) for j in keep]
        keep = torch.tensor([h * 8 + i for h in heads for i in range(8)]) if kind == "o" else \
            torch.tensor(entry["kept_channels"])
        target = x @ w.T
        lin = get(comp)
        bias = 0 if lin.bias is None else lin.bias.detach().double()
        err_comp = float(((target - x[:, keep] @ lin.weight.detach().double().T - bias) ** 2).sum())
        err_drop = float(((target - x[:, keep] @ w[:, keep].T) ** 2).sum())
        energy = float((target ** 2).sum())
        assert err_comp < err_drop, (layer, kind)
        assert r["error_after"] == pytest.approx(err_comp / energy, rel=1e-3, abs=1e-7)
        assert r["error_before"] == pytest.approx(err_drop / energy, rel=1e-3)
        # the uncompensated model's weights are the dense ones at the kept columns
        assert torch.equal(get(plain).weight, get(dense).weight[:, keep])


def test_planted_duplicate_units_make_the_pruned_model_exact():
    """A removed MLP channel that is 2x a kept one and a removed query head identical to a kept one in its
    KV group: without damping the compensated pruned model computes what the dense model computes."""
    dense = _tiny(num_hidden_layers=2)
    d = 8
    with torch.no_grad():
        for block in dense.model.layers:
            mlp, attn = block.mlp, block.self_attn
            mlp.gate_proj.weight[5] = mlp.gate_proj.weight[9]
            mlp.up_proj.weight[5] = 2 * mlp.up_proj.weight[9]
            for g in range(2):  # query head 3g+1 = query head 3g (same KV head)
                attn.q_proj.weight[(3 * g + 1) * d:(3 * g + 2) * d] = attn.q_proj.weight[3 * g * d:(3 * g + 1) * d]
    s = discover(dense)
    plans = [LayerPlan(ls.index, q_keep=[[0, 2], [0, 2]], mlp_keep=[c for c in range(40) if c != 5])
             for ls in s.layers]
    model = copy.deepcopy(dense)
    ms = discover(model)
    rep = compensate_model(ms, plans, BATCH, CompensateConfig(damping=0.0))
    apply_plan(ms, plans)
    assert all(r["error_after"] < 1e-9 for r in rep["layers"]) and all(r["error_before"] > 1e-3 for r in rep["layers"])
    torch.testing.assert_close(_logits(model), _logits(dense), rtol=1e-4, atol=1e-4)
    uncompensated = copy.deepcopy(dense)
    apply_plan(discover(uncompensated), plans)
    assert (_logits(uncompensated) - _logits(dense)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- every structured path, saved and reloaded
PATHS = {
    "magnitude-local": dict(method="magnitude", prune=PruneConfig(ratio=0.4, attn_layers="0:3",
                                                                   granularity="query-heads")),
    "taylor-global-bias": dict(method="taylor", prune=PruneConfig(ratio=0.3, attn_layers="0:3", scope="global",
                                                                  granularity="query-heads"), mode="bias"),
    "random-rounds": dict(method="random", prune=PruneConfig(ratio=0.4, attn_layers="0:3",
                                                             granularity="query-heads"), rounds=2),
    "moreau-kv-group": dict(method="moreau", prune=PruneConfig(ratio=0.5, attn_layers="0:3"), mode="weights+bias",
                            options=dict(moreau=MoreauConfig(iters=2, avg_last=1))),
    "taylor-second-uniform": dict(method="taylor", prune=PruneConfig(ratio=0.4, uniform=True,
                                                                     granularity="query-heads"),
                                  options=dict(taylor_variant="param_second"), mode="weights+bias"),
    "policy-gradient": dict(method="policy-gradient", prune=PruneConfig(ratio=0.4, attn_layers="0:3",
                                                                        granularity="query-heads"),
                            options=dict(policy=PolicyConfig(steps=3, samples=2))),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_every_structured_path_compensates_and_reloads(tmp_path, name):
    spec = PATHS[name]
    dense = _tiny()
    model = copy.deepcopy(dense)
    res = prune_model(model, BATCH, spec["method"], spec["prune"], progress=False, rounds=spec.get("rounds", 1),
                      compensate=CompensateConfig(mode=spec.get("mode", "weights")), **spec.get("options", {}))
    comp = res.report.compensation
    assert comp and comp["layers"] and all(r["error_after"] < r["error_before"] for r in comp["layers"])
    assert comp["error_after_mean"] < comp["error_before_mean"]
    assert res.timings["compensate_s"] >= 0
    if spec.get("rounds", 1) > 1:
        assert comp["rounds"] == 2 and {r["round"] for r in comp["layers"]} == {1, 2}
    if spec.get("mode", "weights") != "weights":
        modules = {r["module"] for r in comp["layers"]}
        assert comp["bias_switches"] == sorted({"o_proj": "attention_bias", "down_proj": "mlp_bias"}[m] for m in modules)
        assert model.config.attention_bias == ("o_proj" in modules) and model.config.mlp_bias == ("down_proj" in modules)
        assert res.report.params_after == sum(p.numel() for p in model.parameters())
    want = _logits(model)
    uncompensated = copy.deepcopy(dense)
    prune_model(uncompensated, BATCH, spec["method"], spec["prune"], progress=False, rounds=spec.get("rounds", 1),
                **spec.get("options", {}))
    assert not torch.equal(_logits(uncompensated), want)
    if spec["prune"].uniform:
        save_uniform(model, tmp_path / "out")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert torch.equal(_logits(back), want)
    else:
        save_pruned(model, tmp_path / "out")
        assert torch.equal(_logits(load_pruned(tmp_path / "out")[0]), want)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
        assert torch.equal(_logits(remote), want)


def test_each_round_is_compensated_before_the_next_scores(monkeypatch):
    from moreau_pruner import pipeline

    calls = []
    score, comp = pipeline.score_units, C.compensate_model

    def spy_score(model, *a, **k):
        calls.append(("score", float(model.model.layers[0].mlp.down_proj.weight.detach().abs().sum())))
        return score(model, *a, **k)

    def spy_comp(structure, *a, **k):
        out = comp(structure, *a, **k)
        calls.append(("compensate", float(structure.model.model.layers[0].mlp.down_proj.weight.detach().abs().sum())))
        return out

    monkeypatch.setattr(pipeline, "score_units", spy_score)
    monkeypatch.setattr(C, "compensate_model", spy_comp)
    prune_model(_tiny(), BATCH, "taylor", PruneConfig(ratio=0.4, attn_layers="0:3", granularity="query-heads"),
                progress=False, rounds=3, compensate=CompensateConfig())
    assert [c[0] for c in calls] == ["score", "compensate"] * 3
    # round k+1 scores the weights that round k's compensation left (the removed columns were zero)
    assert calls[1][1] != pytest.approx(calls[0][1], rel=1e-3)
    assert calls[2][1] == pytest.approx(calls[1][1], rel=1e-6) and calls[4][1] == pytest.approx(calls[3][1], rel=1e-6)


def test_micro_batches_give_the_same_compensation():
    a, b = _tiny(), _tiny()
    cfg = PruneConfig(ratio=0.4, attn_layers="0:3", granularity="query-heads")
    prune_model(a, BATCH, "magnitude", cfg, progress=False, compensate=CompensateConfig())
    prune_model(b, BATCH, "magnitude", cfg, progress=False, compensate=CompensateConfig(micro_batch_size=3))
    torch.testing.assert_close(_logits(a), _logits(b), rtol=1e-5, atol=1e-5)


def test_own_calibration_batch():
    """CompensateConfig.batch fits other tokens than the scoring batch (and the scores do not change)."""
    other = torch.randint(3, 64, (6, 40), generator=torch.Generator().manual_seed(9))
    cfg = PruneConfig(ratio=0.4, attn_layers="0:3", granularity="query-heads")
    a, b = _tiny(), _tiny()
    ra = prune_model(a, BATCH, "taylor", cfg, progress=False, compensate=CompensateConfig())
    rb = prune_model(b, BATCH, "taylor", cfg, progress=False, compensate=CompensateConfig(batch=other))
    assert ra.report.layers == rb.report.layers
    assert ra.report.compensation["tokens"] == BATCH.numel() and rb.report.compensation["tokens"] == other.numel()
    assert not torch.equal(_logits(a), _logits(b))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_any_work(monkeypatch):
    from moreau_pruner import pipeline

    monkeypatch.setattr(pipeline, "score_units", lambda *a, **k: pytest.fail("scored despite bad input"))
    model = _tiny()
    cfg = PruneConfig(ratio=0.4, attn_layers="0:3")
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        prune_model(model, BATCH, "taylor", cfg, compensate=CompensateConfig(damping=-0.1))
    with pytest.raises(ValueError, match="mode must be one of"):
        prune_model(model, BATCH, "taylor", cfg, compensate=CompensateConfig(mode="obs"))
    with pytest.raises(ValueError, match="micro_batch_size"):
        prune_model(model, BATCH, "taylor", cfg, compensate=CompensateConfig(micro_batch_size=0))
    with pytest.raises(ValueError, match="needs a calibration batch"):
        prune_model(model, None, "magnitude", cfg, compensate=CompensateConfig())
    with pytest.raises(ValueError, match="token ids"):
        prune_model(model, BATCH, "taylor", cfg, compensate=CompensateConfig(batch=torch.randn(2, 3)))
    with pytest.raises(ValueError, match="qwen2 model cannot take"):
        prune_model(_tiny("qwen2"), BATCH, "taylor", cfg, compensate=CompensateConfig(mode="bias"))
    assert torch.equal(_logits(model), _logits(_tiny()))


@pytest.mark.parametrize("argv,words", [
    (["--compensate", "--compensate-damping", "-1"], "damping must be a finite number >= 0"),
    (["--compensate", "--unstructured", "--method", "wanda"], "--compensate updates the weights"),
    (["--no-compensate", "--compensate-mode", "bias"],
     "--compensate-mode tune weight compensation, which --no-compensate turns off"),
    (["--published", "--compensate-damping", "0.2"],
     "--compensate-damping tune weight compensation, which --published leaves off: add --compensate"),
    (["--unstructured", "--compensate-calib", "mixed"],
     "--compensate-calib tune weight compensation, which --unstructured leaves off"),
    (["--compensate-calib", "nonexistent.txt"], "--compensate-calib 'nonexistent.txt': neither a corpus"),
    (["--compensate-calib", "pydoc", "--compensate-examples", "0"], "--compensate-examples 0 fits the scoring batch"),
    (["--compensate", "--compensate-examples", "-2"], "--compensate-examples must be >= 0"),
    (["--compensate", "--compensate-seq-len", "1"], "--compensate-seq-len must be >= 2"),
])
def test_cli_refuses_bad_compensation_options(monkeypatch, capsys, tmp_path, argv, words):
    from moreau_pruner.cli import prune as cli
    from moreau_pruner.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    assert cli.main(argv + ["--no-eval", "--out", str(tmp_path / "out")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bias_on_qwen2_before_scoring(capsys, tmp_path):
    from moreau_pruner.cli import prune as cli

    qwen = _tiny_dir(tmp_path / "qwen", "qwen2")
    assert cli.main(["--model", str(qwen), "--compensate", "--compensate-mode", "bias", "--no-eval", "--quiet",
                     "--out", str(tmp_path / "out")]) == 2
    assert "cannot take" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the CLI end to end
CLI_COMMON = ["--method", "taylor", "--ratio", "0.4", "--granularity", "query-heads", "--num-examples", "4",
              "--seq-len", "16", "--no-eval", "--generate", "", "--quiet"]


@pytest.mark.parametrize("uniform", [False, True])
def test_cli_compensate_saves_a_model_that_reloads(tmp_path, uniform):
    """moreau-prune --compensate: the report has the compensation, and the saved model reloads (load_pruned and
    trust_remote_code, or plain from_pretrained for --uniform) with the logits of the library's pruned model."""
    from moreau_pruner import data
    from moreau_pruner.cli import prune as cli
    from moreau_pruner.model.loading import load_model

    src = _tiny_dir(tmp_path / "llama", "llama")
    extra = ["--uniform"] if uniform else ["--attn-layers", "0:3"]
    extra += ["--compensate-mode", "weights+bias"] if uniform else []
    argv = ["--model", str(src), *CLI_COMMON, *extra, "--compensate", "--compensate-examples", "3",
            "--compensate-seq-len", "20", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    comp = rep["compensation"]
    assert comp["tokens"] == 60 and comp["layers"] and comp["error_after_mean"] < comp["error_before_mean"]
    # scored on the default pydoc, compensated on general text (the mixed corpus, where fortunes is installed)
    fit = "mixed" if data.corpus_available("fortunes") else "pydoc"
    assert comp["text"] == fit
    # the same pruning through the library
    model, tok = load_model(str(src))
    batch = data.calibration_batch(tok, data.calibration_text("pydoc"), 4, 16, 0)
    cbatch = data.calibration_batch(tok, data.calibration_text(fit), 3, 20, 0)
    cfg = PruneConfig(ratio=0.4, granularity="query-heads", uniform=uniform,
                      **({} if uniform else {"attn_layers": "0:3", "mlp_layers": "0:3"}))
    prune_model(model, batch, "taylor", cfg, progress=False,
                compensate=CompensateConfig(mode="weights+bias" if uniform else "weights", batch=cbatch))
    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(model, x)
    if uniform:
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert back.config.attention_bias and back.config.mlp_bias
        torch.testing.assert_close(_logits(back, x), want, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(_logits(load_pruned(tmp_path / "out")[0], x), want, rtol=0, atol=1e-6)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
        torch.testing.assert_close(_logits(remote, x), want, rtol=0, atol=1e-6)
    assert "weight compensation" in cli.format_report(rep)


@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="Debian package 'fortunes' not installed")
def test_cli_calib_mixed_scores_and_compensates_on_the_mixture(tmp_path, monkeypatch):
    """moreau-prune --calib mixed: the scoring batch and the compensation windows are both drawn from the
    calibration side of the mixed corpus (pydoc and fortunes)."""
    from moreau_pruner import data
    from moreau_pruner.cli import prune as cli
    from moreau_pruner.model.loading import load_model

    drawn = []
    real = data.calibration_batch

    def spy(tokenizer, text, *args, **kwargs):
        drawn.append(text)
        return real(tokenizer, text, *args, **kwargs)

    monkeypatch.setattr(data, "calibration_batch", spy)
    src = _tiny_dir(tmp_path / "llama", "llama")
    argv = ["--model", str(src), *CLI_COMMON, "--attn-layers", "0:3", "--calib", "mixed", "--compensate",
            "--compensate-examples", "3", "--compensate-seq-len", "20", "--out", str(tmp_path / "out"),
            "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    mixed = data.calibration_text("mixed")
    _, tok = load_model(str(src))
    assert len(drawn) == 2 and drawn[0] == mixed and torch.equal(drawn[1], data.tokenize_text(tok, mixed))
    comp = json.loads((tmp_path / "r.json").read_text())["compensation"]
    assert comp["tokens"] == 60 and comp["text"] == "mixed"


def _cli_run(tmp_path, src, name, *flags):
    from moreau_pruner.cli import prune as cli

    out, rep = tmp_path / name, tmp_path / f"{name}.json"
    windows = [] if "--no-compensate" in flags else ["--compensate-examples", "3", "--compensate-seq-len", "20"]
    argv = ["--model", str(src), *CLI_COMMON, "--attn-layers", "0:3", *windows, *flags, "--out", str(out),
            "--json", str(rep)]
    assert cli.main(argv) == 0
    return json.loads(rep.read_text()), _logits(load_pruned(out)[0], torch.arange(3, 12)[None])


def test_cli_compensates_by_default(tmp_path):
    """moreau-prune compensates structured pruning unless told not to: without the flag it equals
    --compensate with the default text (mixed, or pydoc without fortunes) spelled out, --no-compensate
    leaves the weights the selection gives."""
    from moreau_pruner import data

    src = _tiny_dir(tmp_path / "llama", "llama")
    fit = "mixed" if data.corpus_available("fortunes") else "pydoc"
    default, logits = _cli_run(tmp_path, src, "default")
    spelled, logits2 = _cli_run(tmp_path, src, "spelled", "--compensate", "--compensate-calib", fit,
                                "--compensate-damping", "0.3", "--compensate-mode", "weights")
    off, logits3 = _cli_run(tmp_path, src, "off", "--no-compensate")
    assert default["compensation"]["text"] == fit and default["compensation"]["damping"] == 0.3
    timeless = lambda rep: {k: v for k, v in rep["compensation"].items() if k != "seconds"}
    assert timeless(default) == timeless(spelled) and torch.equal(logits, logits2)
    assert "compensation" not in off and not torch.allclose(logits, logits3)
    assert default["layers"] == off["layers"]  # the same units: compensation changes weights only


def test_default_text_without_fortunes_is_pydoc(tmp_path, monkeypatch):
    """Where Debian's fortunes is not installed the default fit falls back to pydoc (reported), and naming
    a missing corpus is an error before any work."""
    from moreau_pruner import data
    from moreau_pruner.cli import compensation as cc
    from moreau_pruner.cli import prune as cli

    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "none")
    assert not data.corpus_available("fortunes") and not data.corpus_available("mixed") and data.corpus_available("pydoc")
    args = cli.apply_preset(cli.build_parser().parse_args(CLI_COMMON))
    assert cc.check_args(args)[2] is None  # the scoring calibration text, pydoc
    args = cli.apply_preset(cli.build_parser().parse_args(CLI_COMMON + ["--compensate-calib", "mixed"]))
    with pytest.raises(ValueError, match="--compensate-calib mixed: the corpus is not installed"):
        cc.check_args(args)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.corpus_available("c4")


@pytest.mark.parametrize("flags,want", [
    ([], "default"), (["--published"], None), (["--unstructured"], None), (["--calib", "fortunes"], None),
    (["--calib-file", "FILE"], None), (["--compensate-calib", "FILE"], "FILE"), (["--no-compensate"], "off"),
])
def test_which_text_compensation_fits(tmp_path, flags, want):
    """The compensation text of each way of asking (None: the scoring calibration text)."""
    from moreau_pruner import data
    from moreau_pruner.cli import compensation as cc
    from moreau_pruner.cli import prune as cli

    f = tmp_path / "t.txt"
    f.write_text("some text\n")
    flags = [str(f) if a == "FILE" else a for a in flags]
    args = cli.apply_preset(cli.build_parser().parse_args(CLI_COMMON + flags))
    cfg, windows, text = cc.check_args(args)
    if "--published" in flags or "--unstructured" in flags or want == "off":
        assert cfg is None and windows is None and text is None
        return
    assert cfg is not None and cfg.damping == 0.3 and windows == (64, 128)
    expected = {"default": "mixed" if data.corpus_available("fortunes") else None, "FILE": str(f)}.get(want, want)
    assert text == expected


def test_compensation_windows_are_at_most_what_the_text_holds(tmp_path):
    """--compensate-examples N is a maximum: a text shorter than N windows gives as many as it holds (the
    same windows calibration_batch draws for that count); less than one window is an error naming it."""
    from moreau_pruner import data
    from moreau_pruner.job import DataSettings, PruneJob, compensation_batch
    from moreau_pruner.model.loading import load_model

    src = _tiny_dir(tmp_path / "llama", "llama")
    _, tok = load_model(str(src))
    f = tmp_path / "short.txt"
    f.write_text(data.calibration_text("pydoc")[:3000])
    ids = data.tokenize_text(tok, data.calibration_text(str(f)))
    job = PruneJob(data=DataSettings(), compensate=CompensateConfig(), compensate_batch=(10_000, 20),
                   compensate_calib=str(f))
    got = compensation_batch(tok, job)
    assert got.shape == (ids.numel() // 20, 20)
    assert torch.equal(got, data.calibration_batch(tok, ids, ids.numel() // 20, 20, 0))
    job.compensate_batch = (4, 20)
    assert torch.equal(compensation_batch(tok, job), data.calibration_batch(tok, ids, 4, 20, 0))
    job.compensate_batch = (4, ids.numel() + 1)
    with pytest.raises(ValueError, match=r"fewer than one window of \d+ \(--compensate-seq-len\)"):
        compensation_batch(tok, job)


# ----------------------------------------------------------------------------- FSDP2: 2 ranks = 1 process
FSDP_PRUNE = PruneConfig(ratio=0.5, attn_layers="0:3", mlp_layers="0:3", granularity="query-heads")


def _fsdp_worker(rank, world, port, jobs, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import moreau_kernels as mk
    from moreau_pruner import compute_scores
    from moreau_pruner.distributed import context as D
    from moreau_pruner.distributed.compensate import compensate_fsdp, install_biases
    from moreau_pruner.distributed.loading import gather_to_rank0, load_sharded
    from moreau_pruner.distributed.scoring import FsdpScoring
    from moreau_pruner.prune.apply import prune_structure

    mk.set_backend("reference")
    ctx = D.init("cpu")
    try:
        for k, job in enumerate(jobs):
            sm = load_sharded(job["model"], "float32", ctx)
            scores, _, _ = compute_scores(sm.model, job["batch"], "taylor", FSDP_PRUNE, progress=False,
                                          context=FsdpScoring(ctx))
            rep, biases = compensate_fsdp(sm.model, scores, FSDP_PRUNE, job["batch"], CompensateConfig(mode=job["mode"]),
                                          ctx)
            plain = gather_to_rank0(sm, ctx)
            if ctx.is_main:
                prune_structure(discover(plain), scores, FSDP_PRUNE)
                install_biases(plain, biases)
                torch.save({"report": rep, "state": plain.state_dict(), "logits": _logits(plain)},
                           Path(out) / f"job{k}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_two_ranks_equal_one_process(tmp_path):
    """Llama (GQA, tied) with weights and with weights+bias, Qwen2 (q/k/v biases) with weights: the Gram
    matrices summed over 2 ranks (gloo) and each rank updating its own rows give the one-process model."""
    llama = _tiny_dir(tmp_path / "llama", "llama")
    qwen = _tiny_dir(tmp_path / "qwen", "qwen2", vocab_size=61, intermediate_size=38)
    batch = torch.randint(3, 61, (6, 12), generator=torch.Generator().manual_seed(1))
    jobs = [dict(model=str(llama), batch=batch, mode="weights"), dict(model=str(llama), batch=batch, mode="weights+bias"),
            dict(model=str(qwen), batch=batch, mode="weights")]
    pc = mp.start_processes(_fsdp_worker, args=(2, _free_port(), jobs, str(tmp_path)), nprocs=2, join=False,
                            start_method="spawn")
    deadline = time.time() + 300
    while not pc.join(timeout=2):
        if time.time() > deadline:
            for p in pc.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in 300 s")
    for k, job in enumerate(jobs):
        got = torch.load(tmp_path / f"job{k}.pt", weights_only=False)
        model = AutoModelForCausalLM.from_pretrained(job["model"]).eval()
        res = prune_model(model, batch, "taylor", FSDP_PRUNE, progress=False, micro_batch_size=3,
                          compensate=CompensateConfig(mode=job["mode"], micro_batch_size=3))
        want = res.report.compensation
        assert got["report"]["tokens"] == want["tokens"]
        assert got["report"]["bias_switches"] == want["bias_switches"]
        for a, b in zip(got["report"]["layers"], want["layers"]):
            assert (a["layer"], a["module"], a["kept"], a["damping"]) == (b["layer"], b["module"], b["kept"], b["damping"])
            assert a["error_after"] == pytest.approx(b["error_after"], rel=1e-4, abs=1e-9)
            assert a["error_before"] == pytest.approx(b["error_before"], rel=1e-4)
        state = model.state_dict()
        assert got["state"].keys() == state.keys()
        for name, t in state.items():
            torch.testing.assert_close(got["state"][name], t, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(got["logits"], _logits(model), rtol=1e-4, atol=1e-4)


def test_cli_torchrun_compensate_equals_one_process(tmp_path):
    """torchrun, 2 ranks, --uniform --compensate --compensate-mode weights+bias: the saved stock directory
    reloads with plain from_pretrained and gives the logits of the one-process CLI run."""
    from moreau_pruner.cli import prune as cli

    from test_distributed import _torchrun

    src = _tiny_dir(tmp_path / "llama", "llama")
    common = ["--model", str(src), *CLI_COMMON, "--uniform", "--backend", "reference", "--compensate",
              "--compensate-mode", "weights+bias", "--compensate-examples", "4", "--compensate-seq-len", "20"]
    proc = _torchrun(2, common + ["--out", str(tmp_path / "dist"), "--json", str(tmp_path / "dist.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    assert cli.main(common + ["--micro-batch-size", "2", "--out", str(tmp_path / "one"),
                              "--json", str(tmp_path / "one.json")]) == 0
    torch.set_num_threads(2)
    dist_rep, one_rep = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dist", "one"))
    assert dist_rep["distributed"]["world_size"] == 2
    assert dist_rep["params_after"] == one_rep["params_after"]
    a, b = dist_rep["compensation"], one_rep["compensation"]
    assert a["tokens"] == b["tokens"] == 80 and a["bias_switches"] == b["bias_switches"] == ["attention_bias", "mlp_bias"]
    for x, y in zip(a["layers"], b["layers"]):
        assert x["error_after"] == pytest.approx(y["error_after"], rel=1e-4, abs=1e-9)
    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval(), x)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dist").eval(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
