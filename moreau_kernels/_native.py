"""Lazy loader of the native extension (``moreau_kernels/_C*.so``, built from ``csrc/``).

The extension registers its ops with ``TORCH_LIBRARY(moreau_C, m)``: the same schemas as the
public ``moreau::`` ops, with CPU kernels and, when built with nvcc, CUDA kernels. Importing
this module never fails; :func:`load_error` says why the extension is not there.
"""
from __future__ import annotations

import functools
import glob
import os

import torch

NAMESPACE = "moreau_C"
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def _load() -> str:
    """Load the library once; returns '' on success, else the reason it failed."""
    if os.environ.get("MOREAU_DISABLE_NATIVE") == "1":
        return "disabled by MOREAU_DISABLE_NATIVE=1"
    here = os.path.dirname(os.path.abspath(__file__))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not libs:
        return "moreau_kernels/_C*.so not found"
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError) as e:  # wrong torch ABI, missing CUDA runtime, ...
        return f"{os.path.basename(libs[0])} failed to load: {e}"
    return ""


def load_error() -> str:
    return _load()


def library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")))
    return libs[0] if libs else ""


@functools.lru_cache(maxsize=None)
def build_info() -> dict[str, str]:
    """How the loaded library was built (cuda, cuda_archs, torch, cpu_flags, ...); {} if not loaded."""
    if _load():
        return {}
    text = op("build_info")()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def has_op(op: str, device_type: str) -> bool:
    if _load():
        return False
    name = f"{NAMESPACE}::{op}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, _DISPATCH_KEY[device_type])
    except RuntimeError:
        return False


def has_cuda_kernels() -> bool:
    return has_op("prox_update_", "cuda")


def op(name: str):
    err = _load()
    if err:
        raise RuntimeError(f"the native moreau library is not available: {err}")
    return getattr(getattr(torch.ops, NAMESPACE), name)
