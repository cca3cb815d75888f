"""Saving and reloading structurally pruned LLaMA-family models (moreau_pruner.io.pruned, SPEC §6)."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from moreau_pruner.io import pruned as mio
from moreau_pruner.io.staging import COMPLETE_FILE
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# --------------------------------------------------------------------------- helpers


def _select_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight.data
    b = None if lin.bias is None else lin.bias.data
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, torch.as_tensor(cols, dtype=torch.long))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _channels(heads, d):
    return [h * d + i for h in heads for i in range(d)]


def prune_layer(model, layer, kv_keep=None, q_keep_in_group=None, mlp_keep=None):
    """Index-selects rows/columns of one decoder layer, as the pruner does.

    kv_keep: the KV heads (groups) kept; q_keep_in_group: positions (0..n_rep-1) of the query
    heads kept in every kept group; mlp_keep: the MLP channels kept.
    """
    block = model.model.layers[layer]
    attn, mlp = block.self_attn, block.mlp
    d = attn.head_dim
    h_kv = attn.k_proj.out_features // d
    n_rep = attn.num_key_value_groups
    kv_keep = list(range(h_kv)) if kv_keep is None else list(kv_keep)
    q_keep_in_group = list(range(n_rep)) if q_keep_in_group is None else list(q_keep_in_group)
    q_heads = [k * n_rep + j for k in kv_keep for j in q_keep_in_group]
    q_rows, kv_rows = _channels(q_heads, d), _channels(kv_keep, d)
    attn.q_proj = _select_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _select_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _select_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _select_linear(attn.o_proj, cols=q_rows)
    attn.num_key_value_groups = len(q_keep_in_group)
    if mlp_keep is not None:
        mlp.gate_proj = _select_linear(mlp.gate_proj, rows=mlp_keep)
        mlp.up_proj = _select_linear(mlp.up_proj, rows=mlp_keep)
        mlp.down_proj = _select_linear(mlp.down_proj, cols=mlp_keep)


def _randomize(model, seed):
    """Larger-than-default random weights, so wrong weights or wiring change the logits a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_model(kind, tied, attn="sdpa", seed=0):
    common = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, head_dim=16, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    else:
        raise AssertionError(kind)
    model.set_attn_implementation(attn)
    _randomize(model, seed)
    return model.eval()


def pruned_model(kind, tied, attn="sdpa"):
    model = tiny_model(kind, tied, attn)
    if kind == "llama":  # MHA: a KV group is one head
        prune_layer(model, 0, kv_keep=[0, 2], mlp_keep=list(range(0, 96, 2)))
        prune_layer(model, 2, kv_keep=[3], mlp_keep=[5, 7, 90])
    else:  # GQA, n_rep = 2
        prune_layer(model, 0, q_keep_in_group=[1], mlp_keep=list(range(40)))  # n_rep 2 -> 1
        prune_layer(model, 1, kv_keep=[1])  # a whole KV group goes
        prune_layer(model, 2, mlp_keep=list(range(10, 96, 3)))
    return model


IDS = torch.tensor([[1, 5, 17, 33, 64, 8, 99, 42], [1, 7, 7, 3, 12, 50, 61, 70]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _generate(model, ids=IDS[:1]):
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


def _widths(model):
    return mio.layer_widths(model)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "kind,tied,attn",
    [("llama", True, "sdpa"), ("mistral", False, "eager"), ("qwen2", True, "sdpa"), ("qwen2", False, "eager")],
)
def test_round_trip_both_loaders(tmp_path, kind, tied, attn):
    model = pruned_model(kind, tied, attn)
    ref = _logits(model)
    ref_gen = _generate(model)
    out = mio.save_pruned(model, tmp_path / f"pruned_{kind}_{int(tied)}_{attn}", extra={"ratio": 0.25})
    assert out.is_dir()

    cfg = json.loads((out / "config.json").read_text())
    widths = _widths(model)
    for key, value in widths.items():
        assert cfg[key] == value
    assert "quantization_config" not in cfg
    assert json.loads((out / "pruning_info.json").read_text()) == {"ratio": 0.25}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tied)

    loaded, tok = mio.load_pruned(out, attn_implementation=attn)
    assert tok is None
    assert _widths(loaded) == widths
    assert torch.equal(_logits(loaded), ref)
    assert torch.equal(_generate(loaded), ref_gen)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation=attn).eval()
    assert type(remote).__name__ == "PrunedForCausalLM"
    assert _widths(remote) == widths
    assert torch.equal(_logits(remote), ref)
    assert torch.equal(_generate(remote), ref_gen)


