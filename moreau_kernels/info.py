"""What moreau_kernels can run on this machine: ``python -m moreau_kernels.info``.

Prints the torch / triton / CUDA versions, whether the native library (``_C.so``) was found and
loaded (its path, or the reason it was not), how it was built, which ops have CPU and CUDA
kernels, and for every backend whether it is available here and, if not, why.
"""
from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from . import _native, dispatch


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        import triton

        return triton.__version__
    except Exception as e:  # noqa: BLE001 -- a broken triton install is worth reporting, not raising
        return f"import failed: {e}"


def report() -> str:
    lines = [
        f"python        {platform.python_version()} ({sys.executable})",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton        {_triton_version()}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA devices  {names}")
    else:
        lines.append("CUDA devices  none")

    err = _native.load_error()
    path = _native.library_path()
    if err:
        lines.append(f"native lib    NOT loaded: {err}")
    else:
        lines.append(f"native lib    loaded from {path}")
        for item in _native.build_info().items():
            lines.append(f"  built with  {item[0]}={item[1]}")
        lines.append("  kernels     op                   cpu   cuda")
        for op in dispatch.OPS:
            cpu = "yes" if _native.has_op(op, "cpu") else "no"
            cuda = "yes" if _native.has_op(op, "cuda") else "no"
            lines.append(f"              {op:<20} {cpu:<5} {cuda}")

    lines.append(f"backend       selected: {dispatch.get_backend()} (auto order: {', '.join(dispatch.AUTO_ORDER)})")
    lines.append(f"  MOREAU_REQUIRE_NATIVE={'1: a missing native build is an error' if dispatch.require_native() else 'unset: missing native kernels fall back (with a warning for CUDA tensors)'}")
    for name, reasons in dispatch.availability().items():
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        lines.append(f"  {name:<11} {state}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
