"""GPU tests of the CUDA and Triton backends (marked ``gpu``; ``scripts/gpu_check.sh`` runs them).

What a line-by-line review of the kernels could not settle without a GPU:

* multi-tensor launches over tensors of mixed rank, dtype and size, with accumulate on;
* inputs whose storage offset breaks 16-byte alignment (``base[1:]``: the vectorized paths must
  fall back to scalar loads);
* prox and saliency shapes with more than 65,535 rows (the grid-stride loops);
* auto dispatch picks ``cuda`` for CUDA tensors, without a fallback warning;
* an end-to-end estimate on a tiny model where ``cuda``, ``triton`` and ``reference`` give the same
  Ĝ (to rounding) and the same pruning plan.

``MOREAU_GPU_TESTS_ON_CPU=1`` runs this file on a CPU, with ``cpu`` standing in for ``cuda`` and
Triton's interpreter (fp32) for compiled Triton: a check of the tests' own logic, not of the GPU.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import moreau_kernels as mk
from moreau_kernels import reference as ref

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("MOREAU_GPU_TESTS_ON_CPU") == "1"
DEV = "cpu" if ON_CPU else "cuda"
NATIVE = "cpu" if ON_CPU else "cuda"  # the backend under test for DEV tensors
FUSED = (NATIVE, "triton")
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LR, SOFT, LAMB = 0.1, 1.0, 2.0


def _dtypes(backend):
    return (torch.float32,) if (ON_CPU and backend == "triton") else ALL_DTYPES


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on DEV whose storage starts one element past a fresh allocation."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
    view = base[1:].view(t.shape)
    view.copy_(t)
    assert view.storage_offset() == 1 and view.is_contiguous()
    return view


def _out_tol(dtype):
    # perturb's Philox normals differ by an ulp or two between platforms' log/sin/cos; one
    # rounding of the output dtype on top
    return {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
            torch.float16: dict(rtol=2e-3, atol=1e-5)}[dtype]


STATE_TOL = dict(rtol=1e-5, atol=1e-6)  # prox: row sums in another order


# ---------------------------------------------------------------- multi-tensor ops, mixed
MIXED_SHAPES = [(5, 123), (1,), (4, 5, 6), (300,), (37, 4099), (2, 3, 70), (1, 1)] + ([] if ON_CPU else [(11008, 37)])


@pytest.mark.parametrize("backend", FUSED)
def test_multi_tensor_ops_mixed_rank_dtype_size(backend):
    dts = _dtypes(backend)
    dtypes = [dts[k % len(dts)] for k in range(len(MIXED_SHAPES))]
    ws = [_randn(s, 10 + k, dt) for k, (s, dt) in enumerate(zip(MIXED_SHAPES, dtypes))]
    ds = [_randn(s, 30 + k, scale=0.01) for k, s in enumerate(MIXED_SHAPES)]
    idx = list(range(3, 3 + len(ws)))
    want = [ref.perturb(w, d, None, 0.05, 7, 2, i) for w, d, i in zip(ws, ds, idx)]
    outs = [torch.empty(w.shape, dtype=w.dtype, device=DEV) for w in ws]
    with mk.use_backend(backend):
        mk.perturb_multi([w.to(DEV) for w in ws], [d.to(DEV) for d in ds], outs, 0.05, 7, 2, idx)
    for o, wnt, dt in zip(outs, want, dtypes):
        torch.testing.assert_close(o.cpu(), wnt, **_out_tol(dt))

    gs = [_randn(s, 50 + k, dt) for k, (s, dt) in enumerate(zip(MIXED_SHAPES, dtypes))]
    accs = [_randn(s, 70 + k) for k, s in enumerate(MIXED_SHAPES)]
    for mode in (mk.MODE_REFERENCE, mk.MODE_PAPER):
        d_r, a_r = [d.clone() * 30 for d in ds], [a.clone() for a in accs]
        s_r = ref.prox_update_multi_(gs, d_r, a_r, LR, SOFT, LAMB, mode, True)
        d_b, a_b = [d.to(DEV) * 30 for d in ds], [a.to(DEV, copy=True) for a in accs]
        with mk.use_backend(backend):
            s_b = mk.prox_update_multi_([g.to(DEV) for g in gs], d_b, a_b, LR, SOFT, LAMB, mode, True)
        for x, y in zip(d_b + a_b, d_r + a_r):
            torch.testing.assert_close(x.cpu(), y, **STATE_TOL)
        torch.testing.assert_close(s_b.cpu(), s_r, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- misaligned storage
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(33, 130), (1027,)])
def test_storage_offset_breaks_alignment(backend, shape):
    for dt in _dtypes(backend):
        w = _randn(shape, 1, dt)
        d = _randn(shape, 2, scale=0.01)
        noise = _randn(shape, 3)
        with mk.use_backend(backend):
            out = _misaligned(torch.zeros(shape, dtype=dt))
            mk.perturb_out(_misaligned(w), _misaligned(d), None, out, 0.05, 5, 6, 7)
            torch.testing.assert_close(out.cpu(), ref.perturb(w, d, None, 0.05, 5, 6, 7), **_out_tol(dt))
            mk.perturb_out(_misaligned(w), _misaligned(d), _misaligned(noise), out, 0.05, 5, 6, 7)
            assert torch.equal(out.cpu(), ref.perturb(w, d, noise, 0.05, 5, 6, 7))
            outs = [_misaligned(torch.zeros(shape, dtype=dt)), torch.zeros(shape, dtype=dt, device=DEV)]
            mk.perturb_multi([_misaligned(w), w.to(DEV)], [_misaligned(d), d.to(DEV)], outs, 0.05, 5, 6, [7, 7])
            assert torch.equal(outs[0], outs[1])

        g = _randn(shape, 4, dt)
        d0, a0 = _randn(shape, 5, scale=0.3), _randn(shape, 6)
        d_r, a_r = d0.clone(), a0.clone()
        s_r = ref.prox_update_(g, d_r, a_r, LR, SOFT, LAMB, mk.MODE_REFERENCE, True)
        d_b, a_b = _misaligned(d0), _misaligned(a0)
        with mk.use_backend(backend):
            s_b = mk.prox_update_(_misaligned(g), d_b, a_b, LR, SOFT, LAMB, mk.MODE_REFERENCE, True)
            d_m, a_m = _misaligned(d0), _misaligned(a0)
            mk.prox_update_multi_([_misaligned(g)], [d_m], [a_m], LR, SOFT, LAMB, mk.MODE_REFERENCE, True)
        for x in (d_b, d_m):
            torch.testing.assert_close(x.cpu(), d_r, **STATE_TOL)
        for x in (a_b, a_m):
            torch.testing.assert_close(x.cpu(), a_r, **STATE_TOL)
        torch.testing.assert_close(s_b.cpu(), s_r, rtol=1e-5, atol=1e-6)

        if len(shape) == 2:
            with mk.use_backend(backend):
                rows, cols = mk.channel_saliency(_misaligned(w), _misaligned(g), False)
            r_w, c_w = ref.channel_saliency(w, g, False)
            torch.testing.assert_close(rows.cpu(), r_w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cols.cpu(), c_w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- more than 65,535 rows
@pytest.mark.parametrize("backend", FUSED)
def test_more_rows_than_one_grid_dimension(backend):
    if ON_CPU and backend == "triton":
        pytest.skip("70,001 interpreted Triton programs take too long on a CPU")
    shape = (70_001, 8)
    dt = _dtypes(backend)[-1]
    g = _randn(shape, 1, dt)
    d0, a0 = _randn(shape, 2, scale=0.3), _randn(shape, 3)
    for mode in (mk.MODE_REFERENCE, mk.MODE_PAPER):
        d_r, a_r = d0.clone(), a0.clone()
        s_r = ref.prox_update_(g, d_r, a_r, LR, SOFT, LAMB, mode, True)
        d_b, a_b = d0.to(DEV, copy=True), a0.to(DEV, copy=True)
        with mk.use_backend(backend):
            s_b = mk.prox_update_(g.to(DEV), d_b, a_b, LR, SOFT, LAMB, mode, True)
        torch.testing.assert_close(d_b.cpu(), d_r, **STATE_TOL)
        torch.testing.assert_close(a_b.cpu(), a_r, **STATE_TOL)
        torch.testing.assert_close(s_b.cpu(), s_r, rtol=1e-4, atol=1e-4)
        assert d_b[-1].abs().sum() > 0 or d_r[-1].abs().sum() == 0  # the last rows were reached
    w = _randn((70_001, 16), 4, dt)
    gw = _randn((70_001, 16), 5, dt)
    with mk.use_backend(backend):
        rows, cols = mk.channel_saliency(w.to(DEV), gw.to(DEV), False)
    r_w, c_w = ref.channel_saliency(w, gw, False)
    torch.testing.assert_close(rows.cpu(), r_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols.cpu(), c_w, rtol=1e-4, atol=1e-3)  # sums of 70,001 terms


# ---------------------------------------------------------------- auto dispatch
def test_auto_dispatch_picks_the_native_backend_for_device_tensors():
    mk.clear_cache()
    w = torch.randn(8, 16, device=DEV, dtype=torch.bfloat16)
    d = torch.zeros(8, 16, device=DEV)
    calls = {
        "philox_normal": (w, 1, 2, 3),
        "perturb_out": (w, d, None, torch.empty_like(w), 0.1, 1, 2, 3),
        "perturb_multi": ([w], [d], [torch.empty_like(w)], 0.1, 1, 2, [3]),
        "prox_update_": (w, d, d.clone(), 0.1, 1.0, 2.0, 0, True),
        "prox_update_multi_": ([w], [d], [d.clone()], 0.1, 1.0, 2.0, 0, True),
        "channel_saliency": (w, w, False),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail the test
        with mk.use_backend("auto"):
            for op, args in calls.items():
                assert mk.select(op, *args) == NATIVE, (op, mk.explain(op, *args))
                getattr(mk, op)(*args)


# ---------------------------------------------------------------- end to end
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(DEV)


@pytest.mark.parametrize("path", ["reference", "lean"])
def test_tiny_model_estimate_agrees_across_backends(path):
    from moreau_pruner import MoreauConfig, PruneConfig, compute_scores, discover, resolve_target
    from moreau_pruner.prune.plan import plan_local

    batch = torch.randint(0, 64, (4, 16), generator=_gen(0)).to(DEV)
    cfg = MoreauConfig(iters=4, avg_last=2, seed=3)
    prune = PruneConfig(ratio=0.5)
    results = {}
    for backend in (NATIVE, "triton", "reference"):
        model = _tiny_llama()
        structure = discover(model)
        with mk.use_backend(backend):
            scores, est, _ = compute_scores(model, batch, "moreau", prune, cfg, progress=False,
                                            structure=structure, estimator_path=path)
        assert est.backend == backend
        plans = plan_local(resolve_target(structure, prune), scores)
        results[backend] = ({k: v.cpu() for k, v in est.grads.items()},
                            [(p.kv_keep, p.q_keep, p.mlp_keep) for p in plans])
    grads_ref, plan_ref = results["reference"]
    for backend in (NATIVE, "triton"):
        grads, plan = results[backend]
        assert grads.keys() == grads_ref.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-6, msg=f"{backend} {name}")
        assert plan == plan_ref, backend
