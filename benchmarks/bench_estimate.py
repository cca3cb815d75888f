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
* tracked peak live tensor bytes (:class:`moreau_pruner.estimate.memtrack.LiveTensorTracker`, weights
  counted as the baseline) of a short estimate (``--track-iters`` steps: the peak is reached in the
  first) and of a plain forward+backward, the memory floor (that forward+backward's tracked peak
  + δ + acc: weights, activations, estimator state and nothing else) and the memory plan of
  ``moreau_pruner.estimate.memory.plan_memory`` for the same configuration, so the plan is checked against a
  measurement;
* the bandwidth floor of the elementwise work: minimum bytes per step (perturb: read w and δ,
  write w̃; update: read g and δ, write δ; acc read+write on averaged steps) ÷ the copy bandwidth
  measured in the same run, and overhead ÷ floor.

Paths (strategies of ``moreau_pruner.estimate.estimate``): ``pure`` = the published loop:
``moreau_kernels.use_backend("reference")`` with the ``reference`` strategy and ``noise="torch"``
(noise drawn from the CPU torch generator, as the published code does); ``fused`` = the
``reference`` strategy on the auto-selected backend with Philox noise; ``lean`` = the ``lean``
strategy (auto backend); ``regen`` = the ``regen`` strategy (lean without perturbed copies of the
linear weights); ``published`` (memory only, ``--memory-only``) = the memory pattern of the published
code: weights perturbed in place, the noise of every parameter held until the weights are restored
by subtraction, every gradient in ``.grad``, pure-PyTorch updates.

    python benchmarks/bench_estimate.py                    # CPU: SmolLM2 + 1-layer LLaMA shapes
    python benchmarks/bench_estimate.py --models smollm2   # one model
    python benchmarks/bench_estimate.py                    # on a GPU: bf16, 640 and 8192 tokens
    python benchmarks/bench_estimate.py --models smollm2 --memory-only --paths published,pure,fused,lean,regen
                                                           # tracked peaks only, merged into estimate.json
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

from moreau_pruner.model.meta import SHAPES  # noqa: E402

