"""Compile every Triton kernel of this package for a CUDA target without a GPU (a dev check).

The tests on a CPU-only machine run the kernels through the interpreter, which shares Triton's
type rules but not its code generation, and which never specializes integer arguments equal to 1
as constants (the compiler does). This module compiles the kernels to PTX/cubin for sm_90 with the
ptxas bundled with Triton, with the launch options the ops use (``NO_FP_FUSION``), so typing or
lowering errors of the compiled path show up anyway, and checks the PTX:

* no approximate ``sin.approx`` / ``lg2.approx`` in the precise (libdevice) noise kernels;
* no ``fma.rn.f32`` in the prox kernels, the perturb kernels with a given noise tensor, and the
  Philox perturb kernels compiled with PRECISE=False (libdevice's log/sin/cos use fma on purpose,
  so the precise Philox variants are checked through their libdevice-free twin): w + xi*sigma and
  delta - lr*g round twice, as in the C++/CUDA kernels and the reference.

::

    python -m moreau_kernels.triton_ops._compile_check          # reference and paper mode, fp32 and bf16
    python -m moreau_kernels.triton_ops._compile_check --full   # every dtype/flag combination

Exit status 0: all compiled and clean; 1: a kernel failed to compile or its PTX is wrong.
It must run in a process where ``TRITON_INTERPRET`` is unset (the kernels are then real
``JITFunction`` objects). Uses Triton internals (``ASTSource``, ``GPUTarget``).
"""
from __future__ import annotations

import itertools
import os
import sys


def _variants(full: bool):
    from . import perturb as pt
    from . import philox as ph
    from . import prox_update as pu
    from . import saliency as sa

    ints = [True, False] if full else [True]  # True: ints equal to 1, specialized as constants
    dts = ("fp32", "bf16", "fp16") if full else ("fp32", "bf16")
    flags = (False, True)
    for one in ints:
        i = (lambda t: 1) if one else (lambda t: t)
        yield ph._philox_normal_kernel, dict(out_ptr="*fp32", numel=i("i64"), seed="i64", step="i32", index="i32",
                                             PRECISE=True, BLOCK=1024), 4
        yield ph._philox_bits_kernel, dict(out_ptr="*i32", nq=i("i32"), first_q="i64", seed="i32", step="i64",
                                           index="i32", BLOCK=256), 4
        for dt, noise, precise in itertools.product(dts, flags, flags):
            yield pt._perturb_kernel, dict(w_ptr="*" + dt, d_ptr="*fp32", noise_ptr="*fp32", out_ptr="*" + dt,
                                           numel=i("i32"), std="fp32", seed="i64", step="i32", index="i64",
                                           HAS_NOISE=noise, PRECISE=precise, BLOCK=4096), 8
        for kind, precise in itertools.product((0, 1, 2) if full else (0, 1), flags):
            yield pt._perturb_multi_kernel, dict(tab_ptr="*i64", n=i("i32"), std="fp32", seed="i64", step="i32",
                                                 KIND=kind, NT=16, PRECISE=precise, BLOCK=4096), 8
        modes = itertools.product(dts, (0, 1), flags if full else (True,))
        for dt, mode, acc in modes:
            common = dict(lr="fp32", soft="fp32", thresh="fp32", lamb="fp32", MODE=mode, ACCUMULATE=acc)
            single = dict(common, g_ptr="*" + dt, d_ptr="*fp32", a_ptr="*fp32", part_ptr="*fp32", BLOCK=4096)
            yield pu._prox_rows_kernel, dict(single, ncols=i("i32")), 8
            yield pu._prox_elems_kernel, dict(single, numel=i("i32")), 8
            multi = dict(common, tab_ptr="*i64", n=i("i32"), part_ptr="*fp32", KIND={"fp32": 0, "bf16": 1}.get(dt, 2),
                         NT=512, BLOCK=2048)
            yield pu._prox_rows_multi_kernel, multi, 8
            yield pu._prox_elems_multi_kernel, multi, 8
        yield pu._segment_sum_kernel, dict(part_ptr="*fp32", seg_ptr="*i64", out_ptr="*fp32", n=i("i32"), BLOCK=256), 4
        for dt, has_g, vec in itertools.product(dts, flags, flags) if full else [("bf16", True, True)]:
            yield sa._saliency_kernel, dict(w_ptr="*" + dt, g_ptr="*" + dt, rows_part_ptr="*fp32",
                                            cols_part_ptr="*fp32", R=i("i32"), C=i("i32"), tiles_per_split=i("i32"),
                                            HAS_G=has_g, VECTORIZE=vec, BLOCK_R=32, BLOCK_C=128), 4


