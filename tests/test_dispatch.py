"""The dispatcher: no silent fallback for CUDA tensors, MOREAU_REQUIRE_NATIVE, the choice cache.

A CPU-only machine has no CUDA tensors, so the CUDA cases pass stand-ins that carry a CUDA
device and a dtype (all the dispatcher looks at) to ``dispatch._select``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import moreau_kernels as mk
from moreau_kernels import _native, dispatch


class FakeCuda:
    """What the dispatcher reads of a tensor: its device and dtype."""

    def __init__(self, dtype=torch.bfloat16):
        self.device = torch.device("cuda", 0)
        self.dtype = dtype

    def is_floating_point(self):
        return True


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("MOREAU_REQUIRE_NATIVE", raising=False)
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _cuda_works() -> bool:
    return not dispatch._REGISTRY["cuda"].availability()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the cuda backend cannot run")
def test_cuda_tensors_off_the_cuda_backend_warn_once_with_the_reason():
    ts = [FakeCuda(), FakeCuda(torch.float32)]
    with pytest.warns(mk.BackendFallbackWarning) as rec:
        name = dispatch._select("prox_update_", ts, "auto")
    assert name == "reference"
    msg = str(rec[0].message)
    assert "moreau::prox_update_" in msg and "'reference'" in msg and "not 'cuda'" in msg
    assert "; ".join(dispatch._REGISTRY["cuda"].reasons("prox_update_", ts)) in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same op and reason again: silent
        assert dispatch._select("prox_update_", ts, "auto") == "reference"
    with pytest.warns(mk.BackendFallbackWarning):  # another op warns on its own
        dispatch._select("perturb_out", ts, "auto")


def test_cpu_tensors_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, d = torch.randn(3, 4), torch.zeros(3, 4)
        assert mk.select("prox_update_", g, d, None) in ("cpu", "reference")


def test_extension_without_cuda_kernels_is_named_in_the_warning(monkeypatch):
    monkeypatch.setattr(_native, "has_cuda_kernels", lambda: False)
    with pytest.warns(mk.BackendFallbackWarning, match="built without CUDA kernels"):
        dispatch._select("perturb_multi", [FakeCuda()], "auto")


def test_require_native_makes_a_missing_library_an_error(monkeypatch):
    monkeypatch.setattr(_native, "load_error", lambda: "moreau_kernels/_C*.so not found")
    g, d = torch.randn(3, 4), torch.zeros(3, 4)
    assert mk.select("prox_update_", g, d, None) == "reference"  # default: falls back
    monkeypatch.setenv("MOREAU_REQUIRE_NATIVE", "1")
    with pytest.raises(mk.BackendUnavailable, match="MOREAU_REQUIRE_NATIVE=1.*_C\\*.so not found"):
        mk.prox_update_(g, d, None, 0.1, 0.1, 1.0, mk.MODE_REFERENCE, False)
    with mk.use_backend("reference"):  # an explicit choice is still honoured
        mk.prox_update_(g, d, None, 0.1, 0.1, 1.0, mk.MODE_REFERENCE, False)


def test_require_native_makes_missing_cuda_kernels_an_error(monkeypatch):
    monkeypatch.setenv("MOREAU_REQUIRE_NATIVE", "1")
    monkeypatch.setattr(_native, "has_cuda_kernels", lambda: False)
    with pytest.raises(mk.BackendUnavailable, match="cuda backend cannot run.*without CUDA kernels"):
        dispatch._select("prox_update_", [FakeCuda()], "auto")


def test_require_native_passes_when_the_library_is_there(monkeypatch):
    if _native.load_error():
        pytest.skip(f"native library not built here: {_native.load_error()}")
    monkeypatch.setenv("MOREAU_REQUIRE_NATIVE", "1")
    g, d = torch.randn(3, 4), torch.zeros(3, 4)
    assert mk.select("prox_update_", g, d, None) == "cpu"


def test_choice_is_cached_per_kind_of_call_and_cleared_by_set_backend(monkeypatch):
    calls = []
    real = dispatch._select
    monkeypatch.setattr(dispatch, "_select", lambda *a: calls.append(a[0]) or real(*a))
    g, d = torch.randn(3, 4), torch.zeros(3, 4)
    for _ in range(5):
        first = mk.select("prox_update_", g, d, None)
    assert calls == ["prox_update_"]
    mk.select("prox_update_", g.double(), d, None)  # another dtype: another entry
    mk.select("channel_saliency", g, None, False)
    assert len(calls) == 3
    with mk.use_backend("reference"):  # entering and leaving clears the cache
        assert mk.select("prox_update_", g, d, None) == "reference"
    assert mk.select("prox_update_", g, d, None) == first
    assert len(calls) == 5
    mk.set_backend("auto")
    mk.select("prox_update_", g, d, None)
    assert len(calls) == 6
