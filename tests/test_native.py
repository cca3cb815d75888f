"""The native library (csrc/, moreau_kernels/_C.so): CPU kernels against the reference backend,
Philox bit-identity, error messages, opcheck, and (GPU-marked) the CUDA kernels.

Tolerances: the kernels compute in fp32 from the same inputs as the reference, so fp32 results
agree to ~1e-6 relative. The differences come from summation order (row statistics, saliency
sums: the kernels accumulate in fp64, the reference in fp32) and from log/sin/cos in the Philox
normals (a few ulp). Results in bf16/fp16 may differ by one rounding step of that dtype.
"""
from __future__ import annotations

import math

import pytest
import torch

import moreau_kernels as mk
from moreau_kernels import _native, dispatch, reference

NATIVE_OPS = ("philox_normal", "philox_bits", "perturb_out", "perturb_multi", "prox_update_",
              "prox_update_multi_", "channel_saliency")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((5, 123), (1, 1), (11008, 37), (123,), (4, 5, 6))
F32_EPS = torch.finfo(torch.float32).eps

needs_native = pytest.mark.skipif(bool(_native.load_error()), reason=f"native library: {_native.load_error()}")
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.has_cuda_kernels()), reason="needs a CUDA device and the CUDA kernels")

C = _native.op  # C("prox_update_") is torch.ops.moreau_C.prox_update_


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(device)


# ------------------------------------------------------------------ the library itself
def test_extension_loaded():
    """CI builds the extension; if this fails, `pip install -v --no-build-isolation -e .` says why."""
    assert _native.load_error() == "", _native.load_error()
    info = _native.build_info()
    assert info["cuda"] in ("0", "1")
    assert info["torch"] == torch.__version__


@needs_native
def test_every_op_has_cpu_and_meta_kernels():
    for op in NATIVE_OPS:
        for key in ("CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moreau_C::{op}", key), (op, key)


@needs_native
def test_cuda_build_registers_every_cuda_kernel():
    """Runs without a GPU: a library built with CUDA must register a CUDA kernel for every op."""
    if _native.build_info()["cuda"] != "1":
        pytest.skip("library built without CUDA kernels")
    for op in NATIVE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moreau_C::{op}", "CUDA"), op
    assert _native.has_cuda_kernels()
    assert _native.build_info()["cuda_archs"]


@needs_native
def test_auto_mode_picks_cpu_for_cpu_tensors():
    g = torch.randn(3, 4)
    d = torch.zeros(3, 4)
    with mk.use_backend("auto"):
        assert mk.select("prox_update_", g, d, None, 0.1, 1.0, 1.0, 0, False) == "cpu"
        assert mk.select("channel_saliency", g, None, False) == "cpu"
    assert dispatch.availability()["cpu"] == []


def test_info_runs(capsys):
    from moreau_kernels import info

    assert info.main() == 0
    out = capsys.readouterr().out
    assert "torch" in out and "native lib" in out and "reference" in out


# ------------------------------------------------------------------ Philox
def _reference_words(q0: int, nq: int, seed: int, step: int, index: int) -> torch.Tensor:
    q = torch.arange(q0, q0 + nq, dtype=torch.int64)
    c0 = q & 0xFFFFFFFF
    c1 = q >> 32
    x = reference.philox4x32(c0, c1, torch.full_like(q, step), torch.full_like(q, index),
                             seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    return torch.stack(x, dim=1)


@needs_native
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 61, 4099, 70001])
@pytest.mark.parametrize("key", [(0, 0, 0), (123456789, 7, 3), (2**63 - 1, 2**32 - 1, 2**32 - 1)])
def test_philox_words_bit_identical(numel, key):
    seed, step, index = key
    got = C("philox_bits")(torch.empty(numel), seed, step, index)
    assert torch.equal(got, reference.philox_bits(numel, seed, step, index))


@needs_native
@pytest.mark.parametrize("offset", [2**32 - 21, 2**32 - 3, 2**40 + 5])
def test_philox_words_counter_high_word(offset):
    """Counters that carry into the second counter word (the SIMD lanes compute that carry)."""
    got = C("philox_bits")(torch.empty(4 * 70), 99, 5, 6, offset)
    assert torch.equal(got, _reference_words(offset, 70, 99, 5, 6))