LLAMA = {
    "llama7b": SHAPES["llama-7b"],
    "llama3-8b": SHAPES["llama-3-8b"],
    # a LLaMA-shaped toy for checking the benchmark itself (scripts/gpu_check.sh --dry-run, tests)
    "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}
PATHS = ("pure", "fused", "lean", "regen", "published")
MEMORY_ONLY_PATHS = ("published",)


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
        from moreau_pruner.model.loading import load_model

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


def run_path(path: str, model, batch, cfg):
    """One estimate on a benchmark path (the result, or None for ``published``)."""
    import moreau_kernels as mk
    from moreau_pruner.estimate import estimate

    if path == "pure":
        with mk.use_backend("reference"):
            return estimate(model, batch, cfg, "reference", progress=False)
    if path in ("fused", "lean", "regen"):
        return estimate(model, batch, cfg, "reference" if path == "fused" else path, progress=False)
    if path == "published":
        return published_loop(model, batch, cfg)
    raise ValueError(path)


@torch.no_grad()
def _published_update(p, d, a, cfg, accumulate):
    u = d - cfg.lr * p.grad.float()
    rows = u.reshape(u.shape[0], -1) if u.dim() >= 2 else u.reshape(-1, 1)
    r = torch.sqrt((rows * rows).mean(dim=1, keepdim=True))
    coeff = torch.where(r <= cfg.lr * cfg.soft, torch.zeros_like(r), 1.0 - cfg.soft / r)
    d.copy_((rows * coeff).reshape(d.shape))
    if accumulate:
        a.add_(d)


def published_loop(model, batch, cfg) -> None:
    """The memory pattern of the published estimate (reference mode, all parameters scored):
    noise drawn per parameter from the CPU generator, weights perturbed in place, the noise kept
    until they are restored by subtraction after the backward, every gradient in ``.grad``, the
    prox step in plain PyTorch. For memory measurement only: the weights drift by ulps (the
    caller restores them)."""
    from moreau_pruner.estimate.runner import forward_backward

    params = list(model.parameters())
    deltas = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    accs = [torch.zeros_like(d) for d in deltas]
    gen = torch.Generator().manual_seed(cfg.seed)
    K = min(cfg.avg_last, cfg.iters)
    model.eval()
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    for t in range(cfg.iters):
        noises = []
        with torch.no_grad():
            for p, d in zip(params, deltas):
                n = torch.randn(p.shape, generator=gen).to(p.device) * torch.abs(cfg.std * p)
                noises.append(n)
                p.add_(n + d)
        forward_backward(model, batch, cfg.micro_batch_size)
        with torch.no_grad():
            for p, d, n in zip(params, deltas, noises):
                p.sub_(n + d)
            del noises
            for p, d, a in zip(params, deltas, accs):
                _published_update(p, d, a, cfg, t >= cfg.iters - K)
                p.grad = None
    return None


def tracked(spec: dict, model, batch, out: dict) -> None:
    """Tracked live-tensor peaks of a plain forward+backward and of a short estimate, and the plan."""
    from moreau_pruner.estimate import MoreauConfig, plan_memory
    from moreau_pruner.estimate.runner import forward_backward
    from moreau_pruner.estimate.memtrack import LiveTensorTracker

    path = spec["path"]
    params = list(model.parameters())
    mbs = spec.get("micro_batch")
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    with LiveTensorTracker(baseline=model) as tr:
        forward_backward(model, batch, mbs)
    for p in params:
        p.grad = None
    out["tracked_fwd_bwd_peak"] = tr.peak_bytes
    it = spec.get("track_iters", 2)
    cfg = MoreauConfig(iters=it, avg_last=1, seed=0, noise="torch" if path in ("pure", "published") else "philox",
                       micro_batch_size=mbs)
    saved = [p.detach().clone() for p in params] if path == "published" else None
    t0 = time.perf_counter()
    with LiveTensorTracker(baseline=model) as tr:
        run_path(path, model, batch, cfg)
    out["tracked_seconds"] = time.perf_counter() - t0
    if saved is not None:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        del saved
    out["tracked_peak"] = tr.peak_bytes
    out["tracked_baseline"] = tr.baseline_bytes
    out["tracked_peak_op"] = tr.peak_op
    out["tracked_breakdown"] = dict(sorted(tr.peak_breakdown.items(), key=lambda kv: -kv[1])[:8])
    n = sum(p.numel() for p in params)
    out["state_bytes"] = 8 * n  # δ + acc, fp32, every parameter scored
    plan_path = {"pure": "reference", "fused": "reference", "lean": "lean", "regen": "regen",
                 "published": "published"}[path]
    plan = plan_memory(model, tuple(batch.shape), cfg, plan_path, spec["device"],
                       fused=None if path in ("fused", "lean", "regen") else False)
    out["plan_total"] = plan.total
    out["plan_lower"] = plan.lower_total
    out["plan_items"] = plan.items


def worker(spec: dict) -> dict:
    device = spec["device"]
    if device == "cpu":
        C.set_threads()
    from moreau_pruner.estimate import MoreauConfig
    from moreau_pruner.estimate.runner import forward_backward

    out: dict = {"spec": spec}
    model, batch, desc = build(spec, device)
    out.update(desc)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["tokens"] = int(batch.numel())
    out["rss_after_load"] = _mem_now(device)
    params = list(model.parameters())
    if spec.get("memory_only"):
        tracked(spec, model, batch, out)
        return out

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
    res = run_path(path, model, batch, cfg)
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
    if spec.get("track"):
        tracked(spec, model, batch, out)
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


TRACKED_METRICS = ("tracked_peak", "tracked_fwd_bwd_peak", "tracked_floor", "tracked_vs_floor", "plan_total",
                   "plan_lower", "plan_vs_tracked", "tracked_vs_pure")


def tracked_records(meta: C.Meta, r: dict, common: dict) -> list[dict]:
    """Records of the tracked peaks (MiB) and the plan, when the worker measured them."""
    if "tracked_peak" not in r:
        return []
    spec = r["spec"]
    label, dt, prov = label_of(spec), spec["dtype"], spec["path"]
    floor = r["tracked_fwd_bwd_peak"] + r["state_bytes"]
    common = dict(common, track_iters=spec.get("track_iters", 2))
    recs = [("tracked_fwd_bwd_peak", "MiB", r["tracked_fwd_bwd_peak"] / 2**20, {}),
            ("tracked_peak", "MiB", r["tracked_peak"] / 2**20,
             dict(peak_op=r["tracked_peak_op"], baseline_mib=r["tracked_baseline"] / 2**20,
                  breakdown_mib={k: round(v / 2**20, 1) for k, v in r["tracked_breakdown"].items()})),
            ("tracked_floor", "MiB", floor / 2**20, {}),
            ("tracked_vs_floor", "x", r["tracked_peak"] / floor, {}),
            ("plan_total", "MiB", r["plan_total"] / 2**20,
             dict(plan_items_mib={k: round(v / 2**20, 1) for k, v in r["plan_items"].items()})),
            ("plan_lower", "MiB", r["plan_lower"] / 2**20, {}),
            ("plan_vs_tracked", "x", r["plan_total"] / r["tracked_peak"], {})]
    return [meta.record("estimate", prov, label, dt, m, u, v, **common, **extra) for m, u, v, extra in recs]


def summarize(meta: C.Meta, r: dict, copy_bw: float) -> list[dict]:
    spec = r["spec"]
    label, dt, prov = label_of(spec), spec["dtype"], spec["path"]
    tokens = spec["rows"] * spec["seq"]
    common = dict(tokens=tokens, rows=spec["rows"], seq=spec["seq"], layers=spec["layers"],
                  iters=spec["iters"], avg_last=spec["avg_last"])
    if "error" in r:
        return [meta.record("estimate", prov, label, dt, "error", "", None, message=r["error"], **common)]
    if spec.get("memory_only"):
        return tracked_records(meta, r, dict(common, params=r["params"], vocab=r["vocab"]))
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
    return [meta.record("estimate", prov, label, dt, m, u, v, **common) for m, u, v in recs] + \
        tracked_records(meta, r, common)


def ratios(meta: C.Meta, records: list[dict]) -> list[dict]:
    """Per model: each path against the pure path (peak memory, overhead, estimate time)."""
    out = []
    key = lambda r: (r["shape"], r["dtype"], r["tokens"])  # noqa: E731
    vals = {}
    for r in records:
        if r["op"] == "estimate" and r["metric"] in ("peak_mem", "overhead", "estimate", "step", "tracked_peak"):
            vals[(key(r), r["provider"], r["metric"])] = r
    for (k, prov, metric), r in vals.items():
        base = vals.get((k, "pure", metric))
        if prov == "pure" or base is None or not r["value"]:
            continue
        name = {"peak_mem": "peak_mem_vs_pure", "overhead": "overhead_vs_pure", "estimate": "estimate_vs_pure",
                "step": "step_vs_pure", "tracked_peak": "tracked_vs_pure"}[metric]
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
    if not args.memory_only and any(p in MEMORY_ONLY_PATHS for p in paths):
        notes.append(f"paths {[p for p in paths if p in MEMORY_ONLY_PATHS]} are measured with --memory-only only")
        paths = [p for p in paths if p not in MEMORY_ONLY_PATHS]
    copy_bytes = (256 if device == "cpu" else 1024) * 2**20
    out_dir = Path(args.out) if args.out else C.RESULTS / C.device_name(device)
    old = C.read_results(out_dir / "estimate.json") if (out_dir / "estimate.json").exists() else None
    if args.memory_only and old is not None and old.get("copy_bandwidth"):
        bw = old["copy_bandwidth"]  # the timing records kept from that run were computed against it
    else:
        bw = C.copy_bandwidth(device, copy_bytes)
    copy_bw = bw["best"]
    print(f"# {meta.base['device_name']} load {C.loadavg()} copy {copy_bw/1e9:.1f} GB/s; paths {paths}", flush=True)
    iters = args.iters or (4 if device == "cpu" else 10)
    avg_last = args.avg_last or (2 if device == "cpu" else 5)
    fb_reps = args.fb_reps or (2 if device == "cpu" else 5)
    records = [] if args.memory_only else [
        meta.record("copy", name, [copy_bytes // 4], "fp32", "gbps", "GB/s", bw[name]["bytes_per_s"] / 1e9)
        for name in ("clone", "copy_")]
    for cfg in configs(args, device):
        for path in paths:
            layers = cfg["layers"]
            while True:
                spec = dict(cfg, layers=layers, path=path, device=device, iters=iters, avg_last=avg_last,
                            fb_reps=fb_reps, track=args.track, track_iters=args.track_iters,
                            memory_only=args.memory_only)
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
            elif args.memory_only:
                print(f"{label_of(spec):22s} {path:9s} {spec['rows']}x{spec['seq']} tracked peak "
                      f"{v['tracked_peak']:8.0f} MiB = {v['tracked_vs_floor']:.3f} x floor {v['tracked_floor']:.0f} MiB; "
                      f"plan {v['plan_total']:.0f} MiB ({v['plan_vs_tracked']:.3f} x)  [{time.perf_counter()-t0:.0f} s, "
                      f"load {C.loadavg()[0]}]", flush=True)
            else:
                print(f"{label_of(spec):22s} {path:6s} {spec['rows']}x{spec['seq']} fwd+bwd {v['fwd_bwd']:9.1f} ms  "
                      f"step {v['step']:9.1f} ms  overhead {v['overhead_pct']:6.1f}%  peak {v['peak_mem']:8.0f} MiB  "
                      f"floor {v['elementwise_floor']:.1f} ms  [{time.perf_counter()-t0:.0f} s, load "
                      f"{C.loadavg()[0]}] backend {r['backend']}", flush=True)
    records += ratios(meta, records)
    if args.memory_only and old is not None:  # replace only the memory records
        done = {(r["shape"], r["provider"]) for r in records if r["op"] == "estimate"}
        kept = [r for r in old["records"] if not (r["op"] == "estimate" and r["metric"] in TRACKED_METRICS
                                                 and (r["shape"], r["provider"]) in done)]
        records += kept
        notes += old.get("notes", []) + [f"tracked memory records of {sorted(done)} from a --memory-only run "
                                         f"({meta.base['date']}); the other records from {old.get('date')}"]
    elif args.merge and old is not None:  # keep the other models of an earlier run
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
    ap.add_argument("--memory-only", action="store_true",
                    help="only the tracked live-tensor peaks and the plan (no timing); replaces those records "
                         "in an existing estimate.json and keeps the rest")
    ap.add_argument("--no-track", dest="track", action="store_false",
                    help="skip the tracked-memory measurement after the timed runs")
    ap.add_argument("--track-iters", type=int, default=2, help="steps of the tracked estimate (default 2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
