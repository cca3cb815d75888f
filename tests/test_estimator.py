"""The Moreau estimator on tiny models: exact restore, averaging, noise streams, errors (the
reference strategy), and the strategy interface: names, refusals, objects."""
import dataclasses
import re
from functools import partial

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moreau_pruner import EstimatorError, MoreauConfig
from moreau_pruner.estimate import FsdpStrategy, Lean, MoreauResult, Reference, Regen, Runner, estimate, gradient

#: the reference strategy: a perturbed copy of every weight swapped into param.data
reference = partial(estimate, strategy="reference")


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def batch(seed=0, n=3, seq=12, vocab=64):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


class Quadratic(nn.Module):
    """L(w) = 0.5 * sum(a * (w - b)^2): gradient a*(w - b), to check the loop by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]]))
        self.v = nn.Parameter(torch.tensor([0.5, -0.5]))
        self.a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def quad_loss(model, _batch):
    return 0.5 * (model.a * (model.w - 0.5) ** 2).sum() + 0.5 * ((model.v + 1.0) ** 2).sum()


@pytest.mark.parametrize("iters,avg_last", [(6, 3), (3, 5)])
def test_loop_matches_hand_iteration(iters, avg_last):
    """Tiny noise, so the gradient is exact: check δ recursion and the last-K average by hand."""
    m = Quadratic()
    cfg = MoreauConfig(std=1e-30, lr=0.1, soft=0.5, iters=iters, avg_last=avg_last)
    res = reference(m, torch.zeros(1, 1), cfg, loss_fn=quad_loss, progress=False)
    w0, v0 = m.w.detach().clone(), m.v.detach().clone()
    dw, dv = torch.zeros_like(w0), torch.zeros_like(v0)
    accw, accv = torch.zeros_like(w0), torch.zeros_like(v0)
    K = min(avg_last, iters)
    for t in range(iters):
        uw = dw - 0.1 * (m.a * (w0 + dw - 0.5))  # u = δ - γ g
        uv = dv - 0.1 * (v0 + dv + 1.0)
        rw = uw.pow(2).mean(1, keepdim=True).sqrt()  # row RMS
        dw = uw * torch.where(rw <= 0.1 * 0.5, torch.zeros_like(rw), 1 - 0.5 / rw)
        dv = uv * torch.where(uv.abs() <= 0.1 * 0.5, torch.zeros_like(uv), 1 - 0.5 / uv.abs())
        if t >= iters - K:
            accw += dw
            accv += dv
    torch.testing.assert_close(res.grads["w"], accw / K)
    torch.testing.assert_close(res.grads["v"], accv / K)
    assert len(res.log) == iters and res.log[0]["l2"] == 0.0


def test_weights_bit_identical_and_flags_restored():
    m = tiny_llama()
    m.model.norm.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    reference(m, batch(), MoreauConfig(iters=3), progress=False)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert not m.model.norm.weight.requires_grad and m.model.embed_tokens.weight.requires_grad


def test_alternating_l2_in_reference_mode():
    """The reflection of SPEC §2 step 5 makes ||δ||² alternate big/small from step 1 on."""
    m = tiny_llama()
    res = reference(m, batch(), MoreauConfig(iters=6), progress=False)
    l2 = [r["l2"] for r in res.log]
    assert l2[0] == 0.0
    # a zigzag on a tiny random model (the SmolLM2 test checks the order-of-magnitude gap)
    for t in range(1, 5):
        assert (l2[t] > l2[t + 1]) == (t % 2 == 1), l2


def test_delta_and_acc_fp32_for_bf16_weights():
    m = tiny_llama().to(torch.bfloat16)
    res = reference(m, batch(), MoreauConfig(iters=2), progress=False)
    assert all(g.dtype == torch.float32 for g in res.grads.values())
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_torch_noise_reproduces_published_stream():
    """noise='torch': one torch.randn per parameter, model.parameters() order, CPU generator."""
    m = tiny_llama()
    seen = []

    def loss(model, ids):
        seen.append([p.detach().clone() for p in model.parameters()])
        return model(input_ids=ids, labels=ids).loss

    clean = [p.detach().clone() for p in m.parameters()]
    reference(m, batch(), MoreauConfig(iters=1, noise="torch", seed=5), loss_fn=loss, progress=False)
    gen = torch.Generator().manual_seed(5)
    for w, got in zip(clean, seen[0]):
        want = w + torch.randn(w.shape, generator=gen) * torch.abs(0.05 * w) + torch.zeros_like(w)
        assert torch.equal(got, want)


def test_philox_noise_depends_on_seed_only():
    a = reference(tiny_llama(), batch(), MoreauConfig(iters=2, seed=1), progress=False)
    b = reference(tiny_llama(), batch(), MoreauConfig(iters=2, seed=1), progress=False)
    c = reference(tiny_llama(), batch(), MoreauConfig(iters=2, seed=2), progress=False)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(a.grads[name], b.grads[name])
    assert not torch.equal(a.grads[name], c.grads[name])


def test_micro_batches_give_the_same_estimate():
    x = batch(n=4)
    a = reference(tiny_llama(), x, MoreauConfig(iters=2), progress=False)
    b = reference(tiny_llama(), x, MoreauConfig(iters=2, micro_batch_size=1), progress=False)
    for n in a.grads:
        torch.testing.assert_close(a.grads[n], b.grads[n], rtol=1e-4, atol=1e-9)


def test_score_selects_accumulators():
    names = ["model.layers.1.mlp.up_proj.weight"]
    res = reference(tiny_llama(), batch(), MoreauConfig(iters=2), score=names, progress=False)
    assert list(res.grads) == names
    with pytest.raises(ValueError, match="unknown parameter"):
        reference(tiny_llama(), batch(), MoreauConfig(iters=1), score=["nope"], progress=False)


def test_paper_mode_structure_groups_zero_whole_units():
    m = tiny_llama()
    cfg = MoreauConfig(iters=2, mode="paper", group="structure", soft=2e-3, lr=1.0, n_samples=2)
    seen = {}
    reference(m, batch(), cfg, progress=False, on_step=lambda t, d: seen.update({t: {k: v.clone() for k, v in d.items()}}))
    d = seen[1]
    gate, up = d["model.layers.0.mlp.gate_proj.weight"], d["model.layers.0.mlp.up_proj.weight"]
    down = d["model.layers.0.mlp.down_proj.weight"]
    zero_rows = (gate.abs().sum(1) == 0)
    # a channel is zeroed in gate, up and down together, or not at all
    assert torch.equal(zero_rows, up.abs().sum(1) == 0) and torch.equal(zero_rows, down.abs().sum(0) == 0)


def test_gradient_baseline_matches_autograd():
    m = tiny_llama()
    x = batch()
    g = gradient(m, x)
    m.zero_grad()
    m(input_ids=x, labels=x).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(g[n], p.grad)


@pytest.mark.parametrize("field,value,msg", [("mode", "fast", "mode"), ("lr", -1.0, "lr"), ("iters", 0, "iters"),
                                             ("group", "structure", "paper"), ("noise", "numpy", "noise")])
def test_bad_config(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        MoreauConfig(**{field: value}).validate()


def test_nan_weights_and_gradients_are_named():
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(EstimatorError, match="layers.1.mlp.up_proj"):
        reference(m, batch(), MoreauConfig(iters=1), progress=False)



def test_nan_gradient_with_finite_loss_is_named():
    m = tiny_llama()

    class Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    def loss(model, ids):
        poisoned = Poison.apply(model.model.layers[0].mlp.down_proj.weight)
        return model(input_ids=ids, labels=ids).loss + 0.0 * poisoned.sum()

    with pytest.raises(EstimatorError, match="down_proj"):
        reference(m, batch(), MoreauConfig(iters=1), loss_fn=loss, progress=False)


@pytest.mark.parametrize("group", ["row", "structure"])
def test_sums_leave_the_device_once_per_step(monkeypatch, group):
    """Σδ² stays on the device until the end of a step: one transfer per step, not one per parameter."""
    from moreau_pruner.estimate import loop

    calls = []
    real = loop.sums_to_cpu

    def spy(sums):
        assert all(isinstance(s, torch.Tensor) and s.numel() == 1 for s in sums)
        calls.append(len(sums))
        return real(sums)

    monkeypatch.setattr(loop, "sums_to_cpu", spy)
    m = tiny_llama()
    cfg = MoreauConfig(iters=3, avg_last=2, group=group, mode="paper" if group == "structure" else "reference")
    seen = []
    res = reference(m, batch(), cfg, progress=False,
                          on_step=lambda t, deltas: seen.append(sum(float((d.double() ** 2).sum()) for d in deltas.values())))
    n = len(list(m.parameters()))
    assert calls == [n, n, n]
    assert seen[-1] > 0
    assert [r["delta_sq"] for r in res.log] == pytest.approx(seen, rel=1e-5)


def test_sums_to_cpu_keeps_order_across_devices():
    from moreau_pruner.estimate.loop import sums_to_cpu

    out = sums_to_cpu([torch.tensor(1.5), torch.tensor([2.5]), torch.tensor(-3.0, dtype=torch.float64)])
    assert out.dtype == torch.float64 and out.tolist() == [1.5, 2.5, -3.0]


# ----------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("make,cfg,ckpt,reason", [
    (lambda: Lean(), dict(mode="paper", group="structure"), False, "group='structure' (lean implements 'row')"),
    (lambda: Lean(), dict(noise="torch"), False, "noise='torch' (lean regenerates Philox noise)"),
    (lambda: Regen(), dict(mode="paper", group="structure"), False, "group='structure' (regen implements 'row')"),
    (lambda: Regen(), dict(noise="torch"), False, "noise='torch' (regen regenerates Philox noise)"),
    (lambda: Reference(), {}, True, "gradient_checkpointing (the reference path runs the model in eval mode"),
    (lambda: FsdpStrategy(Runner()), dict(noise="torch"), False, "noise='torch' (each rank regenerates"),
    (lambda: FsdpStrategy(Runner()), {}, True, "gradient_checkpointing (not offered on FSDP2 ranks)"),
])
def test_each_strategy_refuses_what_it_cannot_run_with_the_reason(make, cfg, ckpt, reason):
    strategy = make()
    assert strategy.refusals(MoreauConfig()) == []  # the default configuration runs everywhere
    why = strategy.refusals(MoreauConfig(**cfg), ckpt)
    assert len(why) == 1 and why[0].startswith(reason), why
    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=f"the {strategy.name} path cannot run this configuration: "
                                         + re.escape(reason)):
        estimate(m, batch(), MoreauConfig(iters=1, **cfg), strategy, progress=False, gradient_checkpointing=ckpt)
    for n, p in m.named_parameters():  # refused before any work
        assert torch.equal(p, before[n]) and p.grad is None


def test_strategy_by_name_or_object():
    m = tiny_llama()
    cfg = MoreauConfig(iters=2, avg_last=1)
    auto = estimate(m, batch(), cfg, progress=False)
    assert auto.path == "lean" and not auto.gradient_checkpointing
    assert estimate(m, batch(), MoreauConfig(iters=1, noise="torch"), progress=False).path == "reference"
    obj = Regen()
    for _ in range(2):  # a strategy object can be reused
        res = estimate(m, batch(), cfg, obj, progress=False)
        assert res.path == "regen"
        for n in auto.grads:
            assert torch.equal(res.grads[n], auto.grads[n]), n
    assert {f.name for f in dataclasses.fields(MoreauResult)} >= {"path", "gradient_checkpointing"}
    assert set(res.summary()) == {"config", "backend", "log"}  # the report's form is unchanged
    with pytest.raises(ValueError, match="strategy must be one of"):
        estimate(m, batch(), cfg, "fast")
    with pytest.raises(TypeError, match="a name or a Strategy object"):
        estimate(m, batch(), cfg, 3)
    with pytest.raises(ValueError, match="check_memory plans the one-process strategies"):
        estimate(m, batch(), cfg, FsdpStrategy(Runner()), check_memory=True)