def _assert_normals_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    # a few ulp of each value (log/sin/cos differ per platform), plus a tiny absolute term for
    # values near the zeros of cos/sin where ulps are meaningless
    err = (got.double() - ref.double()).abs()
    bound = 8 * F32_EPS * ref.double().abs() + 1e-6
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"


@needs_native
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 123), (4, 5, 6), (257, 129)])
def test_philox_normal_matches_reference(shape):
    like = torch.empty(shape)
    got = C("philox_normal")(like, 2**40 + 17, 12, 34)
    assert got.shape == like.shape and got.dtype == torch.float32
    _assert_normals_close(got, reference.philox_normal(like, 2**40 + 17, 12, 34))


@needs_native
def test_philox_normal_statistics_and_keys():
    like = torch.empty(200_000)
    z = C("philox_normal")(like, 1, 2, 3)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert not torch.equal(z, C("philox_normal")(like, 1, 2, 4))  # another index
    assert not torch.equal(z, C("philox_normal")(like, 1, 3, 3))  # another step
    assert torch.equal(z, C("philox_normal")(like, 1, 2, 3))  # deterministic


# ------------------------------------------------------------------ perturb
def _perturb_close(got, ref, dtype):
    rtol = {torch.float32: 4 * F32_EPS, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_perturb_out_cpu_vs_reference(shape, dtype):
    w = _randn(shape, 1, dtype)
    delta = _randn(shape, 2, scale=0.01)
    key = (2**33 + 5, 3, 9)
    with mk.use_backend("cpu"):
        got = mk.perturb(w, delta, 0.05, *key)
    with mk.use_backend("reference"):
        ref = mk.perturb(w, delta, 0.05, *key)
    assert got.dtype == dtype
    _perturb_close(got, ref, dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_perturb_out_given_noise_is_exact(shape, dtype):
    """With the same noise the fp32 arithmetic is the reference's, step by step: bit-identical."""
    w = _randn(shape, 3, dtype)
    delta = _randn(shape, 4, scale=0.01)
    noise = _randn(shape, 5)
    out = torch.empty_like(w)
    C("perturb_out")(w, delta, noise, out, 0.07, 1, 2, 3)
    assert torch.equal(out, reference.perturb(w, delta, noise, 0.07, 1, 2, 3))


@needs_native
def test_perturb_multi_matches_single_calls_and_reference():
    shapes = [(5, 123), (1, 1), (123,), (4, 5, 6), (300, 7)]
    ws = [_randn(s, 10 + k, DTYPES[k % 3]) for k, s in enumerate(shapes)]
    deltas = [_randn(s, 20 + k, scale=0.01) for k, s in enumerate(shapes)]
    outs = [torch.empty_like(w) for w in ws]
    indices = [0, 5, 2**32 - 1, 7, 3]
    with mk.use_backend("cpu"):
        mk.perturb_multi(ws, deltas, outs, 0.05, 77, 4, indices)
    for w, d, o, i in zip(ws, deltas, outs, indices):
        single = torch.empty_like(w)
        C("perturb_out")(w, d, None, single, 0.05, 77, 4, i)
        assert torch.equal(o, single)
        _perturb_close(o, reference.perturb(w, d, None, 0.05, 77, 4, i), w.dtype)


# ------------------------------------------------------------------ prox update
LR, SOFT, LAMB = 0.1, 1.0, 2.0
# target group statistic of u, relative to the thresholds lr*soft = 0.1 and soft = 1.0
REGIMES = {"zero": 0.05, "reflect": 0.5, "shrink": 3.0}


def _prox_inputs(shape, dtype, mode, regime, seed):
    """g and delta whose groups all land in `regime` (u = delta - lr*(...) is dominated by -lr*g)."""
    target = REGIMES[regime]
    delta = _randn(shape, seed + 1, scale=1e-4)
    g = _randn(shape, seed)
    rows = g.reshape(shape[0], -1) if len(shape) >= 2 else g.reshape(-1, 1)
    if len(shape) >= 2:
        stat = rows.pow(2).mean(1, keepdim=True).sqrt() if mode == mk.MODE_REFERENCE else rows.norm(dim=1, keepdim=True)
    else:
        stat = rows.abs()
    rows = rows / stat * (target / LR)
    g = rows.reshape(shape).to(dtype)
    return g, delta


def _expected_coeff_sign(mode, regime):
    if regime == "zero":
        return 0
    if mode == mk.MODE_REFERENCE and regime == "reflect":
        return -1
    return 1


@needs_native
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prox_update_cpu_vs_reference(shape, dtype, mode, regime, accumulate):
    g, delta0 = _prox_inputs(shape, dtype, mode, regime, seed=hash((shape, regime)) % 1000)
    acc0 = _randn(shape, 99)
    results = {}
    for backend in ("cpu", "reference"):
        delta, acc = delta0.clone(), acc0.clone()
        with mk.use_backend(backend):
            s = mk.prox_update_(g, delta, acc if accumulate else None, LR, SOFT, LAMB, mode, accumulate)
        results[backend] = (delta, acc, s)
    (d_c, a_c, s_c), (d_r, a_r, s_r) = results["cpu"], results["reference"]
    # the regime is what we meant it to be: sign of coeff = sign(delta_new / u)
    u = delta0 - LR * g.float() if mode == mk.MODE_REFERENCE else delta0 - LR * (g.float() + delta0 / LAMB)
    sign = torch.sign((d_r * u).sum()).item()
    assert sign == _expected_coeff_sign(mode, regime)
    torch.testing.assert_close(d_c, d_r, rtol=1e-5, atol=1e-7)
    # acc ~ N(0, 1) + delta: a last-bit difference of delta may flip the rounding of the sum
    torch.testing.assert_close(a_c, a_r if accumulate else acc0, rtol=1e-5, atol=1e-6)
    assert s_c.shape == () and s_c.dtype == torch.float32
    torch.testing.assert_close(s_c, s_r, rtol=1e-5, atol=1e-7)


@needs_native
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER])
def test_prox_update_multi_cpu(mode, accumulate):
    shapes = [(5, 123), (1, 1), (123,), (4, 5, 6), (2000, 9)]
    regimes = ["zero", "reflect", "shrink", "reflect", "shrink"]
    gs, deltas = zip(*[_prox_inputs(s, DTYPES[k % 3], mode, r, 40 + k) for k, (s, r) in enumerate(zip(shapes, regimes))])
    accs = [_randn(s, 60 + k) for k, s in enumerate(shapes)]
    d_multi, a_multi = [d.clone() for d in deltas], [a.clone() for a in accs]
    with mk.use_backend("cpu"):
        sums = mk.prox_update_multi_(list(gs), d_multi, a_multi if accumulate else [], LR, SOFT, LAMB, mode, accumulate)
    assert sums.shape == (len(shapes),) and sums.dtype == torch.float32
    for k, (g, d0, a0) in enumerate(zip(gs, deltas, accs)):
        d_s, a_s = d0.clone(), a0.clone()
        s_s = C("prox_update_")(g, d_s, a_s if accumulate else None, LR, SOFT, LAMB, mode, accumulate)
        assert torch.equal(d_multi[k], d_s) and torch.equal(a_multi[k], a_s)  # same kernel, same bits
        assert sums[k].item() == s_s.item()
        d_r, a_r = d0.clone(), a0.clone()
        s_r = reference.prox_update_(g, d_r, a_r if accumulate else None, LR, SOFT, LAMB, mode, accumulate)
        torch.testing.assert_close(d_multi[k], d_r, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sums[k], s_r, rtol=1e-5, atol=1e-7)


