"""The lean estimator path (same δ and Ĝ as the reference path, less memory) and memory planning."""
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import moreau_kernels as mk
from moreau_pruner import EstimatorError, MoreauConfig
from moreau_pruner.estimate import estimate
from moreau_pruner.estimate.memory import GiB, MemoryPlanError, activation_bytes, check_fits, plan_memory
from moreau_pruner.estimate.plans import layer_score, main
from moreau_pruner.model.meta import meta_model

reference = partial(estimate, strategy="reference")
lean = partial(estimate, strategy="lean")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def tiny(kind="llama", tied=True, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))
    return MistralForCausalLM(MistralConfig(**SMALL, tie_word_embeddings=tied, sliding_window=None))


def batch(n=4, seq=12, seed=0):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def assert_clean(m, before, flags=None):
    """Weights bit-identical, no .grad, no hooks left, requires_grad restored."""
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
        assert not getattr(p, "_post_accumulate_grad_hooks", None), n
        if flags is not None:
            assert p.requires_grad == flags[n], n


def run_both(m, b, cfg, **kw):
    traj = {"reference": [], "lean": []}
    res = {}
    with mk.use_backend("reference"):
        for path, fn in (("reference", reference), ("lean", lean)):
            rec = traj[path]
            res[path] = fn(m, b, cfg, progress=False,
                           on_step=lambda t, d, rec=rec: rec.append({k: v.clone() for k, v in d.items()}), **kw)
    return res, traj


@pytest.mark.parametrize("kind,tied,mode,mbs,ns", [
    ("llama", True, "reference", None, 1),
    ("llama", True, "paper", 2, 2),
    ("mistral", False, "reference", 3, 1),
    ("mistral", False, "paper", None, 2),
])
def test_lean_matches_reference_path(kind, tied, mode, mbs, ns):
    m = tiny(kind, tied)
    m.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    m.train()
    before = snapshot(m)
    cfg = MoreauConfig(mode=mode, iters=3, avg_last=2, micro_batch_size=mbs, n_samples=ns, seed=3)
    score = [n for n, _ in m.named_parameters() if "layers.1." in n or "embed" in n]
    res, traj = run_both(m, batch(), cfg, score=score)
    ref, lean = res["reference"], res["lean"]
    assert lean.path == "lean" and lean.backend == ref.backend == "reference"
    assert sorted(lean.grads) == sorted(ref.grads) == sorted(score)
    for k in ref.grads:  # bit-identical (same ops, same gradient accumulation order)
        assert torch.equal(lean.grads[k], ref.grads[k]), k
    assert len(traj["lean"]) == len(traj["reference"]) == cfg.iters
    for a, b in zip(traj["reference"], traj["lean"]):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for a, b in zip(ref.log, lean.log):
        assert (a["step"], a["loss"], a["l2"], a["delta_sq"]) == (b["step"], b["loss"], b["l2"], b["delta_sq"])
    assert_clean(m, before, flags)
    assert m.training


