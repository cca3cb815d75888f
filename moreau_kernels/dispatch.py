"""Backend selection for the moreau ops, with the reason every backend was or was not used.

Each backend answers ``reasons(op, tensors) -> list[str]``; an empty list means "I can run
this call". In ``auto`` mode the first backend of ``AUTO_ORDER`` without reasons runs. A backend
chosen explicitly (``set_backend``, ``use_backend`` or ``MOREAU_BACKEND``) that cannot run the
call raises :class:`BackendUnavailable` listing what is missing and how to get it.

No silent fallbacks: when CUDA tensors do not reach the ``cuda`` backend in auto mode, a
:class:`BackendFallbackWarning` says once (per op and reason) which backend ran instead and
why. With ``MOREAU_REQUIRE_NATIVE=1`` (for installs that must have the native build, e.g. a
GPU server) a native library that is missing, failed to load or lacks the kernels of the
tensors' device is an error at the first op call instead of a fallback.

The choice is cached per (op, backend choice, device types and dtypes of the arguments): the
estimator calls the ops hundreds of times a step with the same kinds of tensors. The cache is
cleared by :func:`set_backend`, :func:`use_backend` and :func:`clear_cache`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from typing import Callable, Iterable

import torch

from . import reference

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

OPS = (
    "philox_normal",
    "perturb_out",
    "perturb_multi",
    "prox_update_",
    "prox_update_multi_",
    "channel_saliency",
)

_choice: contextvars.ContextVar[str] = contextvars.ContextVar(
    "moreau_backend", default=os.environ.get("MOREAU_BACKEND", "auto")
)


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly (or required by MOREAU_REQUIRE_NATIVE) but cannot run this call."""


class BackendFallbackWarning(UserWarning):
    """CUDA tensors ran on a slower backend than ``cuda`` in auto mode; the message says why."""


def require_native() -> bool:
    """True when ``MOREAU_REQUIRE_NATIVE=1``: a missing native build is an error, not a fallback."""
    return os.environ.get("MOREAU_REQUIRE_NATIVE") == "1"


# (op, choice, interpreter on, kinds of tensors) -> backend name; see select()
_cache: dict[tuple, str] = {}
_warned: set[tuple[str, str]] = set()


def clear_cache() -> None:
    """Forget the cached backend choices (after changing the environment the backends look at)."""
    _cache.clear()


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every later op call in this context ('auto' picks the fastest)."""
    _choice.set(_check_name(name))
    clear_cache()


def get_backend() -> str:
    return _choice.get()


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("cpu"): ...`` runs the ops inside on that backend."""
    token = _choice.set(_check_name(name))
    clear_cache()
    try:
        yield
    finally:
        _choice.reset(token)
        clear_cache()


class _Backend:
    name = ""
    build_hint = ""

    def availability(self) -> list[str]:
        """Reasons this backend cannot run at all on this machine (empty when it can)."""
        return []

    def reasons(self, op: str, tensors: list[torch.Tensor]) -> list[str]:
        out = list(self.availability())
        if out:
            return out
        return self.call_reasons(op, tensors)

    def call_reasons(self, op: str, tensors: list[torch.Tensor]) -> list[str]:
        return []

    def fn(self, op: str) -> Callable:
        raise NotImplementedError


class _Reference(_Backend):
    name = "reference"

    def fn(self, op):
        return getattr(reference, op)


def _device_reasons(tensors, device_type: str, what: str) -> list[str]:
    bad = sorted({t.device.type for t in tensors if t.device.type != device_type})
    return [f"{what} runs on {device_type} tensors, got {', '.join(bad)}"] if bad else []


def _dtype_reasons(tensors, allowed=WEIGHT_DTYPES) -> list[str]:
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in allowed})
    return [f"unsupported dtype {', '.join(bad)}"] if bad else []


class _Native(_Backend):
    """The C++ extension (csrc/), loaded lazily: CPU kernels always, CUDA kernels when built."""

    build_hint = (
        "build the native extension with `pip install -e .` (needs a C++ compiler; the CUDA "
        "kernels also need nvcc and a CUDA build of torch); `python -m moreau_kernels.info` "
        "shows what was built"
    )

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.name = "cuda" if device_type == "cuda" else "cpu"

    def availability(self):
        from . import _native

        err = _native.load_error()
        if err:
            return [f"native extension not loaded ({err}); {self.build_hint}"]
        if self.device_type == "cuda":
            if not _native.has_cuda_kernels():
                return ["native extension was built without CUDA kernels"]
            if not torch.cuda.is_available():
                return ["no CUDA device on this machine"]
        return []

    def call_reasons(self, op, tensors):
        from . import _native

        if not _native.has_op(op, self.device_type):
            return [f"op {op} has no {self.name} kernel"]
        return _device_reasons(tensors, self.device_type, f"the {self.name} backend") + _dtype_reasons(tensors)

    def fn(self, op):
        from . import _native

        return _native.op(op)


