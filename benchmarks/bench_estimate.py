"""End-to-end Moreau estimate benchmark (BENCHMARKS.md §2).

For each model and each estimator path, in a fresh subprocess (so CPU peak RSS belongs to that
configuration alone), on the same calibration batch:

* ``fwd_bwd``: forward+backward alone (plain ``loss.backward()`` on the clean weights), timed
  before and after the estimate and pooled;
* ``step``: one step of the estimate (median over the steps after the first);
* ``overhead = step - fwd_bwd`` (perturb, restore, prox update, noise, Python) and as % of fwd_bwd;
* ``estimate``: the whole estimate (``iters`` steps);
* peak memory during the estimate: GPU ``torch.cuda.max_memory_allocated``; CPU the peak RSS
  (VmHWM, reset through /proc/self/clear_refs after the model is loaded; ``ru_maxrss`` of the
  whole process is recorded too);
* the bandwidth floor of the elementwise work: minimum bytes per step (perturb: read w and δ,
  write w̃; update: read g and δ, write δ; acc read+write on averaged steps) ÷ the copy bandwidth
  measured in the same run, and overhead ÷ floor.

Paths: ``pure`` = the published loop: ``moreau_kernels.use_backend("reference")`` with
``moreau_estimate`` and ``noise="torch"`` (noise drawn from the CPU torch generator, as the
published code does); ``fused`` = ``moreau_estimate`` on the auto-selected backend with Philox
noise; ``lean`` = ``moreau_pruner.lean.moreau_estimate_lean`` (auto backend) when it exists.

    python benchmarks/bench_estimate.py                    # CPU: SmolLM2 + 1-layer LLaMA shapes
    python benchmarks/bench_estimate.py --models smollm2   # one model
    python benchmarks/bench_estimate.py                    # on a GPU: bf16, 640 and 8192 tokens
    python benchmarks/bench_estimate.py --models llama7b --layers 4 --token-shapes 10x64   # a quick GPU run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LLAMA = {
    "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # a LLaMA-shaped toy for checking the benchmark itself (scripts/gpu_check.sh --dry-run, tests)
    "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}
PATHS = ("pure", "fused", "lean")


# ============================================================================ worker (one config)
def _proc_status(key: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status in bytes (0 if unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak(device: str) -> bool:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _mem_now(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else _proc_status("VmRSS")


def _mem_peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status("VmHWM")


def build(spec: dict, device: str):
    """(model, batch, description) for a worker spec."""
    dtype = C.DTYPES[spec["dtype"]]
    n, seq = spec["rows"], spec["seq"]
    if spec["model"] == "smollm2":
        from moreau_pruner.data import calibration_batch, calibration_text
        from moreau_pruner.models import load_model

        model, tok = load_model(dtype=dtype, device=device)
        batch = calibration_batch(tok, calibration_text("pydoc"), n_samples=n, seq_len=seq, seed=0)
        desc = {"layers": model.config.num_hidden_layers, "vocab": model.config.vocab_size}
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = dict(LLAMA[spec["model"]])
        cfg["num_hidden_layers"] = spec["layers"]
        if spec.get("vocab"):
            cfg["vocab_size"] = spec["vocab"]
        cfg["max_position_embeddings"] = max(4096, seq)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
        model.eval()
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, cfg["vocab_size"], (n, seq), generator=gen)
        desc = {"layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"]}
    return model, batch.to(device), desc


def elementwise_bytes(model, iters: int, avg_last: int) -> dict:
    """Minimum bytes per step of the elementwise work (all parameters scored, as in the run)."""
    perturb = update = acc = 0
    for p in model.parameters():
        n, es = p.numel(), p.element_size()
        perturb += n * (2 * es + 4)
        update += n * (es + 8)
        acc += 8 * n
    K = min(avg_last, iters)
    return {"perturb": perturb, "update": update, "acc": acc,
            "per_step_mean": perturb + update + acc * K / iters}


def worker(spec: dict) -> dict:
    device = spec["device"]
    if device == "cpu":
        C.set_threads()
    import moreau_kernels as mk
    from moreau_pruner.estimator import MoreauConfig, forward_backward, moreau_estimate

    out: dict = {"spec": spec}
    model, batch, desc = build(spec, device)
    out.update(desc)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["tokens"] = int(batch.numel())
    out["rss_after_load"] = _mem_now(device)
    params = list(model.parameters())

    def fwd_bwd_once() -> float:
        C.sync(device)
        t0 = time.perf_counter()
        forward_backward(model, batch, spec.get("micro_batch"))
        C.sync(device)
        dt = time.perf_counter() - t0
        for p in params:
            p.grad = None
        return dt

    for p in params:
        p.requires_grad_(True)
    fwd_bwd_once()  # warm-up (allocator, kernels, thread pools)
    fb = [fwd_bwd_once() for _ in range(spec["fb_reps"])]

    path = spec["path"]
    cfg = MoreauConfig(iters=spec["iters"], avg_last=spec["avg_last"], seed=0,
                       noise="torch" if path == "pure" else "philox", micro_batch_size=spec.get("micro_batch"))
    base = _mem_now(device)
    reset_ok = _reset_peak(device)
    C.sync(device)
    t0 = time.perf_counter()
    if path == "pure":
        with mk.use_backend("reference"):
            res = moreau_estimate(model, batch, cfg, progress=False)
    elif path == "fused":
        res = moreau_estimate(model, batch, cfg, progress=False)
    else:
        from moreau_pruner.lean import moreau_estimate_lean

        res = moreau_estimate_lean(model, batch, cfg, progress=False)
    C.sync(device)
    total = time.perf_counter() - t0
    peak = _mem_peak(device)
    out.update(estimate_s=total, peak_bytes=peak, base_bytes=base, peak_reset=reset_ok,
               backend=res.backend, noise=cfg.noise, steps=[r["seconds"] for r in res.log],
               loss=[r["loss"] for r in res.log])
    del res
    for p in params:
        p.requires_grad_(True)
    _reset_peak(device)
    fb += [fwd_bwd_once() for _ in range(spec["fb_reps"])]
    out["fwd_bwd_peak_bytes"] = _mem_peak(device)
    out["fwd_bwd"] = fb
    out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["bytes"] = elementwise_bytes(model, spec["iters"], spec["avg_last"])
    return out


# ============================================================================ driver
def run_worker(spec: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        tmp = f.name
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            oom = "OutOfMemoryError" in proc.stderr or proc.returncode in (-9, 137)
            return {"spec": spec, "error": " | ".join(tail)[-500:] or f"exit {proc.returncode}", "oom": oom}
        return json.loads(Path(tmp).read_text())
    finally:
        os.unlink(tmp)


def lean_exists() -> bool:
    try:
        from moreau_pruner.lean import moreau_estimate_lean  # noqa: F401
        return True
    except ImportError:
        return False


def configs(args, device: str) -> list[dict]:
    """Model configurations: (model, layers, vocab, dtype, rows, seq)."""
    models = args.models.split(",")
    unknown = [m for m in models if m != "smollm2" and m not in LLAMA]
    if unknown:
        raise SystemExit(f"unknown --models {', '.join(unknown)}; choose from smollm2, {', '.join(LLAMA)}")
    out = []
    if args.token_shapes:
        try:
            shapes = [tuple(int(x) for x in s.split("x")) for s in args.token_shapes.split(",")]
            if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
                raise ValueError
        except ValueError:
            raise SystemExit(f"--token-shapes wants ROWSxSEQ[,ROWSxSEQ...], e.g. 10x64,8x1024; got {args.token_shapes!r}")
        dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
        for m in models:
            for rows, seq in shapes:
                if m == "smollm2":
                    out.append(dict(model=m, layers=30, vocab=None, dtype=dtype, rows=rows, seq=seq))
                else:
                    out.append(dict(model=m, layers=args.layers or (1 if device == "cpu" else 32),
                                    vocab=args.vocab or (8192 if device == "cpu" else None), dtype=dtype,
                                    rows=rows, seq=seq))
    elif device == "cpu":
        dtype = args.dtype or "fp32"
        for m in models:
            if m == "smollm2":
                out.append(dict(model=m, layers=30, vocab=None, dtype=dtype, rows=10, seq=64))
            else:  # 1 layer and a small vocab: fits in RAM and runs in about a minute
                out.append(dict(model=m, layers=args.layers or 1, vocab=args.vocab or 8192, dtype=dtype,
                                rows=args.rows_big or 10, seq=64))
    else:
        dtype = args.dtype or "bf16"
        for m in models:
            for rows, seq in ((10, 64), (8, 1024)):  # the published 640 tokens and 8192 tokens
                if m == "smollm2":
                    out.append(dict(model=m, layers=30, vocab=None, dtype=dtype, rows=rows, seq=seq))
                else:
                    out.append(dict(model=m, layers=args.layers or 32, vocab=args.vocab, dtype=dtype,
                                    rows=rows, seq=seq))
    return out


def label_of(c: dict) -> str:
    if c["model"] == "smollm2":
        return "smollm2-135m"
    v = f"-v{c['vocab']}" if c.get("vocab") else ""
    return f"{c['model']}-{c['layers']}L{v}"


def summarize(meta: C.Meta, r: dict, copy_bw: float) -> list[dict]:
    spec = r["spec"]
    label, dt, prov = label_of(spec), spec["dtype"], spec["path"]
    tokens = spec["rows"] * spec["seq"]
    common = dict(tokens=tokens, rows=spec["rows"], seq=spec["seq"], layers=spec["layers"],
                  iters=spec["iters"], avg_last=spec["avg_last"])
    if "error" in r:
        return [meta.record("estimate", prov, label, dt, "error", "", None, message=r["error"], **common)]
    steps = r["steps"]
    later = steps[1:] if len(steps) >= 3 else steps
    step = statistics.median(later)
    fb = statistics.median(r["fwd_bwd"])
    overhead = step - fb
    floor = r["bytes"]["per_step_mean"] / copy_bw
    common.update(params=r["params"], vocab=r["vocab"], layers=r["layers"], backend=r["backend"], noise=r["noise"],
                  peak_reset=r["peak_reset"])
    q20, _, q80 = C.quantiles(r["fwd_bwd"])
    recs = [
        ("fwd_bwd", "ms", fb * 1e3), ("fwd_bwd_q20", "ms", q20 * 1e3), ("fwd_bwd_q80", "ms", q80 * 1e3),
        ("step", "ms", step * 1e3), ("step_mean", "ms", statistics.mean(steps) * 1e3),
        ("overhead", "ms", overhead * 1e3), ("overhead_pct", "%", 100 * overhead / fb),
        ("estimate", "s", r["estimate_s"]),
        ("peak_mem", "MiB", r["peak_bytes"] / 2**20), ("base_mem", "MiB", r["base_bytes"] / 2**20),
        ("peak_above_base", "MiB", (r["peak_bytes"] - r["base_bytes"]) / 2**20),
        ("fwd_bwd_peak_mem", "MiB", r["fwd_bwd_peak_bytes"] / 2**20),
        ("elementwise_bytes_per_step", "MB", r["bytes"]["per_step_mean"] / 1e6),
        ("elementwise_floor", "ms", floor * 1e3), ("overhead_over_floor", "x", overhead / floor),
        ("loss_first", "", r["loss"][0]),
    ]
    if spec["device"] == "cpu":
        recs.append(("ru_maxrss", "MiB", r["ru_maxrss_bytes"] / 2**20))
    return [meta.record("estimate", prov, label, dt, m, u, v, **common) for m, u, v in recs]


def ratios(meta: C.Meta, records: list[dict]) -> list[dict]:
    """Per model: each path against the pure path (peak memory, overhead, estimate time)."""
    out = []
    key = lambda r: (r["shape"], r["dtype"], r["tokens"])  # noqa: E731
    vals = {}
    for r in records:
        if r["op"] == "estimate" and r["metric"] in ("peak_mem", "overhead", "estimate", "step"):
            vals[(key(r), r["provider"], r["metric"])] = r
    for (k, prov, metric), r in vals.items():
        base = vals.get((k, "pure", metric))
        if prov == "pure" or base is None or not r["value"]:
            continue
        name = {"peak_mem": "peak_mem_vs_pure", "overhead": "overhead_vs_pure", "estimate": "estimate_vs_pure",
                "step": "step_vs_pure"}[metric]
        out.append(meta.record("estimate", prov, r["shape"], r["dtype"], name, "x", r["value"] / base["value"],
                               tokens=r["tokens"], layers=r["layers"]))
    return out


def main(argv=None) -> Path:
    args = parse(argv)
    if args.worker:
        res = worker(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(res))
        return Path(args.worker_out)
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else \
        ("cpu" if args.device == "auto" else args.device)
    if device == "cpu":
        C.set_threads()
    meta = C.Meta(device)
    import moreau_kernels as mk

    avail = mk.availability()
    paths = [p for p in args.paths.split(",") if p in PATHS]
    notes = []
    if "lean" in paths and not lean_exists():
        paths.remove("lean")
        notes.append("lean path not run: moreau_pruner.lean.moreau_estimate_lean is not importable")
    copy_bytes = (256 if device == "cpu" else 1024) * 2**20
    bw = C.copy_bandwidth(device, copy_bytes)
    copy_bw = bw["best"]
    print(f"# {meta.base['device_name']} load {C.loadavg()} copy {copy_bw/1e9:.1f} GB/s; paths {paths}", flush=True)
    iters = args.iters or (4 if device == "cpu" else 10)
    avg_last = args.avg_last or (2 if device == "cpu" else 5)
    fb_reps = args.fb_reps or (2 if device == "cpu" else 5)
    records = [meta.record("copy", name, [copy_bytes // 4], "fp32", "gbps", "GB/s", bw[name]["bytes_per_s"] / 1e9)
               for name in ("clone", "copy_")]
    for cfg in configs(args, device):
        for path in paths:
            layers = cfg["layers"]
            while True:
                spec = dict(cfg, layers=layers, path=path, device=device, iters=iters, avg_last=avg_last,
                            fb_reps=fb_reps)
                t0 = time.perf_counter()
                r = run_worker(spec, args.timeout)
                # on a GPU out of memory: halve the layer count and say so (the record keeps it)
                if "error" in r and r.get("oom") and device == "cuda" and cfg["model"] != "smollm2" and layers > 1:
                    notes.append(f"{label_of(spec)} {path} {spec['rows']}x{spec['seq']}: out of memory; "
                                 f"retrying with {layers // 2} layers")
                    layers //= 2
                    continue
                break
            recs = summarize(meta, r, copy_bw)
            records += recs
            v = {x["metric"]: x["value"] for x in recs}
            if "error" in r:
                print(f"{label_of(spec):22s} {path:6s} ERROR {r['error']}", flush=True)
            else:
                print(f"{label_of(spec):22s} {path:6s} {spec['rows']}x{spec['seq']} fwd+bwd {v['fwd_bwd']:9.1f} ms  "
                      f"step {v['step']:9.1f} ms  overhead {v['overhead_pct']:6.1f}%  peak {v['peak_mem']:8.0f} MiB  "
                      f"floor {v['elementwise_floor']:.1f} ms  [{time.perf_counter()-t0:.0f} s, load "
                      f"{C.loadavg()[0]}] backend {r['backend']}", flush=True)
    records += ratios(meta, records)
    out_dir = Path(args.out) if args.out else C.RESULTS / C.device_name(device)
    if args.merge and (out_dir / "estimate.json").exists():  # keep the other models of an earlier run
        old = C.read_results(out_dir / "estimate.json")
        done = {r["shape"] for r in records if r["op"] == "estimate"}
        kept = [r for r in old["records"] if r["op"] == "estimate" and r["shape"] not in done]
        records += kept
        notes += [f"merged from an earlier run: {s} ({kept_r['date']}, commit {kept_r['commit']})"
                  for s, kept_r in {r["shape"]: r for r in kept}.items()]
    path = C.write_results(out_dir / "estimate.json", records, kind="estimate", device=device,
                           device_name=meta.base["device_name"], device_slug=C.device_name(device),
                           copy_bandwidth=bw, backends=avail, notes=notes, loadavg_end=C.loadavg(),
                           **{k: meta.base[k] for k in ("torch", "triton", "commit", "date")})
    print(f"# wrote {path}", flush=True)
    return path


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--models", default="smollm2,llama7b,llama3-8b")
    ap.add_argument("--paths", default="pure,fused,lean")
    ap.add_argument("--dtype", choices=tuple(C.DTYPES), help="weights (CPU default fp32, GPU bf16)")
    ap.add_argument("--layers", type=int, help="decoder layers of the LLaMA-shaped models (CPU 1, GPU 32)")
    ap.add_argument("--vocab", type=int, help="vocabulary of the LLaMA-shaped models (CPU 8192, GPU full)")
    ap.add_argument("--rows-big", type=int, help="CPU: calibration rows (of 64 tokens) for the LLaMA shapes")
    ap.add_argument("--token-shapes", help="calibration batches ROWSxSEQ, comma-separated, for every model "
                                           "(default: CPU 10x64; GPU 10x64,8x1024)")
    ap.add_argument("--iters", type=int, help="estimate steps T (CPU 4, GPU 10)")
    ap.add_argument("--avg-last", type=int, help="K (CPU 2, GPU 5)")
    ap.add_argument("--fb-reps", type=int, help="fwd+bwd timings before and after the estimate (CPU 2, GPU 5)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--out", help="output folder (default benchmarks/results/<device-name>)")
    ap.add_argument("--merge", action="store_true", help="keep the other models' records of an earlier estimate.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
