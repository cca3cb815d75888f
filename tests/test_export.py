"""Uniform pruning and the stock-format export: plain from_pretrained reloads, bad inputs, the CLI."""
import copy
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from moreau_pruner import MoreauConfig, PruneConfig, prune_model, save_pruned
from moreau_pruner.cli.prune import main
from moreau_pruner.io.stock import save_uniform, stock_config

from _tiny import word_tokenizer

WORDS = ("the a of is to and in it that for on with as be by this are an or at from statement expression value "
         "object function name class return if else python module type list string number").split()
KINDS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def tiny(kind, tied=False, layers=3, seed=0):
    """6 query heads in 2 KV groups (GQA) of head_dim 8, 40 MLP channels; Qwen2 has q/k/v biases."""
    torch.manual_seed(seed)
    config_cls, model_cls = KINDS[kind]
    m = model_cls(config_cls(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=layers,
                             num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                             tie_word_embeddings=tied)).eval()
    if kind == "qwen2":  # random biases, so that pruning them wrongly would show in the logits
        with torch.no_grad():
            for block in m.model.layers:
                for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                    lin.bias.normal_()
    return m


def logits(model):
    with torch.no_grad():
        return model(X).logits


def no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("kind,tied,granularity,round_to", [
    ("llama", True, "kv-group", None), ("llama", False, "query-heads", 8), ("mistral", False, "query-heads", None),
    ("mistral", True, "kv-group", 8), ("qwen2", True, "query-heads", 8), ("qwen2", False, "kv-group", None)])
def test_uniform_export_reloads_stock_with_identical_logits(tmp_path, kind, tied, granularity, round_to):
    m = tiny(kind, tied)
    assert m.model.layers[0].self_attn.q_proj.bias is not None or kind != "qwen2"
    res = prune_model(m, X, "moreau", PruneConfig(ratio=0.5, granularity=granularity, round_to=round_to,
                                                  uniform=True), moreau=MoreauConfig(iters=2), progress=False)
    rep = res.report
    assert rep.params_after < rep.params_before
    widths = {(l["num_attention_heads"], l["num_key_value_heads"], l["intermediate_size"]) for l in rep.layers}
    want_heads = (3, 1) if granularity == "kv-group" else (4, 2)  # one KV group, or one query head per group
    assert widths == {(*want_heads, 16 if round_to else 20)}
    # the in-memory config now describes the model
    assert (m.config.num_attention_heads, m.config.num_key_value_heads, m.config.intermediate_size) == widths.pop()
    want = logits(m)
    out = save_uniform(m, tmp_path / "stock", tokenizer=word_tokenizer(WORDS), extra=rep.as_dict())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tokenizer")) == [
        "config.json", "generation_config.json", "model.safetensors", "moreau_complete.json", "pruning_info.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["architectures"] == [KINDS[kind][1].__name__]
    assert "auto_map" not in cfg and not set(cfg) & {"layer_num_attention_heads", "layer_intermediate_size"}
    b = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(b) is KINDS[kind][1] and type(b.config) is KINDS[kind][0]
    assert torch.equal(logits(b), want)
    assert sum(p.numel() for p in b.parameters()) == rep.params_after
    assert (b.lm_head.weight is b.model.embed_tokens.weight) == tied
    assert json.loads((out / "pruning_info.json").read_text())["params_after"] == rep.params_after
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("kind,granularity", [("llama", "query-heads"), ("qwen2", "kv-group")])
def test_uniform_report_counts_the_per_layer_plan(kind, granularity):
    """The per-layer params in the report are exactly what per-layer pruning at that ratio gives."""
    base = tiny(kind, layers=8)  # default range 1:8 of 8 layers
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    u = prune_model(a, X, "magnitude", PruneConfig(ratio=0.5, granularity=granularity, uniform=True),
                    progress=False).report
    p = prune_model(b, X, "magnitude", PruneConfig(ratio=0.5, granularity=granularity), progress=False).report
    assert p.attn_layers == list(range(1, 8)) and u.attn_layers == list(range(8))
    assert u.uniform["per_layer_params_after"] == p.params_after
    assert u.uniform["uniform_params_after"] == u.params_after
    assert u.uniform["params_difference"] == u.params_after - p.params_after < 0  # layer 0 pruned too
    assert u.uniform["per_layer_attn_layers"] == [1, 8]
    # the same scores pick the same units: layers both plans prune keep the same channels
    for lu, lp in zip(u.layers[1:], p.layers[1:]):
        assert lu["kept_channels"] == lp["kept_channels"] and lu["kept_query_heads"] == lp["kept_query_heads"]
        assert lu["kept_kv_groups"] == lp["kept_kv_groups"]


