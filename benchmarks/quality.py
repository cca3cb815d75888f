#!/usr/bin/env python
"""Pruning quality and precision robustness (BENCHMARKS.md §3): calibration → importance →
pruning → perplexity, one JSON record per cell.

Usage (the full SmolLM2 run documented in ``benchmarks/results/QUALITY.md``)::

    python benchmarks/quality.py                       # embedded SmolLM2-135M, CPU
    python benchmarks/render_quality.py                # -> benchmarks/results/QUALITY.md + PNGs

A *cell* is (model, method, mode, ratio, seed, precision) plus the settings that change its
result (granularity, layer ranges, calibration size, Moreau steps, evaluation windows). Each
finished cell is appended as one full JSON line to
``benchmarks/results/quality/<model-tag>/records.jsonl`` (a single ``write`` of one line,
flushed and fsynced), so an interrupted run loses at most the cell in progress, and a rerun
skips every cell whose key is already there.

Choices (documented here and in the report):

* **Seeds.** Seed ``s`` drives both the calibration batch (``calibration_batch(seed=s)``, a
  different draw of windows from the calibration text) and the method's own randomness (the
  Moreau noise seed, the random scores). Taylor therefore also varies with the seed (through
  the batch). Magnitude depends on neither, so it is run with the first seed only.
* **Scores once per (method, mode, seed, precision).** Importance does not depend on the ratio;
  the scores are computed once for the layers in the PruneConfig's ranges (the same ranges for
  every ratio) and a deep copy of the dense fp32 model is pruned at each ratio.
* **Precision.** ``precision`` is the dtype of the model's *weights while the importance is
  computed* (the forward/backward and the Moreau perturbations run in that dtype; δ and the
  accumulator stay fp32). The pruned model is always the fp32 dense model pruned with that
  mask and evaluated in fp32, so PPL differences between precisions reflect the mask only.
  fp16 on a CPU: PyTorch has no fast CPU fp16 GEMM (one SmolLM2 forward+backward took 403 s
  against 21 s in fp32), so by default (``--half-gemm auto``) the fp16 matrix products run as
  fp32-accumulated products of the fp16 operands rounded to fp16
  (:func:`moreau_pruner.model.precision.fp32_accumulate_gemms`), what a GPU tensor-core GEMM computes;
  everything else runs in fp16. Each record says which (``half_gemm``).
* **Granularity.** The default is ``query-heads``: SmolLM2-135M has 3 KV heads, and the
  ``kv-group`` rule removes no attention unit at ratio 0.2 there; ``--granularity kv-group``
  is kept as an option.
* **Equal size.** ``--target-params N`` replaces the ratios of the structured grid by a parameter
  count: each cell is pruned at the smallest ratio that leaves at most N parameters
  (:func:`moreau_pruner.prune.plan.ratio_for_params`), so layer ranges, scopes and granularities are
  compared at the same model size. Local scope: one ratio per setting; global scope: solved from
  each scoring group's scores. The record keeps the solved ``ratio`` and ``target_params``; the
  key has ``pN`` where a ratio would be.
* **Scores cache.** ``--scores-cache DIR`` scores every layer (a unit's score does not depend on
  which other layers are scored: the Moreau noise perturbs all weights either way, and the
  accumulators only decide what is kept) and stores the scores of each (method, seed, precision,
  calibration, steps, granularity) in DIR, so runs over other layer ranges or scopes reuse them.
* **Rounds.** ``--rounds K`` prunes iteratively (``prune_model(rounds=K)``): K scoring rounds on
  the partly pruned model, no scores shared between ratios or methods; the key gains ``kK``.
* **Kept units.** Each record stores the kept query heads (original indices, per pruned
  layer) and kept MLP channels (per pruned layer), so the renderer can compute IoUs.

``--model tiny-random`` builds a tiny random-init Llama with a byte-level "tokenizer" (ids =
UTF-8 bytes), used by the tests; it runs end to end in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moreau_pruner import (MoreauConfig, PruneConfig, compute_scores, discover, prune_model, prune_structure,
                           resolve_target)
from moreau_pruner.score.importance import LayerScores
from moreau_pruner.prune.plan import ratio_for_params
from moreau_pruner.prune.allocation import allocate_structured
from moreau_pruner.estimate import estimate, gradient
from moreau_pruner.unstructured.prune import prunable_linears, unstructured_prune
from moreau_pruner import data as mp_data
from moreau_pruner.evaluate.perplexity import evaluate_perplexity
from moreau_pruner.model.precision import fp32_accumulate_gemms, slow_half_gemm

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "quality"
SCHEMA_VERSION = 1

@dataclass(frozen=True)
class Method:
    """How a method of the grid is computed."""
    lib: str                       # library method: moreau, taylor, magnitude, random (structured);
                                   # moreau, magnitude, wanda, gblm (unstructured)
    mode: str | None = None        # Moreau mode
    variant: str = "param_first"   # LLM-Pruner Taylor variant
    allocation: str = "uniform"    # per-layer ratios (structured)
    unstructured: bool = False
    trim: bool = False             # unstructured: TRIM's per-row ratios (moreau_pruner.unstructured.trim); no N:M cells

    @property
    def scores_key(self):
        """Methods sharing this key share the same unit scores (only the allocation differs)."""
        return (self.lib, self.mode, self.variant)


#: CLI method name -> Method. Structured methods remove heads and channels at ratio r; the
#: ``us-*`` methods zero single weights (sparsity r per output row, or N:M) in every decoder layer.
METHODS = {
    "moreau-reference": Method("moreau", "reference"),
    "moreau-paper": Method("moreau", "paper"),
    "taylor": Method("taylor"),
    "magnitude": Method("magnitude"),
    "random": Method("random"),
    "taylor-second": Method("taylor", variant="param_second"),
    "taylor-mix": Method("taylor", variant="param_mix"),
    "taylor-vector": Method("taylor", variant="vectorize"),
    "moreau-paper+owl": Method("moreau", "paper", allocation="owl"),
    "moreau-paper+alpha": Method("moreau", "paper", allocation="alpha"),
    "moreau-paper+farms": Method("moreau", "paper", allocation="farms"),
    "us-moreau-reference": Method("moreau", "reference", unstructured=True),
    "us-moreau-paper": Method("moreau", "paper", unstructured=True),
    "us-taylor": Method("taylor", unstructured=True),
    "us-wanda": Method("wanda", unstructured=True),
    "us-gblm": Method("gblm", unstructured=True),
    "us-magnitude": Method("magnitude", unstructured=True),
    "us-wanda+trim": Method("wanda", unstructured=True, trim=True),
    "us-gblm+trim": Method("gblm", unstructured=True, trim=True),
    "us-moreau-paper+trim": Method("moreau", "paper", unstructured=True, trim=True),
}
STRUCTURED = [m for m, spec in METHODS.items() if not spec.unstructured]
UNSTRUCTURED = [m for m, spec in METHODS.items() if spec.unstructured]
SEED_FREE = {"magnitude", "us-magnitude"}  # methods depending on neither the batch nor a seed
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECORD_FIELDS = ("schema", "key", "model", "method", "mode", "ratio", "seed", "precision", "granularity",
                 "scope", "attn_layers", "mlp_layers", "calib", "moreau_iters", "eval", "params_before",
                 "params_after", "params_kept_fraction", "ppl_128", "ppl_1024", "kept", "time", "machine",
                 "git_commit", "date", "half_gemm", "nm", "allocation", "unstructured",
                 "taylor_variant", "target_params", "rounds")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: torch.nn.Module
    tokenize: callable  # str -> 1-D LongTensor
    tag: str
    name: str


def tiny_random_model(seed: int = 0, num_layers: int = 4, vocab: int = 256):
    """A tiny random-init Llama (GQA: 4 query heads over 2 KV heads) and a byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()

    def tokenize(text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab

    return model, tokenize


def load(spec: str | None, device: str) -> Loaded:
    if spec == "tiny-random":
        model, tok = tiny_random_model()
        return Loaded(model.to(device), tok, "tiny-random", "tiny-random Llama (4 layers, hidden 32)")
    from moreau_pruner.model.loading import load_model

    model, tokenizer = load_model(spec, dtype="float32", device=device)
    if spec is None:
        tag, name = "smollm2-135m", "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantised to fp32)"
    else:
        p = Path(spec)
        tag = (p.stem if p.is_file() else p.name).lower().replace(" ", "-")
        name = str(p)
    return Loaded(model, lambda text: mp_data.tokenize_text(tokenizer, text), tag, name)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def cell_key(model_tag, method, ratio, seed, precision, settings: dict) -> str:
    """Identity of a cell: everything that changes its numbers."""
    s = settings
    return "|".join(str(x) for x in (
        model_tag, method, ratio_tag(ratio), f"s{seed}", precision, s["granularity"], s["scope"],
        f"a{s['attn_layers']}", f"m{s['mlp_layers']}", f"cal{s['n_samples']}x{s['seq_len']}:{s['calib']}",
        f"it{s['iters']}", f"ev{s['windows_128']}x128+{s['windows_long']}x{s['long_seq_len']}:{s['heldout']}")
        + ((f"k{s['rounds']}",) if s.get("rounds", 1) > 1 else ()))


def ratio_tag(ratio) -> str:
    """``r0.2`` for a ratio, ``nm2:4`` for N:M sparsity (given as the string "2:4"), ``p121741632`` for
    a parameter target (given as that string), ``dense`` for 0."""
    if parse_target(ratio) is not None:
        return ratio
    if isinstance(ratio, str):
        return f"nm{ratio}"
    return f"r{ratio:g}" if ratio else "dense"


def parse_target(ratio) -> int | None:
    """The parameter count of a ``--target-params`` grid entry ("p<N>"), else None."""
    if isinstance(ratio, str) and ratio.startswith("p"):
        return int(ratio[1:])
    return None


def parse_nm(ratio) -> tuple[int, int] | None:
    if not isinstance(ratio, str) or parse_target(ratio) is not None:
        return None
    n, m = ratio.split(":")
    return int(n), int(m)


def read_records(path: Path) -> list[dict]:
    """All complete records (a torn last line from a killed run is ignored)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(path: Path, record: dict) -> None:
    """Append one full line with a single write (O_APPEND), then fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # a torn line left by a killed run must not swallow this record
        if os.fstat(fd).st_size and not path.read_bytes().endswith(b"\n"):
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return ""


def machine_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def host_details() -> dict:
    """CPU model, visible cores and load average (timings on a shared machine need the context)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    return {"cpu_model": model or platform.machine(), "cpu_count": os.cpu_count(), "load_avg": load}


# ---------------------------------------------------------------------------------------------
# One scoring group: scores once, prune + evaluate at every ratio
# ---------------------------------------------------------------------------------------------
def kept_units(report, dense_structure) -> dict:
    """Kept query heads and MLP channels per pruned layer, original indices (for IoU), read from
    the PruneReport of the pruning that was applied."""
    heads, channels = {}, {}
    for layer in report.layers:
        i = layer["layer"]
        n_rep = dense_structure.layers[i].n_rep
        if layer["kept_kv_groups"] is not None:
            heads[str(i)] = [g * n_rep + j for g in layer["kept_kv_groups"] for j in range(n_rep)]
        elif layer["kept_query_heads"] is not None:
            heads[str(i)] = [g * n_rep + j for g, keep in enumerate(layer["kept_query_heads"]) for j in keep]
        if layer["kept_channels"] is not None:
            channels[str(i)] = list(layer["kept_channels"])
    return {"heads": heads, "channels": channels}


def evaluate(model, ids, windows_128, windows_long, long_seq_len, batch_size=4) -> tuple[float, float | None, float]:
    t0 = time.perf_counter()
    p128 = evaluate_perplexity(model, None, ids, seq_len=128, max_windows=windows_128, progress=False,
                               batch_size=batch_size).ppl
    plong = None
    if windows_long:
        plong = evaluate_perplexity(model, None, ids, seq_len=long_seq_len, max_windows=windows_long,
                                    progress=False, batch_size=1).ppl
    return p128, plong, time.perf_counter() - t0


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out_root = Path(args.out)
    t_load = time.perf_counter()
    loaded = load(args.model, args.device)
    tag = args.tag or loaded.tag
    rec_path = out_root / tag / "records.jsonl"
    dense = loaded.model
    structure0 = discover(dense)
    n_layers = structure0.num_layers
    log(f"loaded {loaded.name} ({n_layers} layers) in {time.perf_counter() - t_load:.1f} s -> {rec_path}")

    calib_ids = loaded.tokenize(mp_data.calibration_text(args.calib))
    held_ids = loaded.tokenize(mp_data.heldout_text(args.heldout))
    base_cfg = PruneConfig(ratio=0.5, attn_layers=args.attn_layers, mlp_layers=args.mlp_layers, scope=args.scope,
                           granularity=args.granularity, round_to=args.round_to)
    a_rng, m_rng = base_cfg.layer_ranges(n_layers)
    settings = dict(granularity=args.granularity, scope=args.scope, attn_layers=f"{a_rng.start}:{a_rng.stop}",
                    mlp_layers=f"{m_rng.start}:{m_rng.stop}", n_samples=args.n_samples, seq_len=args.seq_len,
                    calib=args.calib, heldout=args.heldout, iters=args.iters, windows_128=args.windows_128,
                    windows_long=args.windows_long, long_seq_len=args.long_seq_len, rounds=args.rounds)

    existing = read_records(rec_path)
    done = {r["key"] for r in existing}
    common = dict(schema=SCHEMA_VERSION, model=tag, rounds=args.rounds,
                  granularity=args.granularity, scope=args.scope,
                  attn_layers=settings["attn_layers"], mlp_layers=settings["mlp_layers"],
                  calib={"corpus": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len},
                  eval={"corpus": args.heldout, "windows_128": args.windows_128, "windows_long": args.windows_long,
                        "long_seq_len": args.long_seq_len, "heldout_tokens": int(held_ids.numel())},
                  machine=machine_description(args.device), git_commit=_git_commit(),
                  torch=torch.__version__)
    written = []
    t_start = time.perf_counter()

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    def write(rec):
        rec = {**common, **rec, "host": host_details(),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        append_record(rec_path, rec)
        done.add(rec["key"])
        written.append(rec)
        p1024 = rec["ppl_1024"]
        log(f"  {rec['method']:17s} r={rec['ratio']!s:<4} s={rec['seed']} {rec['precision']}: "
            f"ppl_128={rec['ppl_128']:.3f} ppl_{args.long_seq_len}={'-' if p1024 is None else f'{p1024:.3f}'} "
            f"kept={rec['params_kept_fraction']:.3f} ({rec['time']['total_s']:.1f} s)")

    # dense reference
    key = cell_key(tag, "dense", 0, None, "fp32", {**settings, "rounds": 1})
    # the dense model's perplexity depends on the evaluation only: one under other pruning settings will do
    same_eval = any(r["method"] == "dense" and r.get("eval") == common["eval"] for r in existing)
    if key not in done and not same_eval and not args.dry_run:
        p128, plong, ev = evaluate(dense, held_ids, args.windows_128, args.windows_long, args.long_seq_len)
        n = sum(p.numel() for p in dense.parameters())
        write(dict(key=key, method="dense", mode=None, ratio=0.0, seed=None, precision="fp32", moreau_iters=None,
                   params_before=n, params_after=n, params_kept_fraction=1.0, ppl_128=p128, ppl_1024=plong,
                   kept=None, half_gemm=None, nm=None, allocation=None, unstructured=None, taylor_variant=None,
                   target_params=None, rounds=None,
                   time={"importance_s": 0.0, "prune_s": 0.0, "eval_s": ev, "total_s": ev}))

    groups = plan_groups(args)
    if not args.dry_run:
        update_plan(out_root / tag / "plan.json", groups, args, argv_used=getattr(args, "argv", None))
    todo = []
    for method, seed, precision in groups:
        keys = {r: cell_key(tag, method, r, seed, precision, settings) for r in ratios_for(args, method, precision)}
        missing = [r for r, k in keys.items() if k not in done]
        if missing:
            todo.append((method, seed, precision, missing, keys))
    log(f"{len(todo)} scoring groups to run, {sum(len(t[3]) for t in todo)} cells"
        f" ({len(done)} records already in {rec_path.name})")
    if args.dry_run:
        for method, seed, precision, missing, _ in todo:
            log(f"  would run {method} seed={seed} {precision} ratios={missing}")
        return []

    cache: dict = {}  # scores_key + (seed, precision) -> (scores, importance seconds); one seed at a time
    for method, seed, precision, missing, keys in todo:
        if over_budget():
            log(f"budget of {args.budget_s:.0f} s spent: stopping before {method} seed={seed} {precision}")
            break
        spec = METHODS[method]
        batch = mp_data.calibration_batch(None, calib_ids, n_samples=args.n_samples, seq_len=args.seq_len,
                                          seed=seed).to(args.device)
        ctx = dict(args=args, dense=dense, structure0=structure0, settings=settings, batch=batch, write=write,
                   keys=keys, seed=seed, precision=precision, held_ids=held_ids)
        if spec.unstructured:
            run_unstructured(method, spec, missing, **ctx)
        else:
            cache = {k: v for k, v in cache.items() if k[-2] == seed}
            run_structured(method, spec, missing, cache=cache, **ctx)
    return written


def moreau_config(args, spec: Method, seed: int) -> MoreauConfig | None:
    return MoreauConfig(mode=spec.mode, seed=seed, iters=args.iters, avg_last=min(5, args.iters)) \
        if spec.lib == "moreau" else None


def prune_config(args, settings, ratio, layer_ratios=None) -> PruneConfig:
    return PruneConfig(ratio=ratio, attn_layers=settings["attn_layers"], mlp_layers=settings["mlp_layers"],
                       scope=args.scope, granularity=args.granularity, round_to=args.round_to,
                       layer_ratios=layer_ratios)


def run_structured(method, spec, missing, *, args, dense, structure0, settings, batch, write, keys, seed, precision,
                   held_ids, cache):
    """Scores once per (method's scores, seed, precision), shared by the ratios and by the methods
    that only differ by their allocation; a deep copy of the dense fp32 model is pruned per ratio.
    With ``--rounds`` K > 1 every ratio is pruned by ``prune_model`` (K scorings of its own)."""
    if args.rounds > 1:
        return run_rounds(method, spec, missing, args=args, dense=dense, structure0=structure0, settings=settings,
                          batch=batch, write=write, keys=keys, seed=seed, precision=precision, held_ids=held_ids)
    ckey = spec.scores_key + (seed, precision)
    half_gemm = half_gemm_mode(args, precision)
    disk = scores_cache_path(args, spec, seed, precision)
    if ckey not in cache and disk is not None and disk.is_file():
        saved = torch.load(disk)
        cache[ckey] = ([LayerScores(*x) for x in saved["scores"]], saved["importance_s"])
    if ckey in cache:
        scores, imp_s = cache[ckey]
        log(f"{method} seed={seed} {precision}: scores shared with an earlier method or run ({imp_s:.1f} s)")
    else:
        scoring_model = dense if precision == "fp32" else copy.deepcopy(dense).to(PRECISIONS[precision])
        t0 = time.perf_counter()
        with (fp32_accumulate_gemms((PRECISIONS[precision],)) if half_gemm == "fp32-accumulate"
              else contextlib.nullcontext()):
            score_cfg = prune_config(args, settings, 0.5)
            if disk is not None:  # every layer, so that any range can reuse them
                score_cfg = replace(score_cfg, attn_layers=(0, structure0.num_layers),
                                    mlp_layers=(0, structure0.num_layers))
            scores, _, _ = compute_scores(scoring_model, batch, spec.lib, score_cfg,
                                          moreau=moreau_config(args, spec, seed), seed=seed, progress=False,
                                          taylor_variant=spec.variant)
        imp_s = time.perf_counter() - t0
        if scoring_model is not dense:
            del scoring_model
        scores = [type(s)(s.layer, None if s.attention is None else s.attention.float().cpu(),
                          None if s.mlp is None else s.mlp.float().cpu()) for s in scores]
        cache[ckey] = (scores, imp_s)
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(".tmp")
            torch.save({"scores": [(x.layer, x.attention, x.mlp) for x in scores], "importance_s": imp_s}, tmp)
            os.replace(tmp, disk)
        log(f"{method} seed={seed} {precision}: importance {imp_s:.1f} s")
    for grid_ratio in missing:
        t1 = time.perf_counter()
        ratio, target = solved_ratio(args, settings, structure0, grid_ratio, scores)
        alloc = None
        if spec.allocation != "uniform":
            alloc = allocate_structured(dense, resolve_target(structure0, prune_config(args, settings, ratio)),
                                        spec.allocation, batch)
        cfg = prune_config(args, settings, ratio, alloc.ratios if alloc else None)
        pruned = copy.deepcopy(dense)
        report = prune_structure(discover(pruned), scores, cfg)
        kept = kept_units(report, structure0)
        prune_s = time.perf_counter() - t1
        p128, plong, ev = evaluate(pruned, held_ids, args.windows_128, args.windows_long, args.long_seq_len)
        del pruned
        write(dict(key=keys[grid_ratio], method=method, mode=spec.mode, ratio=ratio, seed=seed, precision=precision,
                   moreau_iters=args.iters if spec.lib == "moreau" else None, target_params=target,
                   params_before=report.params_before, params_after=report.params_after,
                   params_kept_fraction=report.params_after / report.params_before, ppl_128=p128,
                   ppl_1024=plong, kept=kept, half_gemm=half_gemm, nm=None, unstructured=None,
                   taylor_variant=spec.variant if spec.lib == "taylor" else None,
                   allocation=None if alloc is None else {"method": alloc.method,
                                                          "matched": alloc.params.get("matched"), "ratios": {
                       str(k): v for k, v in alloc.ratios.items()}},
                   time={"importance_s": imp_s, "importance_shared_by_ratios": len(missing),
                         "prune_s": prune_s, "eval_s": ev, "total_s": prune_s + ev}))


def scores_cache_path(args, spec: Method, seed: int, precision: str) -> Path | None:
    """Where ``--scores-cache`` keeps one scoring group's scores (None without the option)."""
    if not args.scores_cache:
        return None
    name = "_".join(str(x) for x in (*spec.scores_key, f"s{seed}", precision, args.granularity,
                                     f"cal{args.n_samples}x{args.seq_len}-{args.calib}", f"it{args.iters}",
                                     args.model or "embedded"))
    return Path(args.scores_cache) / (name.replace("/", "-").replace(" ", "-") + ".pt")


def solved_ratio(args, settings, structure0, grid_ratio, scores=None) -> tuple[float, int | None]:
    """(ratio, target parameters): a grid ratio as it is, or the ratio that reaches a ``--target-params``
    entry (global scope: for these scores)."""
    target = parse_target(grid_ratio)
    if target is None:
        return grid_ratio, None
    cfg = prune_config(args, settings, 0.5)
    return ratio_for_params(structure0, target, cfg, scores if cfg.scope == "global" else None), target


def run_rounds(method, spec, missing, *, args, dense, structure0, settings, batch, write, keys, seed, precision,
               held_ids):
    """Iterative pruning: ``prune_model(rounds=K)`` on a deep copy of the dense model per ratio (each
    round re-scores the partly pruned copy, so nothing is shared between ratios)."""
    half_gemm = half_gemm_mode(args, precision)
    for grid_ratio in missing:
        ratio, target = solved_ratio(args, settings, structure0, grid_ratio)
        pruned = copy.deepcopy(dense)
        t0 = time.perf_counter()
        res = prune_model(pruned, batch, spec.lib, prune_config(args, settings, ratio), moreau=moreau_config(args, spec, seed),
                          seed=seed, progress=False, allocation=spec.allocation, rounds=args.rounds,
                          taylor_variant=spec.variant)
        total_s = time.perf_counter() - t0
        report = res.report
        kept = kept_units(report, structure0)
        p128, plong, ev = evaluate(pruned, held_ids, args.windows_128, args.windows_long, args.long_seq_len)
        del pruned
        log(f"{method} seed={seed} {args.rounds} rounds: {total_s:.1f} s")
        write(dict(key=keys[grid_ratio], method=method, mode=spec.mode, ratio=ratio, seed=seed, precision=precision,
                   moreau_iters=args.iters if spec.lib == "moreau" else None, target_params=target,
                   params_before=report.params_before, params_after=report.params_after,
                   params_kept_fraction=report.params_after / report.params_before, ppl_128=p128,
                   ppl_1024=plong, kept=kept, half_gemm=half_gemm, nm=None, unstructured=None,
                   taylor_variant=spec.variant if spec.lib == "taylor" else None, allocation=res.allocation,
                   time={"importance_s": total_s - res.timings.get("prune_s", 0.0), "importance_shared_by_ratios": 1,
                         "prune_s": res.timings.get("prune_s", 0.0), "eval_s": ev,
                         "total_s": total_s + ev}))


def run_unstructured(method, spec, missing, *, args, dense, structure0, settings, batch, write, keys, seed,
                     precision, held_ids):
    """Moreau's Ĝ (and Taylor's gradient) is computed once per seed and shared by the sparsities; Wanda
    and GBLM run their layer-by-layer loop per sparsity (the pruned earlier layers change the later
    layers' inputs)."""
    grads, imp_s = None, 0.0
    if spec.lib in ("moreau", "taylor"):
        names = [n for n, _, _ in prunable_linears(dense, structure=structure0)]
        t0 = time.perf_counter()
        if spec.lib == "moreau":
            grads = estimate(dense, batch, moreau_config(args, spec, seed), "reference", score=names, progress=False,
                             structure=structure0).grads
        else:
            grads = gradient(dense, batch, names)
        imp_s = time.perf_counter() - t0
        log(f"{method} seed={seed}: {'Moreau estimate' if spec.lib == 'moreau' else 'gradient'} {imp_s:.1f} s")
    for ratio in missing:
        t1 = time.perf_counter()
        pruned = copy.deepcopy(dense)
        nm = parse_nm(ratio)
        rep = unstructured_prune(pruned, batch, spec.lib, sparsity=0.5 if nm else ratio, nm=nm, seed=seed,
                                 progress=False, grads=grads, trim=spec.trim)
        prune_s = time.perf_counter() - t1
        p128, plong, ev = evaluate(pruned, held_ids, args.windows_128, args.windows_long, args.long_seq_len)
        n = sum(p.numel() for p in pruned.parameters())
        del pruned
        write(dict(key=keys[ratio], method=method, mode=spec.mode, ratio=ratio, seed=seed, precision=precision,
                   moreau_iters=args.iters if spec.lib == "moreau" else None,
                   params_before=n, params_after=n, params_kept_fraction=1.0 - rep["model_zero_fraction"],
                   ppl_128=p128, ppl_1024=plong, kept=None, half_gemm=None, nm=ratio if nm else None,
                   allocation=None, taylor_variant=None, target_params=None,
                   unstructured={"sparsity": rep["overall"]["sparsity"], "zeros": rep["overall"]["zeros"],
                                 "numel": rep["overall"]["numel"], "model_zero_fraction": rep["model_zero_fraction"],
                                 "sequential": rep.get("sequential"),
                                 **({"trim": rep["trim_summary"]} if spec.trim else {})},
                   time={"importance_s": imp_s + rep["timings"].get("statistics_s", 0.0)
                         + rep["timings"].get("activations_s", 0.0),
                         "importance_shared_by_ratios": len(missing) if grads is not None else 1,
                         "prune_s": prune_s, "eval_s": ev, "total_s": prune_s + ev}))


def half_gemm_mode(args, precision: str) -> str | None:
    """How the half-precision matrix products of the importance computation run: None (fp32),
    'native', or 'fp32-accumulate' (emulated; the default for fp16 on a CPU, see the docstring)."""
    if precision == "fp32":
        return None
    if args.half_gemm == "auto":
        return "fp32-accumulate" if slow_half_gemm(PRECISIONS[precision], args.device) else "native"
    return args.half_gemm


def update_plan(path: Path, groups, args, argv_used=None) -> None:
    """Merge this invocation's intended cells into plan.json (the renderer lists missing cells)."""
    plan = {"cells": [], "invocations": []}
    if path.is_file():
        try:
            plan = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    cells = {(c["method"], c["ratio"], c["seed"], c["precision"]) for c in plan.get("cells", [])}
    for method, seed, precision in groups:
        for r in ratios_for(args, method, precision):
            cells.add((method, r, seed, precision))
    order = lambda c: (c[0], isinstance(c[1], str), str(c[1]), -1 if c[2] is None else c[2], c[3])
    plan["cells"] = [dict(method=m, ratio=r, seed=s, precision=p) for m, r, s, p in sorted(cells, key=order)]
    cmd = "python benchmarks/quality.py " + shlex.join(argv_used if argv_used is not None else sys.argv[1:])
    if cmd not in plan.setdefault("invocations", []):
        plan["invocations"].append(cmd.strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    os.replace(tmp, path)


def ratios_for(args, method, precision) -> list:
    if METHODS[method].unstructured:  # TRIM varies the rows' ratios, which N:M fixes: no N:M cells
        return [r for r in args.us_sparsities if not (METHODS[method].trim and isinstance(r, str))]
    if precision != "fp32":
        return args.precision_ratios
    return [f"p{n}" for n in args.target_params] if args.target_params else args.ratios


def plan_groups(args) -> list[tuple[str, int, str]]:
    """Scoring groups (method, seed, precision), ordered so that a partial run is useful: seed by
    seed; within a seed the cheap fp32 baselines (then the other Taylor variants), fp32
    moreau-reference, the bf16/fp16 groups (cheap methods first), moreau-paper followed by the
    allocations sharing its scores, then the unstructured methods."""
    groups = []
    for i, seed in enumerate(args.seeds):
        for method in args.methods:
            if method in SEED_FREE and i > 0:
                continue
            groups.append((method, seed, "fp32"))
        if seed in args.precision_seeds:
            for precision in args.precisions:
                if precision == "fp32":
                    continue
                for method in args.precision_methods:
                    if method in SEED_FREE and i > 0:
                        continue
                    groups.append((method, seed, precision))

    def rank(g):
        method, seed, precision = g
        spec = METHODS[method]
        if spec.unstructured:
            r = 4.5 if spec.lib == "moreau" else 4
        elif precision != "fp32":
            r = 2.5 if spec.lib == "moreau" else 2
        elif spec.lib != "moreau":
            r = 0 if spec.variant == "param_first" else 0.5
        elif method == "moreau-reference":
            r = 1
        else:  # moreau-paper, then the allocations reusing its scores
            r = 3 if spec.allocation == "uniform" else 3.5
        return args.seeds.index(seed), r

    return sorted(groups, key=rank)  # stable: the given method order within a rank


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _sparsities(s: str) -> list:
    """'0.5,2:4' -> [0.5, '2:4']"""
    out = []
    for x in (x.strip() for x in s.split(",")):
        if not x:
            continue
        if ":" in x:
            n, m = (int(v) for v in x.split(":"))
            if not 0 < n < m:
                raise argparse.ArgumentTypeError(f"N:M needs 0 < n < m, got {x}")
            out.append(f"{n}:{m}")
        else:
            out.append(float(x))
    return out


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(allowed):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pruning quality and precision robustness (BENCHMARKS.md §3). Appends one JSON record "
                    "per cell to <out>/<model-tag>/records.jsonl; finished cells are skipped on rerun. "
                    "Render with benchmarks/render_quality.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model: omitted = embedded SmolLM2-135M; a .gguf file or local HF/pruned directory; "
                        "'tiny-random' = tiny random-init Llama with byte tokens (tests)")
    p.add_argument("--tag", default=None, help="results sub-directory (default: derived from the model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results root")
    p.add_argument("--ratios", type=_floats, default=[0.1, 0.2, 0.3], help="pruning ratios (fp32 grid)")
    p.add_argument("--methods", type=_names(METHODS), default=list(METHODS),
                   help=f"methods of the fp32 grid; structured: {', '.join(STRUCTURED)} (taylor-* are "
                        f"LLM-Pruner's variants, +owl/+alpha/+farms per-layer ratio allocations); unstructured "
                        f"(zeroed weights in every decoder layer, at --us-sparsities): {', '.join(UNSTRUCTURED)}")
    p.add_argument("--target-params", type=_ints, default=None, metavar="N[,N...]",
                   help="instead of --ratios: prune each structured fp32 cell to at most N parameters, at the "
                        "smallest ratio that gets there (solved per layer range and scope; global scope: per "
                        "scoring group, from its scores), to compare settings at equal size")
    p.add_argument("--scores-cache", default=None, metavar="DIR",
                   help="score every layer and keep the scores of each (method, seed, precision, calibration) "
                        "group in DIR, reused by later runs with other layer ranges or scopes (one-shot only)")
    p.add_argument("--rounds", type=int, default=1, metavar="K",
                   help="iterative pruning in K scoring rounds (prune_model(rounds=K); fp32 only, no scores "
                        "shared between cells); 1 = one-shot")
    p.add_argument("--us-sparsities", type=_sparsities, default=[0.3, 0.5, "2:4"],
                   help="sparsities of the unstructured methods: fractions per output row, or N:M")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                   help="seeds (each drives the calibration batch and the method's noise); magnitude uses the first")
    p.add_argument("--precisions", type=_names(PRECISIONS), default=["fp32", "bf16", "fp16"],
                   help="weight dtypes of the importance computation (fp32 runs the full grid, the others the "
                        "precision study)")
    p.add_argument("--half-gemm", default="auto", choices=("auto", "native", "fp32-accumulate"),
                   help="how fp16/bf16 matrix products run during the importance: 'native' torch kernels, or "
                        "'fp32-accumulate' (fp16 operands, fp32 accumulation, fp16 result: what GPU tensor cores "
                        "do); 'auto' = fp32-accumulate for fp16 on a CPU, where the native fp16 GEMM is ~20x "
                        "slower than fp32, native elsewhere")
    p.add_argument("--precision-methods", type=_names(METHODS),
                   default=["moreau-reference", "moreau-paper", "taylor", "magnitude"],
                   help="methods of the bf16/fp16 study")
    p.add_argument("--precision-ratios", type=_floats, default=[0.2], help="ratios of the bf16/fp16 study")
    p.add_argument("--precision-seeds", type=_ints, default=[0, 1, 2], help="seeds of the bf16/fp16 study")
    p.add_argument("--granularity", default="query-heads", choices=("query-heads", "kv-group"))
    p.add_argument("--scope", default="local", choices=("local", "global"))
    p.add_argument("--attn-layers", default=None, help="START:END (default: the published range scaled)")
    p.add_argument("--mlp-layers", default=None, help="START:END (default: the published range scaled)")
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--iters", type=int, default=10, help="Moreau proximal steps T (avg_last = min(5, T))")
    p.add_argument("--calib", default="pydoc", help="calibration corpus (its calibration split)")
    p.add_argument("--heldout", default="pydoc", help="evaluation corpus (its held-out split)")
    p.add_argument("--n-samples", type=int, default=10, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=64, help="calibration window length")
    p.add_argument("--windows-128", type=int, default=32, help="held-out windows of 128 tokens")
    p.add_argument("--windows-long", type=int, default=4, help="held-out windows of --long-seq-len tokens (0: skip)")
    p.add_argument("--long-seq-len", type=int, default=1024, help="the long window length (ppl_1024)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop before starting a new scoring group after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    return p


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad = [m for m in args.precision_methods if METHODS[m].unstructured]
    if bad:
        build_parser().error(f"--precision-methods takes structured methods only (the precision study compares "
                             f"kept heads/channels), not {', '.join(bad)}")
    if args.rounds < 1:
        build_parser().error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and args.precisions != ["fp32"]:
        build_parser().error("--rounds runs in fp32 only: add --precisions fp32")
    if args.rounds > 1 and args.target_params and args.scope == "global":
        build_parser().error("--rounds with --target-params needs --scope local (the global rule's size after "
                             "several rounds depends on every round's scores)")
    if args.target_params:
        bad = [m for m in args.methods if METHODS[m].allocation != "uniform"]
        if bad:
            build_parser().error(f"--target-params solves one uniform ratio; the per-layer allocations "
                                 f"{', '.join(bad)} fit their own ratios: leave them out of --methods")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
