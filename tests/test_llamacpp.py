"""Our exports run in llama.cpp (through llama-cpp-python): the same logits as ``load_pruned`` on the same
tokens, the same tokenization, and llama.cpp's own converter reading our ``--uniform`` output.

llama-cpp-python has no Linux x86_64 wheel on the package index; scripts/setup.sh builds version
``LLAMA_CPP_PYTHON`` from its sdist once, keeps the wheel, and extracts the sdist's copy of llama.cpp's
``convert_hf_to_gguf.py`` (with its ``conversion`` and ``gguf-py`` folders). Without them these tests skip
and say why."""
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

LLAMA_CPP_PYTHON = "0.3.36"
SETUP_HINT = (f"scripts/setup.sh builds llama-cpp-python {LLAMA_CPP_PYTHON} from its sdist "
              "(unless MOREAU_SKIP_LLAMA_CPP=1)")
llama_cpp = pytest.importorskip("llama_cpp", reason=f"needs llama-cpp-python: {SETUP_HINT}")

from moreau_pruner import MoreauConfig, PruneConfig, load_pruned, prune_model  # noqa: E402
from moreau_pruner.io.gguf import export_gguf  # noqa: E402

from _engines import cache_dir, per_layer_model, save, stock_model, token_ids  # noqa: E402

TOL = 1e-3  # of the logit range, for f32 files


def converter_dir() -> Path:
    d = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if not (d / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"needs llama.cpp's convert_hf_to_gguf.py in {d}: {SETUP_HINT}")
    return d


def llama(path, extra_buffers=True, **kw):
    """llama.cpp on ``path`` with an f32 KV cache (its default is f16, which alone moves the logits of
    these sharp-attention test models by about 1 % of their range). ``extra_buffers=False`` turns off
    llama.cpp's repacked CPU weight buffers (AMX, CPU_REPACK; ``use_extra_bufts``, which
    llama-cpp-python's ``Llama`` does not expose): on a CPU with AMX_INT8 its AMX matmul of Q8_0
    weights segfaults on these small models (llama.cpp's own converter's Q8_0 files as well; reported
    upstream as ggml-org/llama.cpp#20824)."""
    f32 = llama_cpp.GGML_TYPE_F32
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = extra_buffers
        return p

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params):
        return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True,
                               type_k=f32, type_v=f32, verbose=False, **kw)


