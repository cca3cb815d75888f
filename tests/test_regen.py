"""The regen path: the lean estimate without perturbed copies of the linear weights.

Same δ trajectory, Ĝ and log as the lean path (bit-identical on the same backend), less live memory,
model left exactly as it was.
"""
from functools import partial

import pytest
import torch
from test_lean import SMALL, assert_clean, batch, snapshot, tiny
from transformers import Qwen2Config, Qwen2ForCausalLM

import moreau_kernels as mk
from moreau_pruner import MoreauConfig
from moreau_pruner.estimate import estimate
from moreau_pruner.estimate.memory import plan_memory
from moreau_pruner.estimate.memtrack import LiveTensorTracker
from moreau_pruner.estimate.strategies.regen import regen_modules

lean_estimate = partial(estimate, strategy="lean")
regen_estimate = partial(estimate, strategy="regen")


def qwen2(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=False))  # q/k/v biases


def run(fn, m, b, cfg, **kw):
    traj = []
    res = fn(m, b, cfg, progress=False, on_step=lambda t, d: traj.append({k: v.clone() for k, v in d.items()}), **kw)
    return res, traj


@pytest.mark.parametrize("kind,mode,mbs,ns,backend", [
    ("llama", "reference", None, 1, "reference"),
    ("qwen2", "reference", None, 1, "reference"),
    ("qwen2", "paper", 2, 2, "reference"),
    ("llama", "paper", 3, 1, None),  # the auto backend (native CPU ops when built)
    ("qwen2", "reference", None, 2, None),
])
def test_regen_matches_lean_bit_for_bit(kind, mode, mbs, ns, backend):
    m = qwen2() if kind == "qwen2" else tiny("llama", tied=True)
    m.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    before = snapshot(m)
    cfg = MoreauConfig(mode=mode, iters=3, avg_last=2, micro_batch_size=mbs, n_samples=ns)
    score = [n for n, _ in m.named_parameters() if "layers.1." in n or "embed" in n]
    b = batch()
    with mk.use_backend(backend) if backend else _Null():
        lean, lt = run(lean_estimate, m, b, cfg, score=score)
        regen, rt = run(regen_estimate, m, b, cfg, score=score)
    assert regen.path == "regen" and regen.backend == lean.backend
    assert sorted(regen.grads) == sorted(lean.grads) == sorted(score)
    for k in lean.grads:
        assert torch.equal(regen.grads[k], lean.grads[k]), k
    for a, c in zip(lt, rt):
        for k in a:
            assert torch.equal(a[k], c[k]), k
    assert [r["loss"] for r in regen.log] == [r["loss"] for r in lean.log]
    assert [r["delta_sq"] for r in regen.log] == [r["delta_sq"] for r in lean.log]
    assert_clean(m, before, flags)
    for mod in m.modules():
        assert "forward" not in mod.__dict__


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_which_linears_regenerate():
    tied = tiny("llama", tied=True)
    lin = regen_modules(tied)
    names = {n for n, p in tied.named_parameters() if id(p) in lin}
    # every projection of every layer; not the tied lm_head / embeddings, not the norms
    assert len(names) == 2 * 7 and all(n.endswith("_proj.weight") for n in names)
    untied = tiny("mistral", tied=False)
    names = {n for n, p in untied.named_parameters() if id(p) in regen_modules(untied)}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names and len(names) == 2 * 7 + 2


def test_gradient_checkpointing_same_result():
    m = qwen2()
    cfg = MoreauConfig(iters=2, avg_last=1)
    with mk.use_backend("reference"):
        plain = regen_estimate(m, batch(), cfg, progress=False)
        ckpt = estimate(m, batch(), cfg, strategy="regen", progress=False, gradient_checkpointing=True)
    assert ckpt.path == "regen" and ckpt.gradient_checkpointing
    for k in plain.grads:
        torch.testing.assert_close(ckpt.grads[k], plain.grads[k], rtol=1e-5, atol=1e-8)


def test_errors_leave_the_model_clean():
    m = qwen2()
    before = snapshot(m)

    def nan_loss(model, ids):
        return model(input_ids=ids, labels=ids).loss * float("nan")

    with pytest.raises(Exception, match="non-finite"):
        regen_estimate(m, batch(), MoreauConfig(iters=2), progress=False, loss_fn=nan_loss)
    assert_clean(m, before)
    for mod in m.modules():
        assert "forward" not in mod.__dict__
    with pytest.raises(ValueError, match="regen path"):
        estimate(m, batch(), MoreauConfig(iters=1, noise="torch"), strategy="regen")


def test_regen_holds_less_than_lean_and_the_plan_says_so():
    """Tracked live bytes: regen drops the perturbed copies of the linear weights."""
    cfg = MoreauConfig(iters=2, avg_last=1)
    peaks = {}
    for path in ("lean", "regen"):
        m = qwen2()
        with LiveTensorTracker(baseline=m) as tr:
            estimate(m, batch(), cfg, strategy=path, progress=False)
        peaks[path] = tr.peak_bytes
    m = qwen2()
    linear_bytes = sum(mod.weight.numel() * 4 for mod in regen_modules(m).values())
    largest = max(mod.weight.numel() * 4 for mod in regen_modules(m).values())
    saved = peaks["lean"] - peaks["regen"]
    # the lean work buffers of the linear weights go; a transient w̃ and gradient of one linear remain
    assert linear_bytes - 2 * largest <= saved <= linear_bytes
    lean_plan = plan_memory(m, tuple(batch().shape), cfg, "lean", "cpu", fused=True)
    regen_plan = plan_memory(m, tuple(batch().shape), cfg, "regen", "cpu", fused=True)
    assert regen_plan.total < lean_plan.total
    assert regen_plan.items["work buffers (parameters not regenerated)"] == \
        lean_plan.items["work buffers"] - linear_bytes