def test_resave_of_reloaded_model_and_generation_config(tmp_path):
    model = pruned_model("mistral", tied=False)
    model.generation_config.max_new_tokens = 7
    ref = _logits(model)
    first = mio.save_pruned(model, tmp_path / "first")
    assert json.loads((first / "generation_config.json").read_text())["max_new_tokens"] == 7
    loaded, _ = mio.load_pruned(first)
    assert loaded.generation_config.max_new_tokens == 7
    second = mio.save_pruned(loaded, tmp_path / "second")  # a PrunedForCausalLM saves again
    again, _ = mio.load_pruned(second)
    assert torch.equal(_logits(again), ref)
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["model_type"] == "pruned_mistral"
    assert cfg["pruned_base_architecture"] == "MistralForCausalLM"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtype(tmp_path, dtype):
    model = pruned_model("qwen2", tied=True)
    rotary = model.model.rotary_emb
    inv_freq, original = rotary.inv_freq.clone(), rotary.original_inv_freq.clone()
    model = model.to(dtype)
    # transformers keeps the rotary frequencies in fp32 when it loads a half-precision model;
    # .to(dtype) casts them, which alone changes the logits, so the reference keeps them fp32.
    rotary.inv_freq, rotary.original_inv_freq = inv_freq, original
    ref = _logits(model)
    out = mio.save_pruned(model, tmp_path / "half")
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    loaded, _ = mio.load_pruned(out)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert loaded.model.layers[0].self_attn.q_proj.bias.dtype == dtype
    assert torch.equal(_logits(loaded), ref)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert remote.lm_head.weight.dtype == dtype
    assert torch.equal(_logits(remote), ref)
    as_fp32, _ = mio.load_pruned(out, dtype="float32")
    assert as_fp32.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        mio.load_pruned(out, dtype="float7")


def test_estimator_state_is_not_saved(tmp_path):
    model = pruned_model("llama", tied=False)
    for p in model.parameters():
        p.delta = torch.zeros_like(p)  # what an estimator might leave behind
        p.acc = [1, 2, 3]
    model.model.layers[1].mlp.register_buffer("acc_buffer", torch.ones(3))
    model.model.layers[1].mlp.moreau_state = {"step": 3}
    out = mio.save_pruned(model, tmp_path / "clean")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {k for k in model.state_dict() if "acc_buffer" not in k}
    assert keys == expected
    loaded, _ = mio.load_pruned(out)
    assert torch.equal(_logits(loaded), _logits(model))


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_tokenizer_and_extra_are_saved(tmp_path):
    model = pruned_model("qwen2", tied=False)
    tok = _tiny_tokenizer()
    extra = {"pruned": torch.tensor([1, 2]), "path": Path("/x/y"), "ratio": 0.2, "layers": (4, 5)}
    out = mio.save_pruned(model, tmp_path / "with_tok", tokenizer=tok, extra=extra)
    info = json.loads((out / "pruning_info.json").read_text())
    assert info == {"pruned": [1, 2], "path": "/x/y", "ratio": 0.2, "layers": [4, 5]}
    loaded, tok2 = mio.load_pruned(out)
    assert tok2 is not None
    assert tok2("w5 w17 w33")["input_ids"] == tok("w5 w17 w33")["input_ids"] == [5, 17, 33]
    ids = torch.tensor([tok2("w5 w17 w33 w64")["input_ids"]])
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


# --------------------------------------------------------------------------- atomic writes, overwrite


