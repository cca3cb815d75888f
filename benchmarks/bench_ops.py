"""Per-op benchmarks of the moreau ops (BENCHMARKS.md §1).

Providers, side by side in one run:

* ``reference``: the pure-PyTorch math of :mod:`moreau_kernels.reference` called directly, as
  the published loop runs it. For perturb the noise is ``torch.randn`` (the published loop
  draws it from the torch generator), drawn inside the timed call.
* ``reference-philox``: perturb with the counter-based Philox noise computed in pure PyTorch
  (``reference.perturb_out(..., noise=None)``: the same bits the fused kernels regenerate).
  Very slow on CPU, so it runs only up to ``--philox-max-numel`` elements.
* ``compile``: ``torch.compile`` of the ``reference`` function (for perturb: of the randn form;
  the Philox form takes more than ten minutes to compile on a 2-core CPU). A failure is
  recorded as an ``error`` record, never silently dropped.
* every fused backend that can run the call here (``cpu`` on CPU; ``cuda`` and ``triton`` on a
  GPU), through the public ops with ``moreau_kernels.use_backend(name)``.

Metrics per (op, provider, shape, dtype): time median and quantiles 0.2/0.8, effective GB/s over
the minimum bytes the op must move, that as a fraction of the copy bandwidth measured in the same
run, and speedups over ``reference`` and ``compile``.

    python benchmarks/bench_ops.py            # CPU default set (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --full     # every BENCHMARKS.md shape and dtype (default on GPU)
    python benchmarks/bench_ops.py --smoke --out /tmp/x   # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import moreau_kernels as mk  # noqa: E402
from moreau_kernels import reference as R  # noqa: E402

STD, SEED, STEP = 0.05, 1234, 3
LR, SOFT, LAMB = 2e-4, 5e-6, 0.2
FUSED = ("cpu", "cuda", "triton")

SHAPES_FULL = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (4096,),
               (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (5, 123)]
SHAPES_QUICK = [(4096, 4096), (11008, 4096), (4096,), (5, 123)]
SHAPES_SMOKE = [(5, 123), (16,)]


def smollm2_shapes() -> list[tuple[int, ...]]:
    """SmolLM2-135M parameter list (tied embedding, 30 layers, GQA 9/3 heads of 64)."""
    h, kv, inter = 576, 192, 1536
    out = [(49152, h)]
    for _ in range(30):
        out += [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return out + [(h,)]


def llama7b_shapes(layers: int = 8) -> list[tuple[int, ...]]:
    """LLaMA-7B parameter list with ``layers`` decoder layers (embedding and lm_head included)."""
    h, inter = 4096, 11008
    out = [(32000, h)]
    for _ in range(layers):
        out += [(h, h)] * 4 + [(inter, h), (inter, h), (h, inter), (h,), (h,)]
    return out + [(h,), (32000, h)]


def tiny_shapes() -> list[tuple[int, ...]]:
    return [(64, 32), (32,), (5, 123)]


MODELS = {"smollm2": smollm2_shapes, "llama7b-8layers": llama7b_shapes, "tiny": tiny_shapes}


# ------------------------------------------------------------------------------ bytes
def min_bytes(op: str, shapes, dtype: torch.dtype) -> int:
    """The bytes an op cannot avoid moving (δ and acc fp32; noise regenerated, never stored)."""
    es = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if op.startswith("perturb"):
            total += n * (2 * es + 4)  # read w, δ; write w̃
        elif op.startswith("prox"):
            total += n * (es + 8) + (8 * n if op.endswith("acc") else 0)  # read g, δ; write δ (+acc r/w)
        elif op.startswith("saliency"):
            total += 2 * n * es + 4 * (shape[0] + shape[1])  # read w, g; write row and column sums
    return total


# ------------------------------------------------------------------------------ reference forms
def ref_perturb_randn(w, delta, out, std: float) -> None:
    """The published perturb: torch.randn noise, then the reference math."""
    R.perturb_out(w, delta, torch.randn(w.shape, device=w.device), out, std, 0, 0, 0)


def ref_perturb_philox(w, delta, out, std: float, seed: int, step: int, index: int) -> None:
    R.perturb_out(w, delta, None, out, std, seed, step, index)


def ref_prox(g, delta, acc, accumulate: bool):
    return R.prox_update_(g, delta, acc, LR, SOFT, LAMB, R.MODE_REFERENCE, accumulate)


def ref_saliency(w, g):
    return R.channel_saliency(w, g, False)


_compiled: dict[str, object] = {}


def compiled(name: str, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


# ------------------------------------------------------------------------------ cases
class Case:
    """One (op, shapes, dtype): the inputs and a callable per provider."""

    def __init__(self, op: str, shapes, dtype: torch.dtype, device: str, label):
        self.op, self.shapes, self.dtype, self.device, self.label = op, shapes, dtype, device, label
        self.multi = op.endswith("_multi") or "_multi_" in op
        gen = torch.Generator(device=device).manual_seed(0)

        def rnd(shape, dt):  # drawn on the device: the GPU shapes are too large for a CPU round trip
            return torch.randn(shape, generator=gen, device=device).to(dt)

        self.w = [rnd(s, dtype) for s in shapes]
        self.g = [rnd(s, dtype) for s in shapes]
        self.d = [rnd(s, torch.float32) * 1e-3 for s in shapes]
        self.acc = [torch.zeros(s, dtype=torch.float32, device=device) for s in shapes] if op.endswith("acc") else []
        self.out = [torch.empty(s, dtype=dtype, device=device) for s in shapes] if op.startswith("perturb") else []
        self.bytes = min_bytes(op, shapes, dtype)
        self.numel = sum(math.prod(s) for s in shapes)

    # the args the dispatcher sees (to ask which fused backends can run the call)
    def explain(self) -> dict[str, list[str]]:
        if self.op.startswith("perturb"):
            opname, args = ("perturb_multi", (self.w, self.d, self.out)) if self.multi else \
                ("perturb_out", (self.w[0], self.d[0], self.out[0]))
        elif self.op.startswith("prox"):
            opname, args = ("prox_update_multi_", (self.g, self.d, self.acc)) if self.multi else \
                ("prox_update_", (self.g[0], self.d[0], self.acc[0] if self.acc else None))
        else:
            opname, args = "channel_saliency", (self.w[0], self.g[0])
        return mk.explain(opname, *args)

    def provider_fn(self, provider: str):
        w, g, d, acc, out = self.w, self.g, self.d, self.acc, self.out
        accumulate = bool(acc)
        op = self.op
        if provider in FUSED:
            ctx = lambda: mk.use_backend(provider)  # noqa: E731
        else:
            ctx = contextlib.nullcontext
        if op == "perturb":
            if provider == "reference":
                return lambda: ref_perturb_randn(w[0], d[0], out[0], STD)
            if provider == "reference-philox":
                return lambda: ref_perturb_philox(w[0], d[0], out[0], STD, SEED, STEP, 0)
            if provider == "compile":
                f = compiled("perturb", ref_perturb_randn)
                return lambda: f(w[0], d[0], out[0], STD)

            def fused():
                with ctx():
                    mk.perturb_out(w[0], d[0], None, out[0], STD, SEED, STEP, 0)
            return fused
        if op == "perturb_multi":
            idx = list(range(len(w)))
            if provider == "reference":
                def f_ref():
                    for a, b, c in zip(w, d, out):
                        ref_perturb_randn(a, b, c, STD)
                return f_ref
            if provider == "reference-philox":
                return lambda: R.perturb_multi(w, d, out, STD, SEED, STEP, idx)
            if provider == "compile":
                f = compiled("perturb", ref_perturb_randn)

                def f_comp():
                    for a, b, c in zip(w, d, out):
                        f(a, b, c, STD)
                return f_comp

            def fused_m():
                with ctx():
                    mk.perturb_multi(w, d, out, STD, SEED, STEP, idx)
            return fused_m
        if op in ("prox", "prox_acc"):
            a0 = acc[0] if acc else None
            if provider == "reference":
                return lambda: ref_prox(g[0], d[0], a0, accumulate)
            if provider == "compile":
                f = compiled(op, ref_prox)
                return lambda: f(g[0], d[0], a0, accumulate)

            def fused_p():
                with ctx():
                    mk.prox_update_(g[0], d[0], a0, LR, SOFT, LAMB, 0, accumulate)
            return fused_p
        if op in ("prox_multi", "prox_multi_acc"):
            if provider == "reference":
                return lambda: R.prox_update_multi_(g, d, acc, LR, SOFT, LAMB, 0, accumulate)
            if provider == "compile":
                f = compiled(op, ref_prox)

                def f_comp_p():
                    for k in range(len(g)):
                        f(g[k], d[k], acc[k] if acc else None, accumulate)
                return f_comp_p

            def fused_pm():
                with ctx():
                    mk.prox_update_multi_(g, d, acc, LR, SOFT, LAMB, 0, accumulate)
            return fused_pm
        if op == "saliency":
            if provider == "reference":
                return lambda: ref_saliency(w[0], g[0])
            if provider == "compile":
                f = compiled("saliency", ref_saliency)
                return lambda: f(w[0], g[0])

            def fused_s():
                with ctx():
                    mk.channel_saliency(w[0], g[0], False)
            return fused_s
        raise ValueError(op)


def run(args) -> Path:
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else \
        ("cpu" if args.device == "auto" else args.device)
    if device == "cpu":
        C.set_threads()
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
    full = args.full or (device == "cuda" and not args.quick and not args.smoke)
    if args.smoke:
        shapes, dtypes, models = SHAPES_SMOKE, ["fp32", "bf16"], ["tiny"]
    elif full:
        shapes, dtypes = SHAPES_FULL, ["fp32", "bf16", "fp16"]
        models = ["smollm2", "llama7b-8layers"] if device == "cuda" else ["smollm2"]
    else:
        shapes, dtypes, models = SHAPES_QUICK, ["fp32", "bf16"], ["smollm2"]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    if args.models is not None:
        models = [m for m in args.models.split(",") if m]
    ops = args.ops.split(",") if args.ops else ["perturb", "prox", "prox_acc", "saliency"]
    multi_ops = ["perturb_multi", "prox_multi", "prox_multi_acc"]
    if args.ops:
        multi_ops = [o for o in multi_ops if o in ops]
        ops = [o for o in ops if o not in multi_ops]
    philox_max = args.philox_max_numel if args.philox_max_numel is not None else \
        (2**22 if device == "cpu" else 2**31)
    min_run = args.min_run_time if args.min_run_time is not None else (0.01 if args.smoke else 1.0)
    min_samples = 3 if not args.smoke else 2
    if args.smoke and args.philox_max_numel is None:
        philox_max = 0  # seconds, not minutes

    meta = C.Meta(device)
    records: list[dict] = []
    notes: list[str] = []
    avail = mk.availability()
    print(f"# device {meta.base['device_name']} threads {torch.get_num_threads()} load {C.loadavg()}", flush=True)
    print(f"# backends: { {k: ('ok' if not v else v[0]) for k, v in avail.items()} }", flush=True)

    copy_bytes = args.copy_mib * 2**20 if args.copy_mib else (16 * 2**20 if args.smoke else
                                                              (256 * 2**20 if device == "cpu" else 2**30))
    bw = C.copy_bandwidth(device, copy_bytes, min_run)
    for name in ("clone", "copy_"):
        b = bw[name]
        shape = [copy_bytes // 4]
        for metric, unit, value in (("time", "ms", b["median"] * 1e3), ("time_q20", "ms", b["q20"] * 1e3),
                                    ("time_q80", "ms", b["q80"] * 1e3), ("gbps", "GB/s", b["bytes_per_s"] / 1e9)):
            records.append(meta.record("copy", name, shape, "fp32", metric, unit, value, bytes=b["bytes"]))
    copy_bw = bw["best"]
    print(f"# copy bandwidth: clone {bw['clone']['bytes_per_s']/1e9:.1f} GB/s, "
          f"copy_ {bw['copy_']['bytes_per_s']/1e9:.1f} GB/s (denominator {copy_bw/1e9:.1f})", flush=True)

    cases = []
    for op in ops:
        for shape in shapes:
            if op == "saliency" and len(shape) != 2:
                continue
            for dt in dtypes:
                cases.append((op, [shape], dt, "x".join(map(str, shape))))
    for op in multi_ops:
        for model in models:
            for dt in (args.multi_dtypes.split(",") if args.multi_dtypes else dtypes):
                cases.append((op, MODELS[model](), dt, model))

    for op, shp, dt, label in cases:
        case = Case(op, shp, C.DTYPES[dt], device, label)
        why = case.explain()
        providers = ["reference"]
        if op.startswith("perturb"):
            if case.numel <= philox_max:
                providers.append("reference-philox")
            else:
                notes.append(f"{op} {label} {dt}: reference-philox skipped ({case.numel} elements > "
                             f"--philox-max-numel {philox_max})")
        if not args.no_compile and not (case.multi and args.no_compile_multi):
            providers.append("compile")
        elif case.multi and args.no_compile_multi and not args.no_compile:
            notes.append(f"{op} {label} {dt}: compile not run (--no-compile-multi)")
        providers += [b for b in FUSED if not why[b]]
        times: dict[str, float] = {}
        for p in providers:
            fn = case.provider_fn(p)
            t_start = time.perf_counter()
            try:
                fn()  # warm-up (and compilation for `compile`)
                C.sync(device)
                warm = time.perf_counter() - t_start
                q20, q50, q80 = C.bench(fn, device, min_run, min_samples)
            except Exception as e:  # noqa: BLE001 - recorded, not hidden
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                records.append(meta.record(op, p, label, dt, "error", "", None, message=msg))
                print(f"{op:15s} {label:16s} {dt:5s} {p:17s} FAILED {msg}", flush=True)
                continue
            times[p] = q50
            ext = {"bytes": case.bytes, "numel": case.numel, "tensors": len(shp)}
            if p == "compile":
                ext["first_call_s"] = round(warm, 3)
            gbps = case.bytes / q50 / 1e9
            for metric, unit, value in (("time", "ms", q50 * 1e3), ("time_q20", "ms", q20 * 1e3),
                                        ("time_q80", "ms", q80 * 1e3), ("gbps", "GB/s", gbps),
                                        ("copy_fraction", "fraction", case.bytes / q50 / copy_bw)):
                records.append(meta.record(op, p, label, dt, metric, unit, value, **ext))
            print(f"{op:15s} {label:16s} {dt:5s} {p:17s} {q50*1e3:10.3f} ms {gbps:8.2f} GB/s "
                  f"{100*case.bytes/q50/copy_bw:6.1f}% copy  load {C.loadavg()[0]}", flush=True)
        for p, t in times.items():
            for base in ("reference", "compile"):
                if base in times and p != base:
                    records.append(meta.record(op, p, label, dt, f"speedup_vs_{base}", "x", times[base] / t))
        del case, fn  # the provider closures hold the tensors too
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    out_dir = Path(args.out) if args.out else C.RESULTS / C.device_name(device)
    path = C.write_results(out_dir / "ops.json", records, kind="ops", device=device,
                           device_name=meta.base["device_name"], device_slug=C.device_name(device),
                           copy_bandwidth={k: v for k, v in bw.items()}, backends=avail, notes=notes,
                           loadavg_end=C.loadavg(), **{k: meta.base[k] for k in ("torch", "triton", "commit", "date")})
    print(f"# wrote {path}", flush=True)
    return path


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the CPU default subset (also on GPU)")
    g.add_argument("--full", action="store_true", help="every BENCHMARKS.md shape and dtype")
    g.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (tests)")
    ap.add_argument("--shapes", help="override, e.g. 4096x4096,4096")
    ap.add_argument("--dtypes", help="override, e.g. fp32,bf16")
    ap.add_argument("--models", help="parameter lists for the multi-tensor ops: smollm2,llama7b-8layers,tiny "
                                     "('' for none)")
    ap.add_argument("--ops", help="subset of perturb,prox,prox_acc,saliency,perturb_multi,prox_multi,prox_multi_acc")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    ap.add_argument("--no-compile-multi", action="store_true", help="leave it out of the multi-tensor ops only")
    ap.add_argument("--multi-dtypes", help="dtypes of the multi-tensor ops (default: --dtypes)")
    ap.add_argument("--philox-max-numel", type=int, help="largest case for reference-philox (CPU default 2**22)")
    ap.add_argument("--min-run-time", type=float, help="seconds of timing per measurement (default 1)")
    ap.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth tensor in MiB")
    ap.add_argument("--out", help="output folder (default benchmarks/results/<device-name>)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse())
