"""Compile every Triton kernel of this package for a CUDA target without a GPU (a dev check).

The tests on a CPU-only machine run the kernels through the interpreter, which shares Triton's
type rules but not its code generation, and which never specializes integer arguments equal to 1
as constants (the compiler does). This module compiles the kernels to PTX/cubin for sm_90 with the
ptxas bundled with Triton, so typing or lowering errors of the compiled path show up anyway::

    python -m moreau_kernels.triton_ops._compile_check          # a representative subset
    python -m moreau_kernels.triton_ops._compile_check --full   # every dtype/flag combination

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
    dts = ("fp32", "bf16", "fp16") if full else ("bf16",)
    flags = (False, True)
    for one in ints:
        i = (lambda t: 1) if one else (lambda t: t)
        yield ph._philox_normal_kernel, dict(out_ptr="*fp32", numel=i("i64"), seed="i64", step="i32", index="i32",
                                             PRECISE=True, BLOCK=1024), 4
        yield ph._philox_bits_kernel, dict(out_ptr="*i32", nq=i("i32"), first_q="i64", seed="i32", step="i64",
                                           index="i32", BLOCK=256), 4
        for dt, noise in itertools.product(dts, flags if full else (True,)):
            yield pt._perturb_kernel, dict(w_ptr="*" + dt, d_ptr="*fp32", noise_ptr="*fp32", out_ptr="*" + dt,
                                           numel=i("i32"), std="fp32", seed="i64", step="i32", index="i64",
                                           HAS_NOISE=noise, PRECISE=True, BLOCK=4096), 8
        for kind in (0, 1, 2) if full else (1,):
            yield pt._perturb_multi_kernel, dict(tab_ptr="*i64", n=i("i32"), std="fp32", seed="i64", step="i32",
                                                 KIND=kind, NT=16, PRECISE=True, BLOCK=4096), 8
        modes = itertools.product(dts, (0, 1), flags) if full else [("bf16", 1, True)]
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


def main(full: bool = False, arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    target = GPUTarget("cuda", arch, 32)
    n = 0
    for fn, args, warps in _variants(full):
        sig = {k: v if isinstance(v, str) else "constexpr" for k, v in args.items()}
        consts = {k: v for k, v in args.items() if not isinstance(v, str)}
        missing = set(fn.arg_names) ^ set(args)
        if missing:
            raise SystemExit(f"{fn.__name__}: argument list out of date ({sorted(missing)})")
        try:
            kernel = compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps})
        except Exception as e:  # noqa: BLE001 - report which kernel and variant failed
            print(f"FAILED {fn.__name__} {consts}: {e}", file=sys.stderr)
            return 1
        if "PRECISE" in args and ("sin.approx" in kernel.asm["ptx"] or "lg2.approx" in kernel.asm["ptx"]):
            print(f"FAILED {fn.__name__}: approximate sin/log instructions in the PTX", file=sys.stderr)
            return 1
        n += 1
    print(f"compiled {n} kernel variants for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(full="--full" in sys.argv))
