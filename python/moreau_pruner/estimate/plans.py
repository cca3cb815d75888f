"""Memory plans of the Moreau estimate for the sizes people prune, one GPU or FSDP2 ranks, and the
planning CLI.

``python -m moreau_pruner.estimate.plans`` prints, for LLaMA-7B on 1×80 GB and LLaMA-3-70B on 8×80 GB and
16×80 GB, the per-GPU plan of each configuration tried, in order of cost, and the first one that
fits. The knobs:

* path (one GPU): ``regen`` (no perturbed copy of the linear weights) or ``lean``;
* FSDP2 (several GPUs): every decoder layer and the root ``fully_shard``-ed; each rank holds 1/N
  of the weights, of the work buffers (the perturbed local shard), of δ and of acc (fp32), plus the
  unsharded parameters in flight (the root's, kept for the step, and two decoder layers: the
  current one and the prefetched next one), one layer's unsharded gradient (reduced in fp32) and
  the activations of its own calibration rows (the batch is split across ranks);
* ``offload``: FSDP2's ``CPUOffloadPolicy`` keeps the sharded parameters and gradients in host
  memory; the estimator state of a shard (work buffer, δ, acc) then lives there too and the
  prox update runs on the host (the ``cpu`` kernel backend) as each reduced gradient arrives, so
  the GPU holds only what is in flight; the plan reports host memory per node (8 GPUs a node);
* activation checkpointing (``checkpointing``): layer inputs only, one layer recomputed;
* micro-batches (rows per forward/backward): fewer activations, but every gradient (or partial
  sum) is held until the step's last backward.

Estimates are from shapes (a ``meta``-device model, no memory), with the activation model of
:func:`moreau_pruner.estimate.memory.activation_bytes`. ``--track`` also runs one step of the
single-GPU estimate on the ``meta`` device under
:class:`~moreau_pruner.estimate.memtrack.LiveTensorTracker`, so the plan is compared with the tensors
the estimate really creates (shapes and dtypes are exact on ``meta``; only the arithmetic is skipped).

``python -m moreau_pruner.estimate.plans --plan llama-7b --tokens 640`` prints instead the plan of one
model on each one-process path (lean, reference, the published code) with what fits a budget.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..model.meta import SHAPES, meta_model
from ..model.structure import default_layer_range
from .config import MoreauConfig
from .loop import estimate
from .memory import CUDA_RESERVE, GiB, activation_bytes, plan_memory
from .memtrack import LiveTensorTracker
from .params import score_predicate, unique_named_parameters

GPU_GIB_80GB = 79.2  # what an 80 GB A100/H100 reports as total memory, GiB
GPUS_PER_NODE = 8


def layer_score(first: int, stop: int) -> Callable[[str], bool]:
    """Score the attention and MLP projection weights of layers first..stop-1 (what pruning reads)."""
    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def wanted(name: str) -> bool:
        parts = name.split(".")
        if "layers" not in parts or not name.endswith(".weight"):
            return False
        i = parts.index("layers")
        return first <= int(parts[i + 1]) < stop and parts[-2] in projs
    return wanted


def scored_layers(spec: str, n_layers: int) -> tuple[Callable[[str], bool] | None, str]:
    """``--score``: ``published`` (the published pruned layers scaled to the model), ``all`` (every
    parameter) or ``FIRST-LAST`` (an inclusive layer range) as a score predicate and a label."""
    if spec == "all":
        return None, "all"
    if spec == "published":
        rng = default_layer_range(n_layers)
        return layer_score(*rng), f"published layers {rng}"
    try:
        a, b = (int(x) for x in spec.split("-"))
    except ValueError:
        raise ValueError(f"--score must be 'published', 'all' or FIRST-LAST (inclusive layers), got {spec!r}") from None
    if not 0 <= a <= b < n_layers:
        raise ValueError(f"--score {spec}: layers must lie in 0..{n_layers - 1}")
    return layer_score(a, b + 1), f"layers {a}..{b}"


@dataclass
class Option:
    """One configuration of the estimate to plan."""

    gpus: int = 1
    path: str = "regen"  # one GPU: regen or lean; FSDP2: lean on local shards
    offload: bool = False
    checkpointing: bool = False
    micro_batch_rows: int | None = None

    def label(self) -> str:
        parts = [f"{self.gpus} GPU" + ("s, FSDP2" if self.gpus > 1 else f", {self.path} path")]
        if self.offload:
            parts.append("CPUOffloadPolicy (state on the host)")
        if self.checkpointing:
            parts.append("activation checkpointing")
        if self.micro_batch_rows:
            parts.append(f"micro-batches of {self.micro_batch_rows} rows")
        return ", ".join(parts)


@dataclass
class RankPlan:
    """Per-GPU (per-rank) plan: GPU items, host items per rank, and whether it fits."""

    option: Option
    items: dict[str, int]
    host_items: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    budget: int = 0

    @property
    def total(self) -> int:
        return int(sum(self.items.values()))

    @property
    def host_per_node(self) -> int:
        return int(sum(self.host_items.values())) * min(GPUS_PER_NODE, self.option.gpus)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def format(self) -> str:
        w = max([len(k) for k in self.items] + [len(k) for k in self.host_items] + [5])
        lines = [f"{self.option.label()}: {'FITS' if self.fits else 'does NOT fit'} "
                 f"({self.total / GiB:.2f} of {self.budget / GiB:.1f} GiB per GPU)"]
        lines += [f"    {k:<{w}}  {v / GiB:8.2f} GiB" for k, v in self.items.items()]
        if self.host_items:
            lines.append(f"    host memory per rank (x{min(GPUS_PER_NODE, self.option.gpus)} per node = "
                         f"{self.host_per_node / GiB:.0f} GiB):")
            lines += [f"    {k:<{w}}  {v / GiB:8.2f} GiB" for k, v in self.host_items.items()]
        lines += [f"    - {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"option": self.option.__dict__, "label": self.option.label(), "fits": self.fits,
                "total_bytes": self.total, "budget_bytes": self.budget, "items": self.items,
                "host_items": self.host_items, "host_per_node_bytes": self.host_per_node, "notes": self.notes}


def _layer_groups(model: nn.Module):
    """(decoder layers, root parameters): what FSDP2 would shard as separate units."""
    layers = list(model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for _, p in unique_named_parameters(model) if id(p) not in in_layers]
    return layers, root


def plan_rank(model: nn.Module, rows: int, seq: int, option: Option, score: Callable[[str], bool] | None,
              budget_gib: float = GPU_GIB_80GB) -> RankPlan:
    """The per-GPU plan of ``option`` for an estimate of ``model`` on ``rows x seq`` tokens."""
    budget = int(budget_gib * GiB)
    if option.gpus == 1:
        cfg = MoreauConfig(micro_batch_size=option.micro_batch_rows)
        if option.offload:
            raise ValueError("offload is planned for FSDP2 (several GPUs) only")
        p = plan_memory(model, (rows, seq), cfg, option.path, "cuda", score=score,
                        gradient_checkpointing=option.checkpointing, fused=True)
        return RankPlan(option, dict(p.items), notes=list(p.notes), budget=budget)
    N = option.gpus
    named = unique_named_parameters(model)
    wanted = score_predicate(score, named)
    es = named[0][1].element_size()
    P = sum(p.numel() for _, p in named)
    Ps = sum(p.numel() for n, p in named if wanted(n))
    layers, root = _layer_groups(model)
    layer_numel = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    root_numel = sum(p.numel() for p in root)
    shard = lambda n: math.ceil(n / N)  # noqa: E731  (dim-0 shards: at most one row more; ignored)
    rows_rank = math.ceil(rows / N)
    mrows = min(rows_rank, option.micro_batch_rows or rows_rank)
    n_backward = math.ceil(rows_rank / mrows)
    state = {"weights (local shard)": es * shard(P), "work buffers (perturbed local shard)": es * shard(P),
             "delta (fp32, local shard)": 4 * shard(P), "acc (fp32, scored, local shard)": 4 * shard(Ps)}
    if n_backward > 1:
        state["gradients (local shard, held over micro-batches)"] = es * shard(P)
    items: dict[str, int] = {}
    host: dict[str, int] = {}
    notes = [f"{N} ranks: {rows} calibration rows split as at most {rows_rank} per rank"
             + (f", {n_backward} micro-batches of {mrows}" if n_backward > 1 else "")]
    if option.offload:
        host = dict(state)
        host["sharded gradients (host)"] = es * shard(max(layer_numel, root_numel))
        notes.append("CPUOffloadPolicy: shards, work buffers, δ and acc in host memory; the prox update runs "
                     "on the host as each reduce-scattered gradient shard arrives")
    else:
        items.update(state)
    items["unsharded root (embeddings, lm_head, norm; whole step)"] = es * root_numel
    items["unsharded decoder layers in flight (current + prefetch)"] = 2 * es * layer_numel
    items["unsharded gradient of one layer (fp32 reduce-scatter input + param dtype)"] = (es + 4) * layer_numel
    act, how = activation_bytes(model, mrows, seq, named[0][1].dtype, option.checkpointing)
    items["activations (this rank's rows)"] = act
    items["CUDA context + allocator reserve"] = CUDA_RESERVE
    notes.append(f"activations: {how}")
    notes.append(f"{P / 1e9:.2f}e9 parameters ({es} B), {Ps / 1e9:.2f}e9 scored; largest decoder layer "
                 f"{layer_numel / 1e6:.0f}e6, root {root_numel / 1e6:.0f}e6 parameters")
    return RankPlan(option, items, host, notes, budget)


def candidate_options(gpus: int) -> list[Option]:
    """Configurations in order of cost (time first, then host memory): the first that fits is advised."""
    if gpus == 1:
        return [Option(1, "lean"), Option(1, "regen"), Option(1, "regen", checkpointing=True),
                Option(1, "regen", checkpointing=True, micro_batch_rows=1)]
    return [Option(gpus), Option(gpus, checkpointing=True), Option(gpus, offload=True),
            Option(gpus, offload=True, checkpointing=True)]


def plan_scenario(shape: str, gpus: int, tokens: int = 640, seq: int = 64, dtype: torch.dtype = torch.bfloat16,
                  budget_gib: float = GPU_GIB_80GB, score: str = "published") -> dict:
    """Every candidate option of ``shape`` on ``gpus`` GPUs and the first that fits."""
    model = meta_model(shape, dtype)
    sc, label = scored_layers(score, model.config.num_hidden_layers)
    rows = max(1, tokens // seq)
    plans = [plan_rank(model, rows, seq, o, sc, budget_gib) for o in candidate_options(gpus)]
    chosen = next((p for p in plans if p.fits), None)
    return {"shape": shape, "gpus": gpus, "tokens": rows * seq, "seq": seq, "dtype": str(dtype).replace("torch.", ""),
            "score": label, "plans": plans, "chosen": chosen}


# ============================================================================ tracked step on meta
@contextlib.contextmanager
def _no_packed_sequence_check(dev: torch.device):
    """On ``meta``, skip Hugging Face's data-dependent check for packed sequences (it reads the
    position ids, which a meta tensor does not have; the calibration rows are never packed)."""
    if dev.type != "meta":
        yield
        return
    from unittest import mock

    try:
        import transformers.masking_utils as mu
    except ImportError:
        yield
        return
    if not hasattr(mu, "find_packed_sequence_indices"):
        yield
        return
    with mock.patch.object(mu, "find_packed_sequence_indices", lambda position_ids: None):
        yield


def tracked_step(model: nn.Module, batch_shape: tuple[int, int], config: MoreauConfig | None = None,
                 path: str = "regen", score: Callable[[str], bool] | None = None,
                 gradient_checkpointing: bool = False):
    """One step (perturb, forward, one backward, prox updates) of the single-process ``lean`` or
    ``regen`` estimate under :class:`~moreau_pruner.estimate.memtrack.LiveTensorTracker`; returns the tracker.

    Meant for a ``meta``-device model (exact shapes and dtypes, no memory, no arithmetic): it runs
    :func:`~moreau_pruner.estimate.loop.estimate` itself with ``iters=1``, one noise sample and no
    micro-batches, which on ``meta`` reads neither the loss nor Σδ².
    """
    if path not in ("lean", "regen"):
        raise ValueError(f"path must be lean or regen, got {path!r}")
    cfg = replace(config or MoreauConfig(), iters=1, avg_last=1, n_samples=1, micro_batch_size=None)
    dev = next(model.parameters()).device
    ids = torch.zeros(batch_shape, dtype=torch.long, device=dev)
    with LiveTensorTracker(baseline=model) as tr, _no_packed_sequence_check(dev):
        estimate(model, ids, cfg, path, score=score, progress=False, gradient_checkpointing=gradient_checkpointing)
    return tr


# ============================================================================ CLI
def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m moreau_pruner.estimate.plans",
        description="Per-GPU memory plans of the Moreau estimate (bf16 weights, fp32 δ and acc) for LLaMA-7B on "
                    "1x80 GB and LLaMA-3-70B on 8x80 GB and 16x80 GB, trying configurations in order of cost "
                    "(path, FSDP2, activation checkpointing, CPUOffloadPolicy, micro-batches) and saying which "
                    "fits; or, with --plan, one model's plan on each one-process path. Shapes only: nothing is "
                    "materialised.",
        epilog="examples:\n  python -m moreau_pruner.estimate.plans                      # the three standard scenarios\n"
               "  python -m moreau_pruner.estimate.plans --shape llama-3-70b --gpus 8 --tokens 2048\n"
               "  python -m moreau_pruner.estimate.plans --shape llama-7b --gpus 1 --track   # + tracked peak on meta\n"
               "  python -m moreau_pruner.estimate.plans --plan llama-7b --tokens 640   # lean, reference, published",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="one model shape (default: the standard scenarios)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs (FSDP2 ranks when > 1)")
    ap.add_argument("--plan", choices=sorted(SHAPES),
                    help="instead: this shape's plan on the lean, reference and published paths (one process)")
    ap.add_argument("--tokens", type=int, default=640, help="calibration tokens (default 640, the published 10x64)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per row (default 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gpu-gib", "--budget-gib", dest="gpu_gib", type=float, default=GPU_GIB_80GB,
                    help="memory per GPU to compare against, GiB (default 79.2: what an 80 GB H100/A100 reports)")
    ap.add_argument("--score", default="published",
                    help="scored tensors (acc): 'published' (the pruned layers only), 'all', or FIRST-LAST "
                         "(inclusive layer range)")
    ap.add_argument("--track", action="store_true",
                    help="one GPU: also run one estimate step on the meta device under the live-tensor tracker")
    ap.add_argument("--json", help="write the plans (and tracked peaks) to this JSON file")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="with --plan: rows per forward/backward")
    ap.add_argument("--device", default=None, help="with --plan: cuda (default; adds the context reserve) or cpu")
    ap.add_argument("--checkpointing", action="store_true", help="with --plan: activation checkpointing (lean path)")
    args = ap.parse_args(argv)
    if args.tokens < args.seq or args.seq < 1:
        ap.error("--tokens must be at least --seq, and --seq positive")
    if args.plan is not None:
        if args.shape or args.gpus is not None or args.track or args.json:
            ap.error("--plan prints one shape's plan per path; --shape, --gpus, --track and --json are for the "
                     "per-GPU plans")
    elif args.micro_batch_size is not None or args.device is not None or args.checkpointing:
        ap.error("--micro-batch-size, --device and --checkpointing go with --plan")
    if (args.shape is None) != (args.gpus is None):
        ap.error("give --shape and --gpus together (or neither, for the standard scenarios)")
    if args.gpus is not None and args.gpus < 1:
        ap.error("--gpus must be >= 1")
    try:
        scored_layers(args.score, SHAPES[args.plan or args.shape or "llama-7b"]["num_hidden_layers"])
    except ValueError as e:
        ap.error(str(e))
    if args.plan is not None:
        return _path_plans(args)
    return _scenarios(args)


def _path_plans(args) -> int:
    """--plan: the lean, reference and published plans of one shape, each against the budget."""
    model = meta_model(args.plan, getattr(torch, args.dtype))
    score, _ = scored_layers(args.score, model.config.num_hidden_layers)
    rows = max(1, args.tokens // args.seq)
    cfg = MoreauConfig(micro_batch_size=args.micro_batch_size)
    budget = int(args.gpu_gib * GiB)
    for path in ("lean", "reference", "published"):
        plan = plan_memory(model, (rows, args.seq), cfg, path, args.device or "cuda", score=score,
                           gradient_checkpointing=args.checkpointing, fused=True)
        fits = plan.total <= budget
        print(plan.format())
        if plan.overlap:
            print(f"  lower bound {plan.lower_total / GiB:.2f} GiB: "
                  f"{'fits' if plan.lower_total <= budget else 'does NOT fit either'}")
        print(f"  => {'fits' if fits else 'does NOT fit'} in {args.gpu_gib:g} GiB "
              f"(margin {(budget - plan.total) / GiB:+.2f} GiB)\n")
    return 0


def _scenarios(args) -> int:
    """The per-GPU plans of the standard scenarios (or --shape/--gpus), with --track and --json."""
    dtype = getattr(torch, args.dtype)
    scenarios = [(args.shape, args.gpus)] if args.shape else [("llama-7b", 1), ("llama-3-70b", 8), ("llama-3-70b", 16)]
    doc = {"budget_gib": args.gpu_gib, "tokens": args.tokens, "seq": args.seq, "dtype": args.dtype, "scenarios": []}
    for shape, gpus in scenarios:
        sc = plan_scenario(shape, gpus, args.tokens, args.seq, dtype, args.gpu_gib, args.score)
        print(f"== {shape} on {gpus}x{args.gpu_gib:g} GiB, {sc['tokens']} tokens, {sc['dtype']}, "
              f"acc for {sc['score']}")
        for p in sc["plans"]:
            print(p.format())
        ch = sc["chosen"]
        print(f"=> {'use: ' + ch.option.label() if ch else 'nothing tried fits; use more GPUs'}\n")
        entry = {k: v for k, v in sc.items() if k not in ("plans", "chosen")}
        entry["plans"] = [p.to_json() for p in sc["plans"]]
        entry["chosen"] = ch.option.label() if ch else None
        if args.track and gpus == 1:
            entry["tracked"] = _tracked(shape, dtype, args, sc["plans"])
            print()
        doc["scenarios"].append(entry)
    if args.json:
        _write_json(Path(args.json), doc)
        print(f"wrote {args.json}")
    return 0


def _tracked(shape: str, dtype: torch.dtype, args, plans: list[RankPlan]) -> dict:
    """--track: one meta-device step of each one-GPU plan without micro-batches, against its plan."""
    model = meta_model(shape, dtype)
    rows = max(1, args.tokens // args.seq)
    score, _ = scored_layers(args.score, model.config.num_hidden_layers)
    tracked = {}
    for o in plans:
        if o.option.micro_batch_rows:
            continue
        tr = tracked_step(model, (rows, args.seq), MoreauConfig(), o.option.path, score, o.option.checkpointing)
        plan_no_reserve = o.total - o.items.get("CUDA context + allocator reserve", 0)
        tracked[o.option.label()] = {"tracked_peak_bytes": tr.peak_bytes,
                                     "plan_bytes_without_reserve": plan_no_reserve,
                                     "plan_over_tracked": plan_no_reserve / tr.peak_bytes,
                                     "peak_op": tr.peak_op,
                                     "breakdown": dict(sorted(tr.peak_breakdown.items(), key=lambda kv: -kv[1])[:8])}
        print(f"tracked on meta, {o.option.label()}: peak {tr.peak_bytes / 1e9:.2f} GB "
              f"({tr.peak_bytes / GiB:.2f} GiB) of live tensors after {tr.peak_op}; plan without the CUDA "
              f"reserve {plan_no_reserve / GiB:.2f} GiB ({plan_no_reserve / tr.peak_bytes:.3f} x)")
    return tracked


if __name__ == "__main__":
    raise SystemExit(main())