def test_tied_parameter_updated_once_per_step(monkeypatch):
    """SmolLM2-like tying: lm_head.weight is embed_tokens.weight; it is listed once and its hook
    runs once per step, after both uses have accumulated into .grad."""
    m = tiny("llama", tied=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    calls = []
    real = mk.prox_update_

    def counting(g, delta, *a):
        calls.append((delta.data_ptr(), g.clone()))
        return real(g, delta, *a)

    monkeypatch.setattr(mk, "prox_update_", counting)
    named = list(m.named_parameters())
    iters = 2
    lean(m, batch(), MoreauConfig(iters=iters), progress=False)
    assert len(calls) == iters * len(named)
    ptrs = [c[0] for c in calls]
    assert all(ptrs.count(p) == iters for p in set(ptrs))


def test_gradient_freed_during_backward():
    """With one backward per step, a gradient is gone before the backward ends (no full buffer)."""
    m = tiny("llama", tied=False)
    seen = []
    first = m.model.layers[1].mlp.down_proj.weight  # its grad comes early in the backward

    def probe(_p):  # embed_tokens' hook runs last; by then earlier grads must be freed
        seen.append(first.grad is None)

    h = m.model.embed_tokens.weight.register_post_accumulate_grad_hook(probe)
    try:
        lean(m, batch(), MoreauConfig(iters=1), progress=False)
    finally:
        h.remove()
    assert seen == [True]


def test_errors_leave_model_clean():
    m = tiny("llama", tied=True)
    before = snapshot(m)
    b = batch()

    def nan_loss(model, ids, state={"n": 0}):
        state["n"] += 1
        loss = model(input_ids=ids, labels=ids).loss
        return loss * float("nan") if state["n"] == 3 else loss

    with pytest.raises(EstimatorError, match="non-finite"):
        lean(m, b, MoreauConfig(iters=4), progress=False, loss_fn=nan_loss)
    assert_clean(m, before)

    def nan_grad(model, ids, state={"n": 0}):  # finite loss, NaN gradient in one norm weight
        state["n"] += 1
        loss = model(input_ids=ids, labels=ids).loss
        if state["n"] == 2:
            w = model.model.norm.weight
            bad = torch.where(w > 1e9, torch.sqrt(-w), torch.zeros_like(w)).sum()  # 0 forward, NaN backward
            loss = loss + bad
        return loss

    with pytest.raises(EstimatorError, match="model.norm.weight"):
        lean(m, b, MoreauConfig(iters=4), progress=False, loss_fn=nan_grad)
    assert_clean(m, before)


def test_gradient_checkpointing_same_result_and_restored():
    m = tiny("llama", tied=True).eval()
    before = snapshot(m)
    cfg = MoreauConfig(iters=3, avg_last=2)
    with mk.use_backend("reference"):
        plain = lean(m, batch(), cfg, progress=False)
        ckpt = lean(m, batch(), cfg, progress=False, gradient_checkpointing=True)
    assert ckpt.gradient_checkpointing
    for k in plain.grads:
        torch.testing.assert_close(ckpt.grads[k], plain.grads[k], rtol=1e-6, atol=0)
    assert not any(getattr(mod, "gradient_checkpointing", False) for mod in m.modules())
    assert not hasattr(m, "_require_grads_hook")
    assert not m.training
    assert_clean(m, before)


def test_estimate_picks_the_path():
    m = tiny("llama", tied=True)
    b = batch()
    assert estimate(m, b, MoreauConfig(iters=1), progress=False).path == "lean"
    assert estimate(m, b, MoreauConfig(iters=1, noise="torch"), progress=False).path == "reference"
    assert estimate(m, b, MoreauConfig(iters=1, mode="paper", group="structure"), progress=False).path == "reference"
    assert estimate(m, b, MoreauConfig(iters=1), strategy="reference", progress=False).path == "reference"
    with pytest.raises(ValueError, match="noise='torch'"):
        estimate(m, b, MoreauConfig(iters=1, noise="torch"), strategy="lean")
    with pytest.raises(ValueError, match="Philox"):
        lean(m, b, MoreauConfig(iters=1, noise="torch"))


def test_plan_matches_measured_tensor_bytes():
    m = tiny("mistral", tied=False)
    score = [n for n, _ in m.named_parameters() if "layers.0." in n]
    cfg = MoreauConfig(iters=1)
    plan = plan_memory(m, (4, 12), cfg, "lean", "cpu", score=score, fused=True)
    deltas = {}
    res = lean(m, batch(), cfg, score=score, progress=False,
                               on_step=lambda t, d: deltas.update(d))
    params = dict(m.named_parameters())
    assert plan.items["delta (fp32)"] == sum(d.numel() * d.element_size() for d in deltas.values())
    assert plan.items["acc (fp32, scored)"] == sum(g.numel() * g.element_size() for g in res.grads.values())
    assert plan.items["weights"] == plan.items["work buffers"] == sum(p.numel() * p.element_size()
                                                                     for p in params.values())
    assert "gradients (all)" not in plan.items
    ref = plan_memory(m, (4, 12), cfg, "reference", "cpu", score=score, fused=True)
    assert ref.items["gradients (all)"] == plan.items["weights"]
    assert ref.total > plan.total
    # micro-batches bring the full gradient buffer back on the lean path
    mb = plan_memory(m, (4, 12), MoreauConfig(micro_batch_size=2), "lean", "cpu", score=score, fused=True)
    assert "gradients (all)" in mb.items


def test_activation_estimate_bounds_saved_tensors():
    """The activation estimate covers what autograd saves (and is not wildly above it)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 32))
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(input_ids=ids, labels=ids).loss
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    measured = sum(v for k, v in seen.items() if k not in weights)
    est, _ = activation_bytes(m, 2, 32, torch.float32)
    assert measured <= est <= 2.5 * measured, (measured, est)
    ck, _ = activation_bytes(m, 2, 32, torch.float32, gradient_checkpointing=True)
    assert ck < est


def test_llama_7b_plan(capsys):
    """LLaMA-7B shapes on the meta device, 10x64 tokens, bf16 weights, pruned layers 4-29 scored:
    lean ≈ 76.8 GiB with the CUDA reserve (fits an 80 GB GPU, 79.2 GiB), reference ≈ 88.7 GiB
    (does not), published ≈ 5 fp32 copies (≈ 135 GB)."""
    model = meta_model("llama-7b", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    score = layer_score(4, 30)
    cfg = MoreauConfig()
    lean = plan_memory(model, (10, 64), cfg, "lean", "cuda", score=score)
    ref = plan_memory(model, (10, 64), cfg, "reference", "cuda", score=score)
    pub = plan_memory(model, (10, 64), cfg, "published", "cuda", score=score)
    budget = int(79.2 * GiB)
    assert lean.total < budget < ref.lower_total <= ref.total
    assert lean.overlap == 0 and ref.overlap == min(ref.items["gradients (all)"], ref.items["activations"])
    assert abs(pub.items["weights (fp32)"] * 5 - 4 * 5 * 6_738_415_616) == 0
    assert pub.total > 134e9
    ckpt = plan_memory(model, (10, 64), cfg, "lean", "cuda", score=score, gradient_checkpointing=True)
    assert ckpt.items["activations"] < lean.items["activations"]
    assert check_fits(lean, "cuda", available=budget) > 0
    assert main(["--plan", "llama-7b", "--tokens", "640"]) == 0
    out = capsys.readouterr().out
    assert "lean path" in out and "=> fits" in out and "does NOT fit" in out


def test_check_fits_message():
    m = tiny("llama", tied=False)
    plan = plan_memory(m, (4, 12), MoreauConfig(), "reference", "cpu")
    with pytest.raises(MemoryPlanError) as err:
        check_fits(plan, "cpu", available=1000)
    msg = str(err.value)
    for part in ("needs about", "GiB is free", "lean path", "micro_batch_size", "scoring fewer layers", "bf16"):
        assert part in msg, part
    assert isinstance(err.value, MemoryError)
    assert check_fits(plan, "cpu", available=plan.total + 10) == 10
