"""The Triton backend against the pure-PyTorch reference.

On a machine without a GPU the kernels run on CPU through the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported), fp32 only; with CUDA the
same tests run the compiled kernels, in bf16 and fp16 too.
"""
import os

import pytest
import torch
from torch.library import opcheck

triton = pytest.importorskip("triton")

import moreau_kernels as mk  # noqa: E402
from moreau_kernels import reference as ref  # noqa: E402
from moreau_kernels import triton_ops  # noqa: E402
from moreau_kernels.triton_ops import _utils  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not CUDA and not INTERPRET:
    pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if CUDA else [])
SHAPES = [(5, 123), (1, 1), (37, 11), (123,), (4, 5, 6)]
SHAPES_2D = [(5, 123), (1, 1), (37, 11)]
# normals: fp32 log/sin/cos of two platforms differ by a few ulp
NOISE_TOL = dict(rtol=2e-6, atol=2e-6)
F32_TOL = dict(rtol=2e-6, atol=1e-6)
# bf16/fp16 outputs: the fp32 results may round to neighbouring values (one ulp of the dtype)
LOWP_TOL = dict(rtol=2**-7, atol=1e-4)


@pytest.fixture(autouse=True)
def _triton_backend():
    with mk.use_backend("triton"):
        yield


def _ids(x):
    return "x".join(map(str, x)) if isinstance(x, tuple) else str(x).replace("torch.", "")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(device=DEV, dtype=dtype)


def test_interpreter_smoke():
    """The interpreter (or the GPU) runs a trivial kernel on this triton version."""
    x = torch.arange(10, dtype=torch.float32, device=DEV)
    z = triton_ops.philox_normal(x, 1, 1, 1)
    assert z.shape == x.shape and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert mk.select("philox_normal", x, 1, 1, 1) == "triton"


# ---------------------------------------------------------------- philox
KEYS = [(0, 0, 0), (1, 1, 1), (2**40 + 12345, 2**31 + 3, 7), (2**63 - 1, 2**32 - 1, 2**32 - 1)]


@pytest.mark.parametrize("numel", [1, 7, 123, 1000])
@pytest.mark.parametrize("key", KEYS, ids=_ids)
def test_philox_bits_identical(numel, key):
    got = triton_ops.philox_bits(numel, *key, device=DEV).cpu()
    assert torch.equal(got, ref.philox_bits(numel, *key))


@pytest.mark.parametrize("first_q", [2**32 - 1, 2**40 + 5])
def test_philox_bits_high_counter_word(first_q):
    """Counters >= 2**32 use the high word c1 = q >> 32 (int64 offsets in the kernel)."""
    seed, step, index = 2**33 + 99, 5, 6
    got = triton_ops.philox_bits(12, seed, step, index, device=DEV, first_q=first_q).cpu()
    q = torch.arange(first_q, first_q + 3, dtype=torch.int64)
    want = torch.stack(ref.philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, step), torch.full_like(q, index),
                                      seed & 0xFFFFFFFF, seed >> 32), dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES + [(3, 1000)], ids=_ids)
def test_philox_normal(shape):
    like = torch.empty(shape, device=DEV)
    got = mk.philox_normal(like, 2**35 + 17, 3, 11)
    want = ref.philox_normal(like, 2**35 + 17, 3, 11)
    assert got.dtype == torch.float32 and got.shape == like.shape
    torch.testing.assert_close(got, want, **NOISE_TOL)


# ---------------------------------------------------------------- perturb
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("with_noise", [False, True], ids=["philox", "noise"])
def test_perturb_out(shape, dtype, with_noise):
    w = _randn(shape, dtype, seed=1)
    delta = _randn(shape, seed=2, scale=0.1)
    noise = _randn(shape, seed=3) if with_noise else None
    got = mk.perturb(w, delta, 0.05, 2**40 + 3, 5, 9, noise=noise)
    want = ref.perturb(w, delta, noise, 0.05, 2**40 + 3, 5, 9)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **(NOISE_TOL if dtype == torch.float32 else LOWP_TOL))


