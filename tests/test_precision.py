"""fp32-accumulated half-precision GEMMs on the CPU (moreau_pruner.model.precision)."""
import pytest
import torch
import torch.nn.functional as F

from moreau_pruner.model.precision import fp32_accumulate_gemms, slow_half_gemm


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def test_linear_matches_an_fp32_product_rounded_once():
    torch.manual_seed(1)
    x = torch.randn(7, 33, dtype=torch.float16, requires_grad=True)
    w = torch.randn(19, 33, dtype=torch.float16, requires_grad=True)
    b = torch.randn(19, dtype=torch.float16, requires_grad=True)
    with fp32_accumulate_gemms() as mode:
        y = F.linear(x, w, b)
        y.float().square().sum().backward()
    assert mode.calls == 1 and y.dtype == torch.float16
    expect = F.linear(x.detach().float(), w.detach().float(), b.detach().float()).half()
    assert torch.equal(y, expect)
    gy = (2 * y.float()).half().float()  # the gradient reaching the product, rounded by the cast node
    assert torch.equal(w.grad, (gy.t() @ x.detach().float()).half())
    assert torch.equal(x.grad, (gy @ w.detach().float()).half())
    assert x.grad.dtype == w.grad.dtype == torch.float16


def test_other_dtypes_and_functions_pass_through():
    a = torch.randn(5, 6)
    with fp32_accumulate_gemms() as mode:
        out = a @ a.t()
        h = torch.randn(4, 4, dtype=torch.float16)
        s = (h + h).sum()  # not a matrix product
    assert mode.calls == 0 and out.dtype == torch.float32 and s.dtype == torch.float16
    with pytest.raises(ValueError, match="float16/bfloat16"):
        with fp32_accumulate_gemms((torch.float32,)):
            pass


def test_matmul_bmm_and_attention_are_handled():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float16) for _ in range(3))
    with fp32_accumulate_gemms() as mode:
        m = q @ k.transpose(-1, -2)
        bm = torch.bmm(q[0], k[0].transpose(-1, -2))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert mode.calls == 3
    assert torch.equal(m, (q.float() @ k.float().transpose(-1, -2)).half())
    assert torch.equal(bm, m[0])
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).half()
    assert torch.equal(att, ref)


def test_tiny_llama_fp16_forward_backward_agrees_with_native_fp16():
    """The emulated fp16 model computes what native fp16 does up to summation order: logits and
    gradients within a few fp16 ulps; and it stays an fp16 model (fp16 gradients)."""
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(3))
    native = _tiny_llama(torch.float16)
    emul = _tiny_llama(torch.float16)
    out_n = native(input_ids=ids, labels=ids)
    out_n.loss.backward()
    with fp32_accumulate_gemms() as mode:
        out_e = emul(input_ids=ids, labels=ids)
        out_e.loss.backward()
    assert mode.calls > 0
    assert out_e.logits.dtype == torch.float16
    assert torch.allclose(out_e.logits.float(), out_n.logits.float(), atol=2e-2, rtol=1e-2)
    assert abs(out_e.loss.item() - out_n.loss.item()) < 1e-2
    for (name, pn), pe in zip(native.named_parameters(), emul.parameters()):
        assert pe.grad.dtype == torch.float16, name
        scale = pn.grad.float().abs().max().clamp_min(1e-3)
        assert ((pe.grad.float() - pn.grad.float()).abs().max() / scale) < 5e-2, name


def test_slow_half_gemm():
    assert slow_half_gemm(torch.float16, "cpu")
    assert not slow_half_gemm(torch.bfloat16, "cpu")
    assert not slow_half_gemm(torch.float16, "cuda")