@needs_native
def test_cpu_results_do_not_depend_on_thread_count():
    g = _randn((3000, 67), 1)
    w = _randn((3000, 67), 2)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            d = _randn((3000, 67), 3, scale=0.01)
            s = C("prox_update_")(g, d, None, 0.01, 0.1, 1.0, 0, False)
            rows, cols = C("channel_saliency")(w, g, False)
            runs.append((d, s, rows, cols))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ channel saliency
def _assert_saliency_close(got, ref, scale):
    err = (got.double() - ref.double()).abs()
    assert bool((err <= 1e-5 * scale.double() + 1e-6).all()), f"max error {err.max().item():.3g}"


@needs_native
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("with_g", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (1, 1), (11008, 37), (37, 4099)])
def test_channel_saliency_cpu_vs_reference(shape, dtype, with_g, vectorize):
    w = _randn(shape, 7, dtype)
    g = _randn(shape, 8, dtype) if with_g else None
    with mk.use_backend("cpu"):
        rows, cols = mk.channel_saliency(w, g, vectorize)
    r_ref, c_ref = reference.channel_saliency(w, g, vectorize)
    assert rows.dtype == cols.dtype == torch.float32
    assert rows.shape == (shape[0],) and cols.shape == (shape[1],)
    p = (w.float() if g is None else w.float() * g.float()).abs()
    _assert_saliency_close(rows, r_ref, p.sum(1))
    _assert_saliency_close(cols, c_ref, p.sum(0))


