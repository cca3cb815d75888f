"""GGUF export (moreau-export --gguf): what the file says, read back with the gguf package's reader.

Running the files in llama.cpp is tests/test_llamacpp.py; these tests need only the gguf package."""
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moreau_pruner.cli.export import main  # noqa: E402
from moreau_pruner.io.gguf import export_gguf, pre_tokenizer_name  # noqa: E402

from _engines import PER_LAYER, VOCAB, per_layer_model, save, stock_model  # noqa: E402


def fields(path):
    """{key: value} of a GGUF file's metadata (arrays as lists) and {name: (type, shape)} of its tensors."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for k, f in r.fields.items():
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                out[k] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                out[k] = [f.parts[i].tolist()[0] for i in f.data]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[k] = bytes(f.parts[f.data[0]]).decode("utf-8")
        else:
            out[k] = f.parts[f.data[0]].tolist()[0]
    tensors = {t.name: [t.tensor_type.name, list(reversed(t.shape.tolist()))] for t in r.tensors}
    return out, tensors, r


def unpair(w, n_head):
    """The inverse of the export's rotary row order (adjacent pairs back to halves)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist()))))


@pytest.mark.parametrize("kind", sorted(PER_LAYER))
def test_per_layer_model_is_deci_with_per_layer_arrays(tmp_path, small_tokenizer_dir, kind):
    model = per_layer_model(kind)
    d = save(model, tmp_path / "m", small_tokenizer_dir)
    plan = export_gguf(d, tmp_path / "m.gguf", "f32")
    kv, tensors, reader = fields(tmp_path / "m.gguf")
    heads, kv_heads, ff = PER_LAYER[kind]
    assert plan.arch == kv["general.architecture"] == "deci"
    assert kv["deci.attention.head_count"] == heads
    assert kv["deci.attention.head_count_kv"] == kv_heads
    assert kv["deci.feed_forward_length"] == ff
    assert kv["deci.attention.key_length"] == kv["deci.attention.value_length"] == kv["deci.rope.dimension_count"] == 8
    assert kv["deci.block_count"] == 4 and kv["deci.embedding_length"] == 48 and kv["deci.vocab_size"] == VOCAB
    sd = model.state_dict()
    for il in range(4):
        assert tensors[f"blk.{il}.attn_q.weight"] == ["F32", [heads[il] * 8, 48]]
        assert tensors[f"blk.{il}.attn_k.weight"] == ["F32", [kv_heads[il] * 8, 48]]
        assert tensors[f"blk.{il}.attn_output.weight"] == ["F32", [48, heads[il] * 8]]
        assert tensors[f"blk.{il}.ffn_down.weight"] == ["F32", [48, ff[il]]]
        # q/k rows are reordered for GGML's rotary layout, everything else is copied as it is
        q = tensor(reader, f"blk.{il}.attn_q.weight")
        assert torch.equal(unpair(q, heads[il]), sd[f"model.layers.{il}.self_attn.q_proj.weight"])
        assert not torch.equal(q, sd[f"model.layers.{il}.self_attn.q_proj.weight"])
        k = tensor(reader, f"blk.{il}.attn_k.weight")
        assert torch.equal(unpair(k, kv_heads[il]), sd[f"model.layers.{il}.self_attn.k_proj.weight"])
        assert torch.equal(tensor(reader, f"blk.{il}.ffn_up.weight"), sd[f"model.layers.{il}.mlp.up_proj.weight"])
        if kind == "qwen2":
            qb = tensor(reader, f"blk.{il}.attn_q.bias")
            assert torch.equal(unpair(qb, heads[il]), sd[f"model.layers.{il}.self_attn.q_proj.bias"])
            assert torch.equal(tensor(reader, f"blk.{il}.attn_v.bias"), sd[f"model.layers.{il}.self_attn.v_proj.bias"])
    # tied embeddings (golden's llama) are stored once, as token_embd
    assert ("output.weight" in tensors) == (kind != "llama")


