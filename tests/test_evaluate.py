"""Tests for moreau_pruner.evaluate.perplexity: perplexity protocol and greedy generation."""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from moreau_pruner import data
from moreau_pruner.evaluate.perplexity import evaluate_perplexity, generate_text, perplexity

from _tiny import word_tokenizer

WORDS = (
    "the a of is to and in it that for on with as be by this are an or at from "
    "statement expression value object function name class return if else"
).split()


def _word_tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


def _tiny_llama(vocab_size, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # larger weights than the default init so that predictions are far from uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return _tiny_llama(len(tokenizer))


class FakeLM(torch.nn.Module):
    """Returns logits from a function of the input ids; records the batch shapes it saw."""

    def __init__(self, vocab, fn, dtype=torch.float32):
        super().__init__()
        self.vocab, self.fn, self.dtype_ = vocab, fn, dtype
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.shapes = []
        self.modes = []

    def forward(self, input_ids, use_cache=None, **kwargs):
        self.shapes.append(tuple(input_ids.shape))
        self.modes.append(self.training)
        return SimpleNamespace(logits=self.fn(input_ids, self.vocab).to(self.dtype_))


def _uniform(ids, vocab):
    return torch.zeros(*ids.shape, vocab)


def _hand_ppl(model, ids, seq_len, n_windows):
    """Independent reference: one window at a time, float64 log-softmax."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * seq_len : (w + 1) * seq_len][None]
            logp = model(input_ids=x).logits[0].double().log_softmax(-1)
            for t in range(seq_len - 1):
                total -= float(logp[t, x[0, t + 1]])
                count += 1
    return math.exp(total / count), count


# ------------------------------------------------------------------ perplexity values
def test_uniform_model_has_perplexity_vocab_size():
    model = FakeLM(50, _uniform)
    ids = torch.randint(0, 50, (4 * 16 + 3,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, None, ids, seq_len=16, progress=False) == pytest.approx(50, rel=1e-6)


def test_log_softmax_is_fp32_for_bf16_logits():
    # in bf16 log(50000) rounds to 10.8125 -> exp = 49590 (0.8 % off); fp32 gives 50000
    vocab = 50_000
    model = FakeLM(vocab, _uniform, dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (2 * 8,), generator=torch.Generator().manual_seed(1))
    ppl = perplexity(model, None, ids, seq_len=8, progress=False)
    assert ppl == pytest.approx(vocab, rel=1e-5)


def test_perfect_predictor_has_perplexity_one():
    def next_is_plus_one(ids, vocab):
        return 30.0 * torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float()

    model = FakeLM(20, next_is_plus_one)
    ids = torch.arange(64) % 20
    assert perplexity(model, None, ids, seq_len=16, progress=False) == pytest.approx(1.0, abs=1e-9)


def test_perplexity_matches_hand_computation(llama, tokenizer):
    V = len(tokenizer)
    ids = torch.randint(0, V, (3 * 16 + 5,), generator=torch.Generator().manual_seed(3))
    hand, count = _hand_ppl(llama, ids, 16, 3)
    res = evaluate_perplexity(llama, None, ids, seq_len=16, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(hand, rel=1e-5)
    assert (res.n_windows, res.n_predicted, res.seq_len, res.n_tokens) == (3, count, 16, 53)
    assert res.mean_nll == pytest.approx(math.log(hand), rel=1e-5)
    assert abs(res.ppl - V) > 1.0  # the model is not trivially uniform, so the check has teeth
    # max_windows: only the first windows count
    hand2, _ = _hand_ppl(llama, ids, 16, 2)
    assert perplexity(llama, None, ids, seq_len=16, max_windows=2, progress=False) == pytest.approx(
        hand2, rel=1e-5
    )
    # the same ids as [1, L] tensor and as a list
    assert perplexity(llama, None, ids[None], seq_len=16, progress=False) == pytest.approx(res.ppl, rel=1e-6)
    assert perplexity(llama, None, ids.tolist(), seq_len=16, progress=False) == pytest.approx(res.ppl, rel=1e-6)


def test_text_input_tokenised_once(llama, tokenizer):
    text = data.heldout_text("pydoc")[:20_000]
    ids = data.tokenize_text(tokenizer, text)
    from_text = perplexity(llama, tokenizer, text, seq_len=32, max_windows=6, progress=False)
    from_ids = perplexity(llama, None, ids, seq_len=32, max_windows=6, progress=False)
    assert from_text == from_ids and math.isfinite(from_text)


def test_bf16_model_close_to_fp32(tokenizer, llama):
    ids = torch.randint(0, len(tokenizer), (4 * 32,), generator=torch.Generator().manual_seed(4))
    bf16 = _tiny_llama(len(tokenizer), dtype=torch.bfloat16)
    p32 = perplexity(llama, None, ids, seq_len=32, progress=False)
    p16 = perplexity(bf16, None, ids, seq_len=32, progress=False)
    assert math.isfinite(p16) and p16 == pytest.approx(p32, rel=0.1)


# ------------------------------------------------------------------ windows, modes, progress
def test_window_count_and_batching():
    model = FakeLM(10, _uniform)
    ids = torch.zeros(5 * 16 + 15, dtype=torch.long)
    res = evaluate_perplexity(model, None, ids, seq_len=16, batch_size=2, progress=False)
    assert model.shapes == [(2, 16), (2, 16), (1, 16)]
    assert (res.n_windows, res.n_predicted, res.n_tokens) == (5, 5 * 15, 95)
    model.shapes.clear()
    res = evaluate_perplexity(model, None, ids, seq_len=16, batch_size=8, max_windows=3, progress=False)
    assert model.shapes == [(3, 16)] and res.n_windows == 3
    model.shapes.clear()
    res = evaluate_perplexity(model, None, ids[:16], seq_len=16, progress=False)
    assert model.shapes == [(1, 16)] and res.n_predicted == 15


def test_eval_mode_during_and_restored_after(capsys):
    model = FakeLM(10, _uniform)
    model.train()
    perplexity(model, None, torch.zeros(64, dtype=torch.long), seq_len=16, batch_size=4, progress=True)
    assert model.modes == [False] and model.training
    assert "perplexity@16" in capsys.readouterr().err  # the tqdm bar
    model.eval()
    perplexity(model, None, torch.zeros(32, dtype=torch.long), seq_len=16, progress=False)
    assert not model.training


def test_plain_module_without_use_cache_argument():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 7)

        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 7)  # a bare logits tensor

    ppl = perplexity(Plain(), None, torch.zeros(32, dtype=torch.long), seq_len=16, progress=False)
    assert ppl == pytest.approx(7, rel=1e-6)


def test_no_grad():
    seen = []

    def check(ids, vocab):
        seen.append(torch.is_grad_enabled())
        return torch.zeros(*ids.shape, vocab)

    perplexity(FakeLM(5, check), None, torch.zeros(32, dtype=torch.long), seq_len=16, progress=False)
    assert seen == [False]


# ------------------------------------------------------------------ errors
def test_nan_logits_raise_naming_the_window():
    def nan_in_second_window(ids, vocab):
        out = torch.zeros(*ids.shape, vocab)
        out[1, 3] = float("nan")
        return out

    model = FakeLM(10, nan_in_second_window)
    with pytest.raises(FloatingPointError, match="NaN.*window 1"):
        perplexity(model, None, torch.zeros(48, dtype=torch.long), seq_len=16, batch_size=4, progress=False)


def test_inf_nll_raises():
    def minus_inf_on_targets(ids, vocab):
        out = torch.zeros(*ids.shape, vocab)
        out[..., 0] = float("-inf")  # every target is token 0
        return out

    model = FakeLM(10, minus_inf_on_targets)
    model.train()
    with pytest.raises(FloatingPointError, match="infinite"):
        perplexity(model, None, torch.zeros(32, dtype=torch.long), seq_len=16, progress=False)
    assert model.training  # mode restored even on error


def test_ids_outside_vocabulary(llama):
    V = llama.config.vocab_size
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(llama, None, torch.full((32,), V, dtype=torch.long), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(llama, None, torch.full((32,), -1, dtype=torch.long), seq_len=16, progress=False)


def test_bad_input_errors(tokenizer):
    model = FakeLM(10, _uniform)
    with pytest.raises(ValueError, match="too short.*10 tokens"):
        perplexity(model, None, torch.zeros(10, dtype=torch.long), seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, None, torch.zeros(10, dtype=torch.long), seq_len=1)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, None, torch.zeros(32, dtype=torch.long), seq_len=16, batch_size=0)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, None, torch.zeros(32, dtype=torch.long), seq_len=16, max_windows=0)
    with pytest.raises(TypeError, match="integer tensor"):
        perplexity(model, None, torch.zeros(32), seq_len=16)
    with pytest.raises(ValueError, match="shape"):
        perplexity(model, None, torch.zeros(2, 32, dtype=torch.long), seq_len=16)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, None, "some text", seq_len=16)
    with pytest.raises(TypeError):
        perplexity(model, tokenizer, 3.5, seq_len=16)


# ------------------------------------------------------------------ generation
def _naive_greedy(model, ids, n):
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, -n:].tolist()


def test_generate_text_is_greedy(llama, tokenizer):
    prompt = "the value of the expression is"
    out = generate_text(llama, tokenizer, prompt, max_new_tokens=8, stop_at_eos=False)
    prompt_ids = data.tokenize_text(tokenizer, prompt)[None]
    expected = _naive_greedy(llama, prompt_ids, 8)
    assert out == tokenizer.decode(expected, skip_special_tokens=True)
    assert out == generate_text(llama, tokenizer, prompt, max_new_tokens=8, stop_at_eos=False)
    assert isinstance(out, str)


def test_generate_text_stops_at_eos_and_errors(tokenizer):
    def always_eos(ids, vocab):
        out = torch.zeros(*ids.shape, vocab)
        out[..., 2] = 5.0
        return out

    model = FakeLM(len(tokenizer), always_eos)
    assert generate_text(model, tokenizer, "the class", max_new_tokens=5) == ""
    assert len(model.shapes) == 1
    with pytest.raises(ValueError, match="prompt"):
        generate_text(model, tokenizer, "")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(model, tokenizer, "the", max_new_tokens=0)


# ------------------------------------------------------------------ the real model (slow)
@pytest.mark.slow
def test_smollm2_dense_perplexity_on_pydoc_heldout(smollm2_shared):
    model, tok = smollm2_shared
    t0 = time.perf_counter()
    res = evaluate_perplexity(model, tok, data.heldout_text("pydoc"), seq_len=128, batch_size=8,
                              max_windows=16, progress=False)
    t_eval = time.perf_counter() - t0
    print(f"\nSmolLM2-135M Q4_1 dense PPL@128 on pydoc held-out: {res.ppl:.3f} "
          f"({res.n_windows} windows of {res.n_tokens // 128}; eval {t_eval:.1f}s)")
    assert math.isfinite(res.ppl) and 1.5 < res.ppl < 200
    text = generate_text(model, tok, "The Python assert statement", max_new_tokens=12)
    print(f"greedy continuation: {text!r}")
    assert text.strip()
