"""Half-precision matrix products with fp32 accumulation on the CPU.

PyTorch's CPU fp16 GEMM has no fast path on CPUs without AVX512-FP16/AMX-FP16: on the 2-core
AMD EPYC of our CI one fp16 forward+backward of SmolLM2-135M takes ~400 s against ~20 s in fp32
(bf16 has a oneDNN path and is fast). :func:`fp32_accumulate_gemms` makes fp16 (or bf16) models
practical there by computing each matrix product the way a GPU's tensor-core GEMM does: the
half-precision operands are read exactly (an up-cast to fp32 is lossless), the products are
accumulated in fp32, and the result is rounded once to the half dtype. Everything else (norms,
activations, residual adds, the weights and their gradients) stays in the half dtype, so the
model still *is* an fp16 model; only the summation order inside each dot product differs from a
native fp16 GEMM (which also accumulates in fp32, on the CPU as in cuBLAS' default).

The backward pass follows by autograd: the gradient reaching each product is rounded to the half
dtype by the cast nodes, the weight and input gradients are fp32-accumulated products rounded to
the half dtype, exactly like the forward.

Intercepted: ``F.linear``, ``torch.matmul``/``@``, ``mm``, ``bmm``, ``addmm``, ``baddbmm`` and
``F.scaled_dot_product_attention`` (computed in fp32 and rounded, as flash attention keeps its
softmax and accumulators in fp32). Tensors on other devices and other dtypes pass through.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_GEMMS = {
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm,
    torch.baddbmm, torch.Tensor.baddbmm, F.scaled_dot_product_attention,
}


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a


class _Fp32AccumulateGemms(TorchFunctionMode):
    def __init__(self, dtypes, device_types):
        super().__init__()
        self.dtypes = tuple(dtypes)
        self.device_types = tuple(device_types)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS:
            half = [t.dtype for t in _tensors(args, kwargs)
                    if t.dtype in self.dtypes and t.device.type in self.device_types]
            if half:
                dtype = half[0]
                up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a
                out = func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
                self.calls += 1
                return out.to(dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fp32_accumulate_gemms(dtypes=(torch.float16,), device_types=("cpu",)):
    """Inside the block, half-precision matrix products on ``device_types`` are computed as fp32
    products of the (exactly up-cast) operands, rounded once to the half dtype (see the module
    docstring). Yields the mode object; its ``calls`` counts the products it handled."""
    for d in dtypes:
        if d not in (torch.float16, torch.bfloat16):
            raise ValueError(f"fp32_accumulate_gemms handles float16/bfloat16, got {d}")
    mode = _Fp32AccumulateGemms(dtypes, device_types)
    with mode:
        yield mode


def slow_half_gemm(dtype: torch.dtype, device: str | torch.device) -> bool:
    """True where ``dtype`` products on ``device`` have no fast native path (fp16 on a CPU)."""
    return torch.device(device).type == "cpu" and dtype == torch.float16