@pytest.mark.parametrize("kind,pruned_heads,arch", [
    ("llama", True, "llama"), ("mistral", False, "llama"), ("qwen2", False, "qwen2"), ("qwen2", True, "llama")])
def test_uniform_models_are_llama_or_qwen2(tmp_path, small_tokenizer_dir, kind, pruned_heads, arch):
    """Equal layers give the stock architectures; a Qwen2 whose heads no longer fill hidden_size is
    written as llama (llama.cpp's qwen2 graph sizes attn_q as hidden x hidden)."""
    heads = [4] * 4 if pruned_heads else [6] * 4
    kv = [2] * 4 if kind != "qwen2" else ([2] * 4 if pruned_heads else [3] * 4)
    model = per_layer_model(kind, widths=(heads, kv, [24] * 4))
    d = save(model, tmp_path / "m", small_tokenizer_dir)
    plan = export_gguf(d, tmp_path / "m.gguf", "f32")
    kv_, tensors, reader = fields(tmp_path / "m.gguf")
    assert plan.arch == kv_["general.architecture"] == arch
    assert kv_[f"{arch}.attention.head_count"] == heads[0]
    assert kv_[f"{arch}.feed_forward_length"] == 24
    q = tensor(reader, "blk.0.attn_q.weight")
    sd_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    # qwen2 is GGML's "neox" rotary layout, the same halves as transformers: no reordering
    assert torch.equal(q, sd_q) if arch == "qwen2" else torch.equal(unpair(q, heads[0]), sd_q)


def test_smollm2_tokenizer_carried_over_exactly(tmp_path, smollm2_tokenizer_dir):
    """The tokens, token types, merges, special ids and chat template of the exported file are those of
    the embedded SmolLM2 GGUF (llama.cpp's own converter wrote it)."""
    from moreau_pruner.model.loading import embedded_model_path

    d = save(stock_model("llama", vocab_size=49152), tmp_path / "m", smollm2_tokenizer_dir)
    export_gguf(d, tmp_path / "m.gguf", "f16")
    ours, _, _ = fields(tmp_path / "m.gguf")
    ref, _, _ = fields(embedded_model_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"):
        assert ours[key] == ref[key], key
    # transformers' GGUF reader rebuilds SmolLM2's tokenizer with the plain GPT-2 split (no digit rule),
    # and the export names what the tokenizer.json does
    assert ours["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.parametrize("outtype,matrix_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_outtypes(tmp_path, small_tokenizer_dir, outtype, matrix_type):
    model = stock_model("mistral", hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64)
    d = save(model, tmp_path / "m", small_tokenizer_dir)
    plan = export_gguf(d, tmp_path / "m.gguf", outtype)
    kv, tensors, reader = fields(tmp_path / "m.gguf")
    assert kv["general.file_type"] == int(getattr(gguf.LlamaFileType, {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
                                                                         "q8_0": "MOSTLY_Q8_0"}[outtype]))
    assert tensors["blk.0.ffn_down.weight"][0] == matrix_type
    assert tensors["token_embd.weight"][0] == matrix_type
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"  # 1-D tensors stay F32
    assert plan.f16_fallback == []
    if outtype == "q8_0":  # dequantized weights are within q8_0's rounding of the originals
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        back = gguf.quants.dequantize(t.data, t.tensor_type)
        want = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
        assert np.abs(back - want).max() <= np.abs(want).max() / 127 + 1e-6


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path, small_tokenizer_dir):
    d = save(per_layer_model("llama"), tmp_path / "m", small_tokenizer_dir)  # 48-wide rows
    plan = export_gguf(d, tmp_path / "m.gguf", "q8_0")
    _, tensors, _ = fields(tmp_path / "m.gguf")
    assert plan.f16_fallback and all(tensors[n][0] == "F16" for n in plan.f16_fallback)
    assert "blk.0.attn_q.weight" in plan.f16_fallback


def test_llama3_rope_is_written_as_rope_freqs(tmp_path, small_tokenizer_dir):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = stock_model("mistral", rope_parameters=rope)
    d = save(model, tmp_path / "m", small_tokenizer_dir)
    export_gguf(d, tmp_path / "m.gguf", "f32")
    kv, tensors, reader = fields(tmp_path / "m.gguf")
    assert kv["llama.rope.freq_base"] == 500000.0
    factors = tensor(reader, "rope_freqs.weight")
    inv = model.model.rotary_emb.inv_freq.double()
    base = 1.0 / 500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert torch.allclose(factors.double(), base / inv, rtol=1e-6)
    assert factors.max() > 1  # the scaling does something on this model


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    from moreau_pruner.io.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT

    no_regex = dict(byte_level, use_regex=False)
    for pattern, name in ((_LLAMA3_SPLIT, "llama-bpe"), (_QWEN2_SPLIT, "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, no_regex]}) == name
        assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, byte_level]}) is None
    assert pre_tokenizer_name(dict(byte_level, add_prefix_space=True)) is None
    assert pre_tokenizer_name({"type": "Whitespace"}) is None
    assert pre_tokenizer_name(None) is None


