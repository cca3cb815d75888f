"""Every backend rounds like the reference: elementwise results are bit-identical.

The fused kernels round every fp32 product, sum and quotient once, with no fused multiply-add
(C++: -ffp-contract=off; CUDA: __fmul_rn/__fadd_rn; Triton: enable_fp_fusion=False), and the
prox shrink factor s/r is one correctly rounded division everywhere (csrc/prox_math.h, the
Triton kernels, reference.prox_update_). Only reductions (row sums) may be ordered differently
per backend, so:

* perturb with a given noise tensor and the prox update of 1-D tensors (elementwise groups) are
  compared bit for bit on random inputs;
* the row-grouped prox update is compared bit for bit on dyadic inputs with 64 columns, whose
  row sums are exact in any order, so that only the division s/r can tell the backends apart
  (the test checks that r.reciprocal() * s would have differed).

On a CPU-only machine this runs the cpu backend and Triton's interpreter; with a GPU, cuda and
the compiled Triton kernels (the same tests, marked by device).
"""
from __future__ import annotations

import os

import pytest
import torch

import moreau_kernels as mk
from moreau_kernels import _native, dispatch
from moreau_kernels import reference as ref

CUDA = torch.cuda.is_available()
LR, SOFT, LAMB = 0.25, 0.3, 2.0


def _backends():
    """(backend, device, dtypes) that can run on this machine."""
    out = []
    if CUDA:
        if not dispatch._REGISTRY["cuda"].availability():
            out.append(("cuda", "cuda", (torch.float32, torch.bfloat16, torch.float16)))
        if not dispatch._REGISTRY["triton"].availability():
            out.append(("triton", "cuda", (torch.float32, torch.bfloat16, torch.float16)))
    if not _native.load_error():
        out.append(("cpu", "cpu", (torch.float32, torch.bfloat16, torch.float16)))
    if not CUDA and os.environ.get("TRITON_INTERPRET") == "1" and not dispatch._REGISTRY["triton"].availability():
        out.append(("triton", "cpu", (torch.float32,)))  # the interpreter computes in numpy fp32
    return out


CASES = [pytest.param(b, dev, dt, id=f"{b}-{dev}-{str(dt).split('.')[-1]}",
                      marks=[pytest.mark.gpu] if dev == "cuda" else [])
         for b, dev, dts in _backends() for dt in dts]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _need_a_backend():
    if not CASES:
        pytest.skip("no fused backend on this machine (native library not built, triton not usable)")


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_perturb_with_noise_is_bit_identical(backend, device, dtype):
    shape = (37, 129)
    w = torch.randn(shape, generator=_gen(1)).to(dtype)
    delta = torch.randn(shape, generator=_gen(2)) * 0.01
    noise = torch.randn(shape, generator=_gen(3))
    want = ref.perturb(w, delta, noise, 0.05, 0, 0, 0)
    with mk.use_backend(backend):
        got = mk.perturb(w.to(device), delta.to(device), 0.05, 0, 0, 0, noise=noise.to(device))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER], ids=["reference", "paper"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_prox_elementwise_is_bit_identical(backend, device, dtype, mode):
    n = 5000
    g = (torch.randn(n, generator=_gen(4)) * 2).to(dtype)
    d0 = torch.randn(n, generator=_gen(5)) * 0.3
    acc0 = torch.randn(n, generator=_gen(6))
    d_r, a_r = d0.clone(), acc0.clone()
    s_r = ref.prox_update_(g, d_r, a_r, LR, SOFT, LAMB, mode, True)
    u = d0 - LR * g.float() if mode == mk.MODE_REFERENCE else d0 - LR * (g.float() + d0 / LAMB)
    thresh = LR * SOFT
    assert (u.abs() <= thresh).any() and (u.abs() > thresh).any()  # both branches are hit
    d_b, a_b = d0.to(device, copy=True), acc0.to(device, copy=True)
    with mk.use_backend(backend):
        s_b = mk.prox_update_(g.to(device), d_b, a_b, LR, SOFT, LAMB, mode, True)
    assert torch.equal(d_b.cpu(), d_r)
    assert torch.equal(a_b.cpu(), a_r)
    torch.testing.assert_close(s_b.cpu(), s_r, rtol=1e-5, atol=0)  # a sum: order may differ


def _dyadic(shape, seed, denom):
    return torch.randint(-8, 9, shape, generator=_gen(seed)).float() / denom


@pytest.mark.parametrize("mode", [mk.MODE_REFERENCE, mk.MODE_PAPER], ids=["reference", "paper"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_prox_rows_are_bit_identical(backend, device, dtype, mode):
    rows, cols = 300, 64
    g = _dyadic((rows, cols), 7, 4).to(dtype)  # small dyadic values: exact in bf16 and fp16 too
    d0 = _dyadic((rows, cols), 8, 8)
    d_r = d0.clone()
    ref.prox_update_(g, d_r, None, LR, SOFT, LAMB, mode, False)
    # the division is what is being tested: the two-rounding form differs on some rows
    u = d0 - LR * g.float() if mode == mk.MODE_REFERENCE else d0 - LR * (g.float() + d0 / LAMB)
    ss = (u * u).sum(1)
    r = torch.sqrt(ss / cols) if mode == mk.MODE_REFERENCE else torch.sqrt(ss)
    s = torch.tensor(SOFT if mode == mk.MODE_REFERENCE else LR * SOFT, dtype=torch.float32)
    assert (s / r != r.reciprocal() * s).any()
    d_b = d0.to(device, copy=True)
    with mk.use_backend(backend):
        mk.prox_update_(g.to(device), d_b, None, LR, SOFT, LAMB, mode, False)
        d_m = d0.to(device, copy=True)
        mk.prox_update_multi_([g.to(device)], [d_m], [], LR, SOFT, LAMB, mode, False)
    assert torch.equal(d_b.cpu(), d_r)
    assert torch.equal(d_m.cpu(), d_r)