@pytest.mark.parametrize("max_fused", [None, 2], ids=["one_launch", "split"])
def test_perturb_multi(monkeypatch, max_fused):
    if max_fused:
        monkeypatch.setattr(_utils, "MAX_FUSED_TENSORS", max_fused)
    dtypes = [DTYPES[k % len(DTYPES)] for k in range(len(SHAPES))]  # mixed dtypes on GPU
    ws = [_randn(s, dt, seed=k) for k, (s, dt) in enumerate(zip(SHAPES, dtypes))]
    ds = [_randn(s, seed=10 + k, scale=0.1) for k, s in enumerate(SHAPES)]
    outs = [torch.empty_like(w) for w in ws]
    idx = [3, 0, 2**32 - 1, 7, 11]
    mk.perturb_multi(ws, ds, outs, 0.1, 77, 2**31 + 1, idx)
    for w, d, o, i in zip(ws, ds, outs, idx):
        tol = NOISE_TOL if w.dtype == torch.float32 else LOWP_TOL
        torch.testing.assert_close(o, ref.perturb(w, d, None, 0.1, 77, 2**31 + 1, i), **tol)


# ---------------------------------------------------------------- prox update
LR, SOFT, LAMB = 0.1, 1.0, 2.0
# row statistic targets: <= lr*soft (zero), between lr*soft and soft (reflect in reference mode,
# shrink in paper mode), > soft (shrink)
TARGETS = (0.05, 0.5, 3.0)


def _regime_inputs(shape, dtype, mode, seed=0):
    """(g, delta) whose unshrunk rows u have statistics cycling through TARGETS (u is linear in
    (delta, g), so scaling both by a per-row factor scales the row statistic)."""
    g = torch.randn(shape, generator=_gen(seed)).double()
    d = torch.randn(shape, generator=_gen(seed + 1)).double()
    u = d - LR * g if mode == mk.MODE_REFERENCE else d - LR * (g + d / LAMB)
    rows = ref.row_view(u)
    stat = (rows * rows).mean(1) if mode == mk.MODE_REFERENCE else (rows * rows).sum(1)
    target = torch.tensor([TARGETS[i % 3] for i in range(rows.shape[0])], dtype=torch.float64)
    scale = (target / stat.sqrt()).reshape((-1,) + (1,) * (len(shape) - 1))
    return (g * scale).to(device=DEV, dtype=dtype), (d * scale).float().to(DEV)


def _ref_prox(g, d, acc, mode, accumulate):
    d2 = d.clone()
    a2 = acc.clone() if acc is not None else None
    s = ref.prox_update_(g, d2, a2, LR, SOFT, LAMB, mode, accumulate)
    return d2, a2, s


@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "acc"])
@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER], ids=["reference", "paper"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_prox_update(shape, dtype, mode, accumulate):
    g, d = _regime_inputs(shape, dtype, mode)
    acc = _randn(shape, seed=5) if accumulate else None
    d_want, a_want, s_want = _ref_prox(g, d, acc, mode, accumulate)
    s = mk.prox_update_(g, d, acc, LR, SOFT, LAMB, mode, accumulate)
    assert s.shape == () and s.dtype == torch.float32
    torch.testing.assert_close(d, d_want, **F32_TOL)
    torch.testing.assert_close(s, s_want, rtol=1e-5, atol=1e-6)
    if accumulate:
        torch.testing.assert_close(acc, a_want, **F32_TOL)


def test_prox_update_regimes_are_hit():
    """The inputs above really reach the three regimes (a test of the test, and of the sign)."""
    g, d = _regime_inputs((6, 10), torch.float32, mk.MODE_REFERENCE)
    u = (d - LR * g.float()).cpu()
    mk.prox_update_(g, d, None, LR, SOFT, LAMB, mk.MODE_REFERENCE, False)
    d = d.cpu()
    assert (d[0::3] == 0).all()  # zero
    assert ((d[1::3] * u[1::3]) < 0).all()  # reflected: coefficient 1 - 1/0.5 = -1
    torch.testing.assert_close(d[1::3], -u[1::3], **F32_TOL)
    torch.testing.assert_close(d[2::3], u[2::3] * (1 - SOFT / 3.0), **F32_TOL)


@pytest.mark.parametrize("max_fused", [None, 2], ids=["one_launch", "split"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "acc"])
@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER], ids=["reference", "paper"])
def test_prox_update_multi(monkeypatch, mode, accumulate, max_fused):
    if max_fused:
        monkeypatch.setattr(_utils, "MAX_FUSED_TENSORS", max_fused)
    shapes = SHAPES + [(7,)]
    gs, ds, accs, want = [], [], [], []
    for k, s in enumerate(shapes):
        g, d = _regime_inputs(s, DTYPES[k % len(DTYPES)], mode, seed=k)
        a = _randn(s, seed=20 + k)
        want.append(_ref_prox(g, d, a if accumulate else None, mode, accumulate))
        gs.append(g), ds.append(d), accs.append(a)
    sums = mk.prox_update_multi_(gs, ds, accs if accumulate else [], LR, SOFT, LAMB, mode, accumulate)
    assert sums.shape == (len(shapes),) and sums.dtype == torch.float32
    for k, (d_want, a_want, s_want) in enumerate(want):
        torch.testing.assert_close(ds[k], d_want, **F32_TOL)
        torch.testing.assert_close(sums[k], s_want, rtol=1e-5, atol=1e-6)
        if accumulate:
            torch.testing.assert_close(accs[k], a_want, **F32_TOL)