class _Triton(_Backend):
    name = "triton"
    build_hint = "install triton (it ships with the CUDA build of torch)"

    def availability(self):
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed"]
        return []

    def call_reasons(self, op, tensors):
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        on_cpu = any(t.device.type == "cpu" for t in tensors)
        if on_cpu and not interp:
            return ["the triton backend runs on cuda tensors (CPU only under TRITON_INTERPRET=1)"]
        if on_cpu and get_backend() != "triton":
            return ["triton on CPU (interpreter) is for tests; it is used only when chosen explicitly"]
        if not on_cpu and not torch.cuda.is_available():
            return ["no CUDA device on this machine"]
        if on_cpu:  # the interpreter computes in numpy: fp32 only
            return _dtype_reasons(tensors, (torch.float32,))
        return _device_reasons(tensors, "cuda", "the triton backend") + _dtype_reasons(tensors)

    def fn(self, op):
        from . import triton_ops

        return getattr(triton_ops, op)


_REGISTRY: dict[str, _Backend] = {
    "cuda": _Native("cuda"),
    "triton": _Triton(),
    "cpu": _Native("cpu"),
    "reference": _Reference(),
}


def _flatten(args: Iterable) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def explain(op: str, *args) -> dict[str, list[str]]:
    """For a call of ``op`` with ``args``: each backend and the reasons it cannot run it."""
    tensors = _flatten(args)
    return {name: _REGISTRY[name].reasons(op, tensors) for name in BACKENDS}


def select(op: str, *args) -> str:
    """Name of the backend that runs this call under the current choice."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    tensors = _flatten(args)
    choice = get_backend()
    key = (op, choice, os.environ.get("TRITON_INTERPRET") == "1", require_native(),
           frozenset((t.device.type, t.dtype) for t in tensors))
    name = _cache.get(key)
    if name is None:
        name = _select(op, tensors, choice)
        _cache[key] = name
    return name


def _select(op: str, tensors: list[torch.Tensor], choice: str) -> str:
    if choice != "auto":
        backend = _REGISTRY[choice]
        why = backend.reasons(op, tensors)
        if why:
            hint = f" To enable it: {backend.build_hint}." if backend.build_hint else ""
            raise BackendUnavailable(f"backend {choice!r} cannot run moreau::{op}: {'; '.join(why)}.{hint}")
        return choice
    device_types = {t.device.type for t in tensors}
    if require_native():
        for dt in sorted(device_types & {"cpu", "cuda"}):
            native = _REGISTRY[dt]
            why = native.availability() or native.call_reasons(op, [t for t in tensors if t.device.type == dt])
            if why:
                raise BackendUnavailable(
                    f"MOREAU_REQUIRE_NATIVE=1 but the {dt} backend cannot run moreau::{op}: {'; '.join(why)}. "
                    f"To enable it: {native.build_hint}; or unset MOREAU_REQUIRE_NATIVE to fall back.")
    for name in AUTO_ORDER:
        if not _REGISTRY[name].reasons(op, tensors):
            break
    else:  # pragma: no cover
        raise AssertionError("the reference backend always runs")
    if "cuda" in device_types and name != "cuda":
        _warn_fallback(op, name, _REGISTRY["cuda"].reasons(op, tensors))
    return name


def _warn_fallback(op: str, used: str, why: list[str]) -> None:
    reason = "; ".join(why)
    if (op, reason) in _warned:
        return
    _warned.add((op, reason))
    warnings.warn(f"moreau::{op} on CUDA tensors runs on the {used!r} backend, not 'cuda': {reason}. "
                  "`python -m moreau_kernels.info` shows what was built; set MOREAU_REQUIRE_NATIVE=1 to make "
                  "this an error.", BackendFallbackWarning, stacklevel=4)


def run(op: str, *args):
    """Run ``op`` on the selected backend."""
    return _REGISTRY[select(op, *args)].fn(op)(*args)


def availability() -> dict[str, list[str]]:
    """Each backend and the reasons it cannot run on this machine at all."""
    return {name: _REGISTRY[name].availability() for name in BACKENDS}