def _tokenizer_json(directory, edit):
    path = directory / "tokenizer.json"
    tj = json.loads(path.read_text())
    edit(tj)
    path.write_text(json.dumps(tj))


@pytest.mark.parametrize("change,match", [
    (lambda d: _tokenizer_json(d, lambda tj: tj.update(pre_tokenizer={"type": "Whitespace"})),
     "no pre-tokenizer that splits text like this"),
    (lambda d: _tokenizer_json(d, lambda tj: tj["model"].update(byte_fallback=True)), "byte fallback"),
    (lambda d: _tokenizer_json(d, lambda tj: tj.update(normalizer={"type": "NFC"})), "normalizes text first"),
    (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json", "moreau_complete.json")],
     "has no tokenizer.json"),  # (as another tool's directory: with the marker, removed files are refused)
    (lambda d: _config(d, hidden_act="gelu"), "MLP activation 'gelu'"),
    (lambda d: _config(d, sliding_window=16), "sliding window of 16 tokens"),
    (lambda d: _config(d, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
     "rope type 'dynamic'"),
])
def test_refusals_name_the_limit_and_leave_nothing(tmp_path, small_tokenizer_dir, change, match):
    d = save(stock_model("mistral"), tmp_path / "m", small_tokenizer_dir)
    change(d)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match=match):
        export_gguf(d, out, "f16", overwrite=True)
    assert out.read_bytes() == b"old"
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def _config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, small_tokenizer_dir):
    model = stock_model("mistral")
    with torch.no_grad():  # keep only the first 1000 rows of the vocabulary
        for lin in (model.model.embed_tokens, model.lm_head):
            lin.weight = torch.nn.Parameter(lin.weight[:1000].clone())
    model.config.vocab_size = 1000
    d = save(model, tmp_path / "m", small_tokenizer_dir)
    with pytest.raises(ValueError, match="token id 1023 but the embedding has only 1000 rows"):
        export_gguf(d, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_write_error_leaves_nothing(tmp_path, small_tokenizer_dir, monkeypatch):
    d = save(stock_model("llama"), tmp_path / "m", small_tokenizer_dir)

    def broken(self, *, progress=False):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(d, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli(tmp_path, small_tokenizer_dir, capsys):
    d = save(per_layer_model("qwen2"), tmp_path / "m", small_tokenizer_dir)
    out = tmp_path / "m.gguf"
    assert main([str(d), "--gguf", str(out), "--outtype", "f32"]) == 0
    text = capsys.readouterr().out
    assert "deci (4 layers; per-layer: heads 2-6, KV heads 1-3, MLP 9-40; head_dim 8)" in text
    assert "f32, " in text and str(out) in text
    # an existing file is kept unless --overwrite
    assert main([str(d), "--gguf", str(out)]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main([str(d), "--gguf", str(out), "--overwrite", "--outtype", "bf16"]) == 0
    assert fields(out)[1]["blk.0.ffn_up.weight"][0] == "BF16"
    # a directory that is not a model
    assert main([str(tmp_path), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(d), "--gguf", str(out), "--outtype", "q4_0"])