def test_export_of_an_unpruned_gguf_like_config_drops_quantization(tmp_path):
    m = tiny("llama", tied=True)
    m.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF-loaded model carries
    cfg = stock_config(m)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    out = save_uniform(m, tmp_path / "dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(m))


def test_uniform_model_also_saves_in_the_per_layer_form(tmp_path):
    from moreau_pruner import load_pruned

    m = tiny("mistral")
    prune_model(m, X, "magnitude", PruneConfig(ratio=0.5, granularity="kv-group", uniform=True), progress=False)
    a, _ = load_pruned(save_pruned(m, tmp_path / "per-layer"))
    assert torch.equal(logits(a), logits(m))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("cfg,match", [
    (dict(attn_layers="1:3"), "attention layer range 1:3 would leave"),
    (dict(mlp_layers=(0, 2)), "MLP layer range 0:2 would leave"),
    (dict(scope="global"), "scope 'global' varies"),
    (dict(layer_ratios={0: 0.1, 1: 0.5}), "per-layer ratios"),
])
def test_uniform_refuses_settings_it_cannot_honour(cfg, match):
    m = tiny("mistral")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_model(m, X, "magnitude", PruneConfig(ratio=0.5, uniform=True, **cfg), progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched


def test_uniform_refuses_allocation_and_per_layer_models():
    m = tiny("llama")
    with pytest.raises(ValueError, match="allocation 'owl'"):
        prune_model(m, X, "magnitude", PruneConfig(ratio=0.3, uniform=True), allocation="owl", progress=False)
    prune_model(m, X, "magnitude", PruneConfig(ratio=0.5, attn_layers="1:3"), progress=False)  # per-layer widths
    with pytest.raises(ValueError, match="same widths"):
        prune_model(m, X, "magnitude", PruneConfig(ratio=0.3, uniform=True), progress=False)


def test_save_uniform_refuses_per_layer_widths_and_leaves_nothing(tmp_path):
    m = tiny("qwen2")
    prune_model(m, X, "magnitude", PruneConfig(ratio=0.5, attn_layers="1:3", mlp_layers="1:3", granularity="query-heads"),
                progress=False)
    with pytest.raises(ValueError, match=r"layer 0 has 6 heads/2 KV heads/40 MLP channels but 2 layer\(s\) differ"):
        save_uniform(m, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    save_pruned(m, tmp_path / "per-layer")  # the per-layer form still saves


def test_save_uniform_bad_output_keeps_existing(tmp_path):
    m = tiny("llama")
    prune_model(m, X, "magnitude", PruneConfig(ratio=0.5, uniform=True), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_uniform(m, out)
    with pytest.raises(ValueError, match="pruning_info.json"):
        save_uniform(m, out, extra={"x": object()}, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and no_leftovers(tmp_path) == []
    save_uniform(m, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert no_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-qwen2")
    tiny("qwen2", tied=True, layers=6).save_pretrained(d)
    word_tokenizer(WORDS).save_pretrained(d)
    return d


def cli(model_dir, *extra):
    return main(["--model", str(model_dir), "--method", "taylor", "--num-examples", "2", "--seq-len", "16",
                 "--eval-seq-lens", "16", "--eval-tokens", "64", "--quiet", "--generate", "", *extra])


def test_cli_uniform_saves_a_stock_model(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(model_dir, "--uniform", "--ratio", "0.5", "--granularity", "query-heads", "--round-to", "8",
             "--out", str(out), "--json", str(tmp_path / "r.json"))
    text = capsys.readouterr().out
    assert rc == 0, text
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["attn_layers"] == [0, 6] and rep["mlp_layers"] == [0, 6]
    u = rep["uniform"]
    assert u["uniform_params_after"] == rep["params_after"] and u["per_layer_attn_layers"] == [1, 6]  # default
    assert u["params_difference"] == rep["params_after"] - u["per_layer_params_after"] < 0
    assert f"{u['per_layer_params_after']:,}" in text and "uniform vs per-layer" in text
    assert {(l["num_attention_heads"], l["intermediate_size"]) for l in rep["layers"]} == {(4, 16)}
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(b) is Qwen2ForCausalLM and b.config.num_attention_heads == 4 and b.config.intermediate_size == 16
    assert sum(p.numel() for p in b.parameters()) == rep["params_after"]
    assert json.loads((out / "pruning_info.json").read_text())["uniform"] == u


@pytest.mark.parametrize("extra,match", [
    (["--attn-layers", "1:6"], "would leave the other layers at full width"),
    (["--scope", "global"], "--scope global varies"),
    (["--allocation", "owl"], "--allocation owl"),
    (["--unstructured"], "structural pruning"),
])
def test_cli_uniform_bad_settings_error_before_work(model_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    rc = cli(model_dir, "--uniform", "--out", str(out), *extra)
    err = capsys.readouterr().err
    assert rc == 2 and "moreau-prune: error: " in err and match in err
    assert list(tmp_path.iterdir()) == []



# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_gguf_uniform_export_reloads_stock(smollm2, tmp_path):
    """The embedded GGUF SmolLM2 (which save_pretrained refuses) exports as a stock Llama directory."""
    from transformers import AutoTokenizer

    model, tok = smollm2
    rep = prune_model(model, None, "magnitude", PruneConfig(ratio=0.2, uniform=True, round_to=64),
                      progress=False).report
    assert {l["intermediate_size"] for l in rep.layers} == {1216}
    out = save_uniform(model, tmp_path / "stock", tokenizer=tok, extra=rep.as_dict())
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back.config) is LlamaConfig and back.config.intermediate_size == 1216
    assert back.config.num_attention_heads == 9 and back.config.num_key_value_heads == 3
    assert sum(p.numel() for p in back.parameters()) == rep.params_after
    ids = tok("The Python interpreter reads", return_tensors="pt").input_ids
    assert AutoTokenizer.from_pretrained(out)("The Python interpreter reads", return_tensors="pt").input_ids.equal(ids)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