def uses_libdevice(args: dict) -> bool:
    """Kernels whose PTX holds libdevice's own fma: the precise Philox noise."""
    return args.get("PRECISE") is True and args.get("HAS_NOISE") is not True


def ptx_problems(fn_name: str, args: dict, ptx: str) -> list[str]:
    """What is wrong with a kernel's PTX (empty when nothing)."""
    out = []
    if args.get("PRECISE") is True and ("sin.approx" in ptx or "lg2.approx" in ptx):
        out.append("approximate sin/log instructions in the PTX of a precise kernel")
    if fn_name != "_philox_normal_kernel" and not uses_libdevice(args) and "fma.rn.f32" in ptx:
        out.append("fma.rn.f32 in the PTX: a multiply-add was fused (launch with NO_FP_FUSION)")
    return out


def compile_variant(fn, args: dict, warps: int, arch: int = 90, options: dict | None = None):
    """Compile one kernel variant for sm_<arch> with the ops' launch options; returns the kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from ._utils import NO_FP_FUSION

    sig = {k: v if isinstance(v, str) else "constexpr" for k, v in args.items()}
    consts = {k: v for k, v in args.items() if not isinstance(v, str)}
    missing = set(fn.arg_names) ^ set(args)
    if missing:
        raise ValueError(f"{fn.__name__}: argument list out of date ({sorted(missing)})")
    opts = {"num_warps": warps, **NO_FP_FUSION, **(options or {})}
    return compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=opts)


def self_test(arch: int = 90) -> str:
    """The fma check must see a fused multiply-add: compile a prox kernel with fusion on and
    expect it flagged. Returns '' when the check works, else why not."""
    from . import prox_update as pu

    args = dict(g_ptr="*fp32", d_ptr="*fp32", a_ptr="*fp32", part_ptr="*fp32", ncols="i32", lr="fp32",
                soft="fp32", thresh="fp32", lamb="fp32", MODE=0, ACCUMULATE=True, BLOCK=1024)
    ptx = compile_variant(pu._prox_rows_kernel, args, 4, arch, {"enable_fp_fusion": True}).asm["ptx"]
    if not ptx_problems("_prox_rows_kernel", args, ptx):
        return "with enable_fp_fusion=True the prox kernel's PTX has no fma.rn.f32: the check would see nothing"
    return ""


def main(full: bool = False, arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    why = self_test(arch)
    if why:
        print(f"FAILED self-test: {why}", file=sys.stderr)
        return 1
    n = 0
    for fn, args, warps in _variants(full):
        consts = {k: v for k, v in args.items() if not isinstance(v, str)}
        try:
            kernel = compile_variant(fn, args, warps, arch)
        except Exception as e:  # noqa: BLE001 - report which kernel and variant failed
            print(f"FAILED {fn.__name__} {consts}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        problems = ptx_problems(fn.__name__, args, kernel.asm["ptx"])
        if problems:
            print(f"FAILED {fn.__name__} {consts}: {'; '.join(problems)}", file=sys.stderr)
            return 1
        n += 1
    print(f"compiled {n} kernel variants for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(full="--full" in sys.argv))