def _leftovers(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failed_write_leaves_no_temporary_dir(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    model = pruned_model("llama", tied=True)
    with pytest.raises(OSError, match="simulated"):
        mio.save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, "out") == []


def test_failed_overwrite_keeps_the_old_dir(tmp_path):
    out = tmp_path / "out"
    mio.save_pruned(pruned_model("llama", tied=True), out)
    before = (out / "model.safetensors").read_bytes()

    class BadTokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")
            raise RuntimeError("tokenizer write failed (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        mio.save_pruned(pruned_model("mistral", tied=False), out, tokenizer=BadTokenizer(), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert not (out / "tokenizer.json").exists()
    assert _leftovers(tmp_path, "out") == []


def test_failed_final_rename_restores_the_old_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    mio.save_pruned(pruned_model("llama", tied=True), out)
    before = (out / "config.json").read_text()
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        mio.save_pruned(pruned_model("qwen2", tied=False), out, overwrite=True)
    assert (out / "config.json").read_text() == before
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_refused_then_allowed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = pruned_model("mistral", tied=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mio.save_pruned(model, out)
    assert (out / "keep.txt").read_text() == "old"
    mio.save_pruned(model, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "out") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mio.save_pruned(model, empty) == empty.absolute()  # an empty dir is fine
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        mio.save_pruned(model, afile, overwrite=True)


# --------------------------------------------------------------------------- bad input


def test_save_rejects_bad_models_and_extra(tmp_path):
    with pytest.raises(TypeError, match="supports"):
        mio.save_pruned(nn.Linear(2, 2), tmp_path / "a")
    model = pruned_model("mistral", tied=False)
    model.model.layers[0].self_attn.num_key_value_groups = 2  # stale after removing query heads
    with pytest.raises(ValueError, match=r"model\.layers\.0.*num_key_value_groups"):
        mio.save_pruned(model, tmp_path / "b")
    model = pruned_model("llama", tied=False)
    model.model.layers[1].mlp.up_proj = nn.Linear(64, 10, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1: MLP widths disagree"):
        mio.save_pruned(model, tmp_path / "c")
    model = pruned_model("llama", tied=False)
    with pytest.raises(ValueError, match="pruning_info.json"):
        mio.save_pruned(model, tmp_path / "d", extra={"f": object()})
    with pytest.raises(TypeError, match="extra must be a dict"):
        mio.save_pruned(model, tmp_path / "e", extra=[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mio.load_pruned(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        mio.load_pruned(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]config\.json"):
        mio.load_pruned(tmp_path / "empty")

    plain = tmp_path / "plain"  # a transformers checkpoint of another family, no per-layer widths
    tiny_model("llama", tied=True).save_pretrained(plain)
    cfg = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is neither a pruned directory .* nor a stock "
                                         r"llama/mistral/qwen2 model"):
        mio.load_pruned(plain)
    half = dict(cfg, layer_num_attention_heads=[6, 6])  # some per-layer widths but not all
    (plain / "config.json").write_text(json.dumps(half))
    with pytest.raises(ValueError, match="has per-layer widths layer_num_attention_heads but not "
                                         "layer_num_key_value_heads, layer_intermediate_size"):
        mio.load_pruned(plain)

    out = mio.save_pruned(pruned_model("llama", tied=True), tmp_path / "good")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        mio.load_pruned(out)
    bad = dict(cfg, layer_intermediate_size=cfg["layer_intermediate_size"][:-1])
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="layer_intermediate_size' has 2 entries"):
        mio.load_pruned(out)
    bad = dict(cfg, pruned_base_architecture="GPT2LMHeadModel", model_type="gpt2")
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown base architecture"):
        mio.load_pruned(out)
    (out / "config.json").write_text(json.dumps(cfg))
    os.remove(out / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        mio.load_pruned(out)


def test_modeling_file_is_self_contained(tmp_path):
    src = mio.render_modeling_file("Qwen2ForCausalLM")
    imports = [ln.split()[1] for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert {m.split(".")[0] for m in imports} <= {"torch", "transformers"}
    assert "from transformers import Qwen2Config as _BaseConfig" in src
    assert "from transformers import Qwen2ForCausalLM as _BaseForCausalLM" in src
    assert 'PRUNED_MODEL_TYPE = "pruned_qwen2"' in src
    with pytest.raises(ValueError, match="unsupported base architecture"):
        mio.render_modeling_file("GPT2LMHeadModel")
    out = mio.save_pruned(pruned_model("qwen2", tied=True), tmp_path / "q")
    assert (out / "modeling_pruned.py").read_text() == src
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_pruned.PrunedForCausalLM"


def test_template_config_without_widths_is_an_error():
    module = mio.template_module("LlamaForCausalLM")
    cfg = module.PrunedConfig(vocab_size=10, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                              intermediate_size=8)
    with pytest.raises(ValueError, match="layer_num_attention_heads"):
        module.PrunedForCausalLM(cfg)


# --------------------------------------------------------------------------- real GGUF model


@pytest.mark.slow
def test_gguf_smollm2_round_trip(tmp_path, smollm2):
    model, tok = smollm2  # loaded from the GGUF file: transformers' save_pretrained refuses it
    assert getattr(model, "hf_quantizer", None) is not None
    assert model.config.tie_word_embeddings
    # SmolLM2: 9 query heads, 3 KV heads (n_rep 3), head_dim 64, 1536 MLP channels.
    prune_layer(model, 3, kv_keep=[0, 2], mlp_keep=list(range(0, 1536, 2)))
    prune_layer(model, 5, q_keep_in_group=[0, 2], mlp_keep=list(range(1000)))  # n_rep 3 -> 2
    prune_layer(model, 7, q_keep_in_group=[1])  # n_rep 3 -> 1
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    ref = _logits(model, ids)
    out = mio.save_pruned(model, tmp_path / "smol", tokenizer=tok, extra={"layers": [3, 5, 7]})
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["layer_num_attention_heads"][3:8] == [6, 9, 6, 9, 3]
    assert cfg["layer_num_key_value_heads"][3:8] == [2, 3, 3, 3, 3]

    loaded, tok2 = mio.load_pruned(out)
    assert tok2 is not None and tok2("The capital of France is")["input_ids"] == ids[0].tolist()
    assert torch.equal(_logits(loaded, ids), ref)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(_logits(remote, ids), ref)
    assert torch.equal(_generate(remote, ids), _generate(model, ids))


# --------------------------------------------------------------------------- quiet loading


def test_load_is_quiet_without_a_terminal(tmp_path, monkeypatch, capfd, caplog, recwarn):
    """Loading our own directory asks nothing and warns nothing (the tokenizer used to do both)."""
    import io as _io
    import logging

    from transformers.utils import logging as hf_logging

    model = pruned_model("qwen2", tied=False)
    tok = _tiny_tokenizer()
    out = mio.save_pruned(model, tmp_path / "quiet", tokenizer=tok)
    assert "auto_map" in json.loads((out / "config.json").read_text())  # what made AutoTokenizer prompt
    capfd.readouterr()
    monkeypatch.setattr("sys.stdin", _io.StringIO(""))  # stdin: closed, not a terminal
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO):
            loaded, tok2 = mio.load_pruned(out)
    finally:
        hf_logging.disable_propagation()
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text + "".join(str(w.message) for w in recwarn)
    for phrase in ("custom code", "[y/N]", "trust_remote_code", "You are using a model of type"):
        assert phrase not in text
    assert captured.out == ""
    # the only thing written is transformers' weight-loading progress bar
    assert all(line.startswith("Loading weights") or not line.strip()
               for line in captured.err.replace("\r", "\n").splitlines()), captured.err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert type(tok2).__name__ == type(tok).__name__
    ids = torch.tensor([tok2("w5 w17 w33 w64")["input_ids"]])
    assert ids[0].tolist() == [5, 17, 33, 64]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_tokenizer_class_fallback_and_error(tmp_path):
    model = pruned_model("llama", tied=True)
    out = mio.save_pruned(model, tmp_path / "tok", tokenizer=_tiny_tokenizer())
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "NoSuchTokenizerFast"  # e.g. written by another library
    cfg_path.write_text(json.dumps(cfg))
    _, tok = mio.load_pruned(out)  # the generic fast tokenizer reads tokenizer.json
    assert tok("w5 w17")["input_ids"] == [5, 17]
    os.remove(out / "tokenizer.json")
    os.remove(out / COMPLETE_FILE)  # (as another tool's directory: with the marker, a removed file is refused)
    with pytest.raises(ValueError, match="NoSuchTokenizerFast"):
        mio.load_pruned(out)