# ---------------------------------------------------------------- channel saliency
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("vectorize", [False, True], ids=["abs", "vectorize"])
@pytest.mark.parametrize("with_g", [False, True], ids=["magnitude", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES_2D + [(70, 300)], ids=_ids)
def test_channel_saliency(shape, dtype, with_g, vectorize, splits):
    w = _randn(shape, dtype, seed=1)
    g = _randn(shape, dtype, seed=2) if with_g else None
    if splits is None:
        rows, cols = mk.channel_saliency(w, g, vectorize)
    else:
        rows, cols = triton_ops.channel_saliency(w, g, vectorize, splits=splits)
    r_want, c_want = ref.channel_saliency(w, g, vectorize)
    assert rows.dtype == cols.dtype == torch.float32
    torch.testing.assert_close(rows, r_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols, c_want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- public ops
def test_opcheck_public_ops():
    """Schema, fake-tensor and autograd registration checks, with the triton backend running."""
    w, d = _randn((4, 9), seed=1), _randn((4, 9), seed=2, scale=0.1)
    g, acc = _randn((4, 9), seed=3), _randn((4, 9), seed=4)
    v, dv = _randn((6,), seed=5), _randn((6,), seed=6)
    assert mk.select("prox_update_", g, d, acc) == "triton"
    opcheck(torch.ops.moreau.philox_normal, (w, 5, 1, 2))
    opcheck(torch.ops.moreau.perturb_out, (w, d, None, torch.empty_like(w), 0.1, 5, 1, 2))
    opcheck(torch.ops.moreau.perturb_multi, ([w, v], [d, dv], [torch.empty_like(w), torch.empty_like(v)], 0.1, 5, 1,
                                             [0, 1]))
    opcheck(torch.ops.moreau.prox_update_, (g, d.clone(), acc.clone(), LR, SOFT, LAMB, mk.MODE_REFERENCE, True))
    opcheck(torch.ops.moreau.prox_update_multi_, ([g, v], [d.clone(), dv.clone()], [], LR, SOFT, LAMB,
                                                  mk.MODE_PAPER, False))
    opcheck(torch.ops.moreau.channel_saliency, (w, g, False))


@pytest.mark.skipif(CUDA, reason="with a GPU the tests above run the compiled kernels themselves")
def test_kernels_compile_for_cuda():
    """Without a GPU, still compile the kernels (code generation + ptxas, sm_90): the interpreter
    shares Triton's typing but not its lowering nor its specialization of ints equal to 1. The
    default set has both prox modes and fp32; the PTX must hold no fused multiply-add (the check
    first proves on a fused build that it would see one). Any failure to compile is a failure."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "moreau_kernels.triton_ops._compile_check"], env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled" in res.stdout


def test_compile_check_covers_reference_mode_and_fp32():
    from moreau_kernels.triton_ops import _compile_check as cc

    prox = [a for fn, a, _ in cc._variants(False) if fn.__name__ == "_prox_rows_kernel"]
    assert {a["MODE"] for a in prox} == {0, 1}
    assert {a["g_ptr"] for a in prox} >= {"*fp32", "*bf16"}
    perturb = [a for fn, a, _ in cc._variants(False) if fn.__name__ == "_perturb_kernel"]
    assert {(a["HAS_NOISE"], a["PRECISE"]) for a in perturb} == {(False, False), (False, True), (True, False),
                                                                  (True, True)}
    assert cc.ptx_problems("_prox_rows_kernel", prox[0], "fma.rn.f32 %f1, %f2, %f3, %f4;")
    assert not cc.ptx_problems("_perturb_kernel", {"PRECISE": True, "HAS_NOISE": False}, "fma.rn.f32 ...")