def llama_logits(path, ids, extra_buffers=True) -> np.ndarray:
    llm = llama(path, extra_buffers)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def our_logits(directory, ids) -> np.ndarray:
    model, _ = load_pruned(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def assert_same_logits(directory, gguf_path, tol=TOL, ids=None, extra_buffers=True):
    ids = ids or token_ids()
    ours, theirs = our_logits(directory, ids), llama_logits(gguf_path, ids, extra_buffers)
    assert theirs.shape == ours.shape
    span = ours.max() - ours.min()
    worst = np.abs(ours - theirs).max()
    assert worst <= tol * span, f"max |difference| {worst:.3g} > {tol} x logit range {span:.3g}"
    return worst / span


def uniform_pruned(kind, **overrides):
    """golden's ``kind`` pruned by the library with uniform widths (query heads, local): one query head of
    every KV group goes (ratio 0.35 of golden's 3 heads per group, 0.5 of Qwen2's 2)."""
    model = stock_model(kind, **overrides)
    x = torch.tensor([token_ids(32, seed=1), token_ids(32, seed=2)])
    ratio = 0.5 if kind == "qwen2" else 0.35
    prune_model(model, x, "moreau", PruneConfig(ratio=ratio, granularity="query-heads", uniform=True),
                moreau=MoreauConfig(iters=2), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features < model.config.hidden_size, "the pruning should remove query heads"
    return model


CASES = {
    # name: (builder, GGUF architecture)
    "llama per-layer, tied": (lambda: per_layer_model("llama"), "deci"),
    "mistral per-layer, GQA": (lambda: per_layer_model("mistral"), "deci"),
    "qwen2 per-layer, biases": (lambda: per_layer_model("qwen2"), "deci"),
    "llama uniform, pruned": (lambda: uniform_pruned("llama"), "llama"),
    "qwen2 uniform, pruned": (lambda: uniform_pruned("qwen2"), "llama"),
    "qwen2 unpruned": (lambda: stock_model("qwen2"), "qwen2"),
    "llama 128 hidden, 8 -> 6 heads (stock mistral)": (
        lambda: uniform_pruned("llama", hidden_size=128, head_dim=16, num_attention_heads=8, num_key_value_heads=2,
                               intermediate_size=64), "llama"),
    "mistral llama3 rope": (lambda: stock_model("mistral", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), "llama"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_logits_match_ours(tmp_path, small_tokenizer_dir, name):
    build, arch = CASES[name]
    d = save(build(), tmp_path / "m", small_tokenizer_dir)
    plan = export_gguf(d, tmp_path / "m.gguf", "f32")
    assert plan.arch == arch
    assert_same_logits(d, tmp_path / "m.gguf")


def test_the_test_sees_a_wrong_rotary_order(tmp_path, small_tokenizer_dir, monkeypatch):
    """Without the q/k row reordering the logits differ by far more than the tolerance."""
    import moreau_pruner.io.gguf as g

    d = save(per_layer_model("mistral"), tmp_path / "m", small_tokenizer_dir)
    monkeypatch.setattr(g, "_rotary_rows", lambda w, n_head: w)
    export_gguf(d, tmp_path / "m.gguf", "f32")
    with pytest.raises(AssertionError, match=r"max \|difference\|"):
        assert_same_logits(d, tmp_path / "m.gguf")


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-2), ("bf16", 0.15), ("q8_0", 0.2)])
def test_llama_cpp_runs_the_smaller_outtypes(tmp_path, small_tokenizer_dir, outtype, tol):
    """The f16, bf16 and q8_0 files run with our logits up to their rounding. llama.cpp rounds the
    activations to the weights' type as well (its vec_dot types), and these models' sharpened attention
    amplifies that: measured 0.009 (f16), 0.092 (bf16), 0.134 (q8_0) of the logit range, against 0.79
    for a file with the wrong q/k row order in bf16 or q8_0 (rounding our weights alone to the file's
    type moves our logits by 0.0065, 0.051, 0.098). Q8_0 runs without llama.cpp's repacked buffers
    (see ``llama``)."""
    model = per_layer_model("llama", hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                            widths=([4, 2, 4, 2], [2, 1, 1, 2], [64, 32, 96, 32]))
    d = save(model, tmp_path / "m", small_tokenizer_dir)
    plan = export_gguf(d, tmp_path / "m.gguf", outtype)
    assert plan.f16_fallback == []
    assert_same_logits(d, tmp_path / "m.gguf", tol=tol, extra_buffers=outtype != "q8_0")


def test_llama_cpp_tokenizes_like_transformers(tmp_path, smollm2_tokenizer_dir):
    """The exported tokenizer (SmolLM2's whole vocabulary) splits text as transformers does, digits,
    whitespace runs and special tokens included, and adds no BOS where transformers adds none."""
    from transformers import PreTrainedTokenizerFast

    d = save(stock_model("llama", vocab_size=49152), tmp_path / "m", smollm2_tokenizer_dir)
    export_gguf(d, tmp_path / "m.gguf", "f16")
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    texts = ["Hello world! In 2024, 12345 people paid $3.50 each.", "  indented\n\n\tcode(x) == y  # ok\r\n",
             "naïve café — 日本語 テキスト 🙂", "<|im_start|>user\nHi<|im_end|>\n", "don't I'll we've ABC's"]
    try:
        for text in texts:
            want = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
    finally:
        llm.close()


def _convert(src: Path, out: Path, directory: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    return subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(directory), "--outfile", str(out),
                           "--outtype", "f32"], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_llama_cpp_converter_reads_our_uniform_output(tmp_path, smollm2_tokenizer_dir, kind):
    """llama.cpp's own convert_hf_to_gguf.py converts a --uniform directory (pruned heads: head_dim no
    longer hidden/heads) and llama.cpp runs the result with our logits. (Its Qwen2 path does not take
    this test's SmolLM2 tokenizer, whose pre-tokenizer hash it does not know for Qwen2, so Qwen2 is
    not converted here.)"""
    src = converter_dir()
    d = save(uniform_pruned(kind, vocab_size=49152), tmp_path / "m", smollm2_tokenizer_dir)
    res = _convert(src, tmp_path / "theirs.gguf", d)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_logits(d, tmp_path / "theirs.gguf")


def test_llama_cpp_qwen2_graph_needs_heads_that_fill_hidden(tmp_path, small_tokenizer_dir, monkeypatch):
    """llama.cpp's qwen2 graph sizes attn_q as hidden x hidden, so a Qwen2 with pruned heads written
    as qwen2 (what llama.cpp's own converter does for Qwen2ForCausalLM) does not load; moreau-export
    writes it as llama ("qwen2 uniform, pruned" above)."""
    import moreau_pruner.io.gguf as g

    d = save(uniform_pruned("qwen2"), tmp_path / "m", small_tokenizer_dir)
    monkeypatch.setattr(g, "_architecture", lambda *a: "qwen2")
    export_gguf(d, tmp_path / "as-qwen2.gguf", "f32")
    with pytest.raises(ValueError):
        llama(tmp_path / "as-qwen2.gguf")