# ------------------------------------------------------------------ errors
@needs_native
def test_native_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="empty"):
        C("philox_normal")(torch.empty(0, 3), 1, 2, 3)
    with pytest.raises(RuntimeError, match="empty"):
        C("prox_update_")(torch.empty(0), torch.empty(0), None, 0.1, 1.0, 1.0, 0, False)
    with pytest.raises(RuntimeError, match="empty"):
        C("channel_saliency")(torch.empty(0, 4), None, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        C("prox_update_")(torch.ones(3, dtype=torch.float64), torch.zeros(3), None, 0.1, 1.0, 1.0, 0, False)
    with pytest.raises(RuntimeError, match="delta must be float32"):
        C("prox_update_")(torch.ones(3), torch.zeros(3, dtype=torch.float16), None, 0.1, 1.0, 1.0, 0, False)
    with pytest.raises(RuntimeError, match="shape"):
        C("prox_update_")(torch.ones(3), torch.zeros(4), None, 0.1, 1.0, 1.0, 0, False)
    with pytest.raises(RuntimeError, match="mode must be"):
        C("prox_update_")(torch.ones(3), torch.zeros(3), None, 0.1, 1.0, 1.0, 2, False)
    with pytest.raises(RuntimeError, match="accumulate=True needs an acc"):
        C("prox_update_")(torch.ones(3), torch.zeros(3), None, 0.1, 1.0, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="2-D"):
        C("channel_saliency")(torch.ones(2, 3, 4), None, False)
    with pytest.raises(RuntimeError, match="step and index"):
        C("philox_normal")(torch.empty(3), 1, 2**32, 0)
    with pytest.raises(RuntimeError, match="seed"):
        C("philox_normal")(torch.empty(3), -1, 0, 0)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        C("perturb_out")(torch.ones(4), torch.zeros(4), None, torch.empty(4, dtype=torch.float16), 0.1, 1, 2, 3)


@needs_native
def test_public_ops_on_cpu_backend_reject_empty():
    with mk.use_backend("cpu"), pytest.raises(ValueError, match="empty"):
        mk.prox_update_(torch.empty(0, 5), torch.empty(0, 5), None, 0.1, 1.0, 1.0, 0, False)


# ------------------------------------------------------------------ opcheck
def _opcheck_cases(device="cpu"):
    w = _randn((6, 10), 1, device=device)
    wb = _randn((6, 10), 1, torch.bfloat16, device=device)
    d = _randn((6, 10), 2, scale=0.01, device=device)
    g = _randn((6, 10), 3, device=device)
    v = _randn((9,), 4, device=device)
    return {
        "philox_normal": [(w, 1, 2, 3)],
        "philox_bits": [(w, 1, 2, 3), (v, 5, 6, 7, 2**32 - 1)],
        "perturb_out": [(w, d, None, torch.empty_like(w), 0.05, 1, 2, 3),
                        (wb, d, g, torch.empty_like(wb), 0.05, 1, 2, 3)],
        "perturb_multi": [([w, wb], [d, d.clone()], [torch.empty_like(w), torch.empty_like(wb)], 0.05, 1, 2, [0, 1])],
        "prox_update_": [(g, d.clone(), torch.zeros_like(d), 0.1, 1.0, 2.0, 0, True),
                         (v, torch.zeros_like(v), None, 0.1, 1.0, 2.0, 1, False)],
        "prox_update_multi_": [([g, v], [d.clone(), torch.zeros_like(v)], [], 0.1, 1.0, 2.0, 0, False)],
        "channel_saliency": [(w, g, False), (wb, None, True)],
    }


@needs_native
@pytest.mark.parametrize("op", NATIVE_OPS)
def test_opcheck_native_ops(op):
    for args in _opcheck_cases()[op]:
        torch.library.opcheck(C(op), args)


@needs_native
@pytest.mark.parametrize("op", [o for o in NATIVE_OPS if o != "philox_bits"])
def test_opcheck_public_ops_on_cpu_backend(op):
    public = getattr(torch.ops.moreau, op)
    with mk.use_backend("cpu"):
        for args in _opcheck_cases()[op]:
            torch.library.opcheck(public, args)


# ------------------------------------------------------------------ CUDA kernels (GPU only)
@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_philox_bit_identical_and_normals():
    for numel, offset in ((4099, 0), (280, 2**32 - 21)):
        like = torch.empty(numel, device="cuda")
        got = C("philox_bits")(like, 2**40 + 3, 5, 6, offset).cpu()
        assert torch.equal(got, _reference_words(offset, math.ceil(numel / 4), 2**40 + 3, 5, 6))
    like = torch.empty(257, 129, device="cuda")
    _assert_normals_close(C("philox_normal")(like, 11, 12, 13).cpu(), reference.philox_normal(like.cpu(), 11, 12, 13))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_perturb_vs_reference(shape, dtype):
    w = _randn(shape, 1, dtype, device="cuda")
    delta = _randn(shape, 2, scale=0.01, device="cuda")
    with mk.use_backend("cuda"):
        got = mk.perturb(w, delta, 0.05, 5, 6, 7)
    _perturb_close(got.cpu(), reference.perturb(w.cpu(), delta.cpu(), None, 0.05, 5, 6, 7), dtype)
    noise = _randn(shape, 3, device="cuda")
    with mk.use_backend("cuda"):
        got = mk.perturb(w, delta, 0.05, 5, 6, 7, noise=noise)
    assert torch.equal(got.cpu(), reference.perturb(w.cpu(), delta.cpu(), noise.cpu(), 0.05, 5, 6, 7))
    # the multi-tensor launch gives the same bits as the single one
    outs = [torch.empty_like(w), torch.empty_like(w)]
    with mk.use_backend("cuda"):
        mk.perturb_multi([w, w], [delta, delta], outs, 0.05, 5, 6, [7, 8])
        single = mk.perturb(w, delta, 0.05, 5, 6, 7)
    assert torch.equal(outs[0], single)
    assert not torch.equal(outs[0], outs[1]) or w.numel() == 1


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + ((3, 14336),))
def test_cuda_prox_update_vs_reference(shape, dtype, mode, regime, accumulate):
    g, delta0 = _prox_inputs(shape, dtype, mode, regime, seed=7)
    acc0 = _randn(shape, 99)
    d_r, a_r = delta0.clone(), acc0.clone()
    s_r = reference.prox_update_(g, d_r, a_r if accumulate else None, LR, SOFT, LAMB, mode, accumulate)
    d_c, a_c = delta0.cuda(), acc0.cuda()
    with mk.use_backend("cuda"):
        s_c = mk.prox_update_(g.cuda(), d_c, a_c if accumulate else None, LR, SOFT, LAMB, mode, accumulate)
        sums = mk.prox_update_multi_([g.cuda()], [delta0.cuda()], [], LR, SOFT, LAMB, mode, False)
    torch.testing.assert_close(d_c.cpu(), d_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a_c.cpu(), a_r if accumulate else acc0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_c.cpu(), s_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sums.cpu()[0], s_r, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (1, 1), (11008, 37), (37, 4099)])
def test_cuda_channel_saliency_vs_reference(shape, dtype, vectorize):
    w = _randn(shape, 7, dtype)
    g = _randn(shape, 8, dtype)
    with mk.use_backend("cuda"):
        rows, cols = mk.channel_saliency(w.cuda(), g.cuda(), vectorize)
    r_ref, c_ref = reference.channel_saliency(w, g, vectorize)
    p = (w.float() * g.float()).abs()
    _assert_saliency_close(rows.cpu(), r_ref, p.sum(1))
    _assert_saliency_close(cols.cpu(), c_ref, p.sum(0))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("op", NATIVE_OPS)
def test_cuda_opcheck_native_ops(op):
    for args in _opcheck_cases("cuda")[op]:
        torch.library.opcheck(C(op), args)
