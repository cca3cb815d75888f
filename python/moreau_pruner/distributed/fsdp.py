"""The Moreau estimate and structured pruning on several ranks with PyTorch FSDP2 (SPEC §9).

Launch::

    torchrun --nproc-per-node N -m moreau_pruner.cli --distributed fsdp [every other option]

What each rank holds and does:

* **Model.** Built from its config with parameters on the ``meta`` device (buffers such as the
  rotary frequencies are real), ``fully_shard`` on every decoder layer and on the root with
  ``MixedPrecisionPolicy(reduce_dtype=float32)``, then ``to_empty`` and filled with this rank's rows
  only. From a Hugging Face safetensors directory each rank reads just its rows
  (``safe_open(...).get_slice``); a ``.gguf`` file (the embedded SmolLM2) or a pruned directory is
  loaded whole on the CPU of every rank first (their loaders cannot read slices), then sliced.
* **Data parallel.** Every rank draws the same calibration batch and keeps a contiguous block of
  rows (uneven blocks are weighted so the result is still the mean over the whole batch). The loss
  of rank r is scaled by ``world · n_r / n`` so that FSDP2's averaging reduce-scatter hands each
  rank the batch-mean gradient of its own shard, reduced in fp32.
* **State.** δ, acc and the clean copy of the weights exist only as local shards (FSDP2 shards
  dim 0, so rows stay whole; shards may be uneven or empty). The perturbed weight is written into
  the local shard in place by ``moreau_kernels.perturb_out`` from the kept clean copy and the
  clean values are copied back after the backward, so the weights end bit-identical. The Philox
  noise of a shard is that of its elements in the *full* tensor (counter offset = first row ×
  row length): :func:`shard_noise` makes it (native Philox words with a counter offset, the
  reference Box-Muller) and passes it to the op, since the perturb ops take no element offset yet.
* **Update.** After each step's backward the sharded ``.grad`` (a DTensor whose local part is the
  reduced gradient of this rank's rows) is consumed shard by shard by ``moreau_kernels.prox_update_``
  (FSDP2 parameters never see ``register_hook``; reading the reduced local gradient after the
  backward needs no hook). Row groups are local; ``paper``-mode structure groups sum their squared
  norms across ranks (one all-reduce per step); Σδ² of the ``l2`` log is all-reduced.
* **Scores.** Row saliencies of the local rows are gathered, column saliencies (o_proj/down_proj)
  are summed across ranks, so every rank holds the same unit scores and computes the same plan.
* **Save.** The full state dict is gathered to rank 0's CPU
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), loaded into a plain model,
  which rank 0 prunes with the plan, evaluates and saves in the usual format. Rank 0 therefore needs
  host memory for the whole model at the end (not for the estimate).

Evaluation (``--eval-seq-lens``) and the sample generation run on rank 0 on the gathered model;
pass ``--no-eval`` when the dense model does not fit one device.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

import moreau_kernels as mk

from ..estimate.estimator import (EstimatorError, MoreauConfig, MoreauResult, _progress, check_finite_weights, finish_step,
                        lm_loss, unique_named_parameters)
from ..estimate.lean import _score_predicate

MODES = ("fsdp",)
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc-per-node N -m moreau_pruner.cli --distributed fsdp ..."
TAYLOR_VARIANTS = ("param_first", "param_second", "param_mix", "vectorize")


class DistributedError(ValueError):
    """A bad launch or an option without a distributed path."""


# ============================================================================ process group
@dataclass
class Context:
    """This rank's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object = None
    comm_s: float = 0.0  # time spent in this module's own collectives (scores, l2 log)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_environment(env=None) -> None:
    """Refuse to start without the rendezvous variables torchrun sets."""
    env = os.environ if env is None else env
    missing = [v for v in RENDEZVOUS_VARS if v not in env]
    if missing:
        raise DistributedError(f"--distributed fsdp needs the rendezvous variables that torchrun sets; missing "
                               f"{', '.join(missing)}. Launch with: {LAUNCH}")


def _device_of_rank(spec: str, local_rank: int) -> tuple[str | None, str | None]:
    """(device, None) or (None, reason) for this rank."""
    if spec == "cpu":
        return "cpu", None
    if spec == "cuda":
        if not torch.cuda.is_available():
            return None, "--device cuda but this rank sees no CUDA device"
        if local_rank >= torch.cuda.device_count():
            return None, (f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                          f"use --nproc-per-node <= the number of GPUs")
        return f"cuda:{local_rank}", None
    return None, (f"--device {spec!r} with --distributed: give 'cpu' (gloo) or 'cuda' (nccl; rank r uses "
                  f"cuda:LOCAL_RANK), not a numbered device")


def init(device: str = "cpu") -> Context:
    """Join the torchrun job: gloo for CPU tensors (and for the checks), nccl for CUDA ones.

    Every rank checks its device and the ranks compare: an impossible device on any rank or ranks on
    different device types give the same clear error on every rank (nobody is left waiting).
    """
    check_environment()
    from torch.distributed.device_mesh import init_device_mesh

    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if (device == "cuda" and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
    dev, why = _device_of_rank(device, local_rank)
    seen = [None] * world
    dist.all_gather_object(seen, (dev, why))
    problems = [f"rank {r}: {w}" for r, (_, w) in enumerate(seen) if w]
    if problems:
        raise DistributedError("; ".join(problems))
    types = sorted({torch.device(d).type for d, _ in seen})
    if len(types) > 1:
        where = ", ".join(f"rank {r}: {d}" for r, (d, _) in enumerate(seen))
        raise DistributedError(f"mixed devices across ranks ({where}); every rank must use the same device type")
    if types[0] == "cuda":
        torch.cuda.set_device(torch.device(dev))
    if rank != 0:  # only rank 0 shows progress (the loaders' bars included)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"  # plain tqdm bars (the GGUF converter's)
    mesh = init_device_mesh(types[0], (world,))
    return Context(rank, world, local_rank, torch.device(dev), mesh)


def shard_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a dim-0 shard as FSDP2 cuts it (``torch.chunk``: ceil(rows/world) per
    rank, the last ranks get fewer or none)."""
    chunk = -(-rows // world) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def batch_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's calibration rows: contiguous blocks, the first n % world ranks one row more."""
    if n < world:
        raise DistributedError(f"the calibration batch has {n} rows but {world} ranks: every rank needs at least "
                               f"one row (raise --num-examples or lower --nproc-per-node)")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _all_reduce(ctx: Context, t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the collective's device), back on t's device."""
    t0 = time.perf_counter()
    x = t.to(ctx.device)
    dist.all_reduce(x)
    ctx.comm_s += time.perf_counter() - t0
    return x.to(t.device)


def _gather_rows(ctx: Context, local: torch.Tensor, rows: int) -> torch.Tensor:
    """The full [rows] vector from every rank's dim-0 shard (uneven or empty shards padded)."""
    t0 = time.perf_counter()
    chunk = -(-rows // ctx.world)
    pad = torch.zeros(chunk, dtype=local.dtype, device=ctx.device)
    pad[:local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(ctx.world)]
    dist.all_gather(parts, pad)
    ctx.comm_s += time.perf_counter() - t0
    return torch.cat(parts)[:rows].to(local.device)


# ============================================================================ model on meta, sharded loading
@contextlib.contextmanager
def params_on_meta():
    """Construct modules with their parameters on ``meta`` (buffers stay real). A parameter that is
    already on meta is registered as is, so tied weights stay tied."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_model(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``factory()`` with meta parameters cast to ``dtype`` (real buffers keep their dtype)."""
    with params_on_meta():
        model = factory()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def fully_shard_model(model: nn.Module, ctx: Context) -> nn.Module:
    """FSDP2 on every decoder layer and the root, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..model.structure import _find_layers

    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in _find_layers(model):
        fully_shard(layer, mesh=ctx.mesh, mp_policy=mp)
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
    return model


def materialize(model: nn.Module, ctx: Context, rows_of: Callable[[str, int, int], torch.Tensor]) -> None:
    """``to_empty`` on this rank's device, then fill every local shard with ``rows_of(name, start,
    stop)`` and put the real buffers back."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=ctx.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in unique_named_parameters(model):
            local = p.to_local()
            start, stop = shard_range(p.shape[0], ctx.world, ctx.rank)
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: FSDP2 gave rank {ctx.rank} {local.shape[0]} rows, expected {stop - start}")
            if stop > start:
                local.copy_(rows_of(name, start, stop))


class SafetensorsRows:
    """Read row slices of named tensors from a safetensors checkpoint (one file or an index)."""

    def __init__(self, directory: Path):
        import json

        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json")
        self._files = {}
        self._where = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for f in files:
            h = safe_open(str(directory / f), framework="pt", device="cpu")
            self._files[f] = h
            for k in h.keys():
                self._where[k] = f

    def __call__(self, name: str, start: int, stop: int) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise KeyError(f"the checkpoint has no tensor {name}")
        return self._files[f].get_slice(name)[start:stop]


@dataclass
class ShardedModel:
    """An FSDP2-sharded model, its tokenizer and how to build its plain twin on rank 0."""

    model: nn.Module
    tokenizer: object
    factory: Callable[[], nn.Module]
    dtype: torch.dtype
    sliced_loading: bool


def load_sharded(spec, dtype, ctx: Context) -> ShardedModel:
    """Load ``spec`` (as :func:`moreau_pruner.model.loading.load_model` understands it) sharded over ranks."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..model.loading import embedded_model_path, load_model, parse_dtype

    torch_dtype = parse_dtype(dtype) or torch.float32
    path = embedded_model_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (give a .gguf file or a local model directory)")
    hf_dir = (path.is_dir() and (path / "config.json").is_file()
              and "layer_intermediate_size" not in (path / "config.json").read_text())
    if hf_dir:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        reader = SafetensorsRows(path)

        def factory():
            return AutoModelForCausalLM.from_config(config)

        model = fully_shard_model(meta_model(factory, torch_dtype), ctx)
        materialize(model, ctx, lambda n, a, b: reader(n, a, b).to(torch_dtype))
        return ShardedModel(model, tok, factory, torch_dtype, True)
    full, tok = load_model(spec, torch_dtype, "cpu")  # every rank reads the whole file (no sliced reader)
    cls, config = type(full), full.config

    def factory():
        return cls(config)

    state = dict(unique_named_parameters(full))
    model = fully_shard_model(meta_model(factory, torch_dtype), ctx)
    materialize(model, ctx, lambda n, a, b: state[n].detach()[a:b])
    del state, full
    return ShardedModel(model, tok, factory, torch_dtype, False)


def shard_module(model: nn.Module, ctx: Context, factory: Callable[[], nn.Module] | None = None) -> ShardedModel:
    """Shard an already built (full) model: its twin is built on meta and filled with its rows."""
    dtype = next(model.parameters()).dtype
    cls, config = type(model), model.config
    factory = factory or (lambda: cls(config))
    state = dict(unique_named_parameters(model))
    sharded = fully_shard_model(meta_model(factory, dtype), ctx)
    materialize(sharded, ctx, lambda n, a, b: state[n].detach()[a:b])
    return ShardedModel(sharded, None, factory, dtype, False)


def gather_to_rank0(sm: ShardedModel, ctx: Context) -> nn.Module | None:
    """Collective: rank 0 gets a plain (unsharded, CPU) model with the full weights, others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(sm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    plain = meta_model(sm.factory, sm.dtype)
    buffers = {n: b.detach().clone() for n, b in plain.named_buffers()}
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    still_meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if unexpected or still_meta:
        raise RuntimeError(f"gathered state dict does not fit the model: missing {still_meta[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    with torch.no_grad():
        for n, b in plain.named_buffers():
            b.copy_(buffers[n])
    return plain.eval()


# ============================================================================ data-parallel forward/backward
def _forward_backward(model, local: torch.Tensor, n_total: int, world: int, micro_batch_size: int | None,
                      loss_fn: Callable = lm_loss, scale: float = 1.0) -> float:
    """Backward of this rank's share of the batch-mean loss; gradients sync on the last micro-batch.

    FSDP2 averages over ranks, so rank r's loss is weighted by world·n_r/n: the reduced gradient is
    Σ_r (n_r/n)·mean_r = the mean over the whole batch. Returns this rank's share of that mean.
    """
    n = local.shape[0]
    mbs = micro_batch_size or n
    starts = list(range(0, n, mbs))
    total = 0.0
    for i, start in enumerate(starts):
        part = local[start:start + mbs]
        model.set_requires_gradient_sync(i == len(starts) - 1)
        loss = loss_fn(model, part)
        if not torch.isfinite(loss):
            raise EstimatorError(f"the loss is {loss.item()} (non-finite) on this rank's calibration rows "
                                 f"{start}..{start + len(part) - 1}")
        (loss * (len(part) * world / n_total) * scale).backward()
        total += loss.item() * len(part) / n_total
    return total


def _local_grad(p: nn.Parameter) -> torch.Tensor:
    g = p.grad
    if g is None:  # the parameter does not reach the loss: zero gradient
        return torch.zeros_like(p.to_local())
    return g.to_local() if hasattr(g, "to_local") else g


class _ShardState:
    __slots__ = ("name", "param", "index", "start", "stop", "row_numel", "delta", "acc", "clean")

    def __init__(self, name, param, index, scored, ctx):
        self.name, self.param, self.index = name, param, index
        self.start, self.stop = shard_range(param.shape[0], ctx.world, ctx.rank)
        self.row_numel = math.prod(param.shape[1:])
        local = param.to_local()
        self.delta = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
        self.acc = torch.zeros_like(self.delta) if scored else None
        self.clean = None

    @property
    def local(self) -> torch.Tensor:
        return self.param.to_local()

    @property
    def empty(self) -> bool:
        return self.stop == self.start


def moreau_estimate_fsdp(model: nn.Module, batch: torch.Tensor, ctx: Context, config: MoreauConfig | None = None,
                         score=None, progress: bool = True, loss_fn: Callable = lm_loss, structure=None,
                         on_step=None) -> MoreauResult:
    """SPEC §2/§3 on an FSDP2-sharded model; ``batch`` is the WHOLE calibration batch (same on every
    rank; each rank uses its rows). Returns Ĝ as this rank's local shards (fp32, dim-0 rows
    ``shard_range``), the log (loss and l2 over the whole batch) and ``result.path == "fsdp"``.
    """
    cfg = (config or MoreauConfig()).validate()
    if cfg.noise != "philox":
        raise DistributedError("--noise torch (the published CPU generator stream) has no distributed path yet: "
                               "each rank would have to draw every full tensor; use --noise philox")
    named = unique_named_parameters(model)
    if not named:
        raise EstimatorError("the model has no parameters")
    check_finite_weights((n, p.to_local()) for n, p in named)
    wanted = _score_predicate(score, named)
    states = [_ShardState(n, p, i, wanted(n), ctx) for i, (n, p) in enumerate(named)]
    groups = None
    if cfg.group == "structure":
        if structure is None:
            from ..model.structure import discover

            structure = discover(model)
        groups = _sharded_groups(structure, states)
    a, b = batch_rows(batch.shape[0], ctx.world, ctx.rank)
    local_batch = batch[a:b]
    grad_flags = [p.requires_grad for _, p in named]
    K = min(cfg.avg_last, cfg.iters)
    log: list[dict] = []
    sumsq = torch.zeros(len(states), dtype=torch.float64)
    backend = ""
    try:
        model.eval()
        for _, p in named:
            p.requires_grad_(True)
            p.grad = None
        bar = _progress(range(cfg.iters), progress and ctx.is_main, "Moreau estimate (FSDP2)")
        for t in bar:
            t0 = time.perf_counter()
            l2 = 0.5 * float(sumsq.sum()) / cfg.lamb
            loss = 0.0
            for s in range(cfg.n_samples):
                key = t * cfg.n_samples + s
                try:
                    _perturb_shards(states, cfg, key)
                    loss += _forward_backward(model, local_batch, batch.shape[0], ctx.world, cfg.micro_batch_size,
                                              loss_fn, 1.0 / cfg.n_samples)
                finally:
                    _restore_shards(states)
            loss = float(_all_reduce(ctx, torch.tensor([loss], dtype=torch.float64))[0])
            accumulate = t >= cfg.iters - K
            if not backend:
                st0 = next((st for st in states if not st.empty), None)
                if st0 is not None:
                    backend = mk.select("prox_update_", _local_grad(st0.param), st0.delta, st0.acc)
            if groups is None:
                for k, st in enumerate(states):
                    sumsq[k] = 0.0 if st.empty else float(mk.prox_update_(
                        _local_grad(st.param).contiguous(), st.delta, st.acc, cfg.lr, cfg.soft, cfg.lamb,
                        cfg.prox_mode, accumulate and st.acc is not None))
                    st.param.grad = None
            else:
                _sharded_structure_prox(ctx, states, groups, cfg, accumulate, sumsq)
            sumsq = _all_reduce(ctx, sumsq)
            log.append(finish_step(t, states, sumsq, loss, l2, t0, on_step, bar))
    finally:
        for (_, p), flag in zip(named, grad_flags):
            p.grad = None
            p.requires_grad_(flag)
        model.set_requires_gradient_sync(True)
    grads = {st.name: st.acc.div_(K) for st in states if st.acc is not None}
    res = MoreauResult(grads=grads, log=log, config=cfg, backend=backend)
    res.path = "fsdp"
    return res


def shard_noise(shape, seed: int, step: int, index: int, offset: int, device) -> torch.Tensor:
    """The Philox normals of elements offset .. offset+numel-1 of parameter ``index`` (flat, full tensor).

    Equal to ``moreau_kernels.reference.normal_noise(full_shape, ...).flatten()[offset:offset+numel]``.
    The raw Philox words come from the native ``philox_bits`` op (which takes a counter offset) when the
    library is built for the device, else from the pure-PyTorch generator; the words are bit-identical
    either way, and Box-Muller is the reference one.
    """
    from moreau_kernels import _native
    from moreau_kernels.reference import bits_to_normal, philox_bits

    numel = math.prod(shape)
    lane = offset % 4
    n = numel + lane
    device = torch.device(device)
    if _native.has_op("philox_bits", device.type):
        like = torch.empty(1, device=device).expand(n)  # only its size and device are read
        bits = _native.op("philox_bits")(like, seed, step, index, offset // 4)
    else:
        bits = philox_bits(n, seed, step, index, device=device, first_q=offset // 4)
    return bits_to_normal(bits, n)[lane:].reshape(shape)


def _perturb_shards(states, cfg: MoreauConfig, key: int) -> None:
    """w̃ = w + ξ·|c·w| + δ written into every local shard, the clean rows kept aside."""
    with torch.no_grad():
        for st in states:
            if st.empty:
                continue
            local = st.local
            st.clean = local.clone()
            noise = shard_noise(local.shape, cfg.seed, key, st.index, st.start * st.row_numel, local.device)
            mk.perturb_out(st.clean, st.delta, noise, local, cfg.std, cfg.seed, key, st.index)


def _restore_shards(states) -> None:
    with torch.no_grad():
        for st in states:
            if st.clean is not None:
                st.local.copy_(st.clean)
                st.clean = None


def _sharded_groups(structure, states):
    """Structure groups (heads, MLP channels) restricted to each state's local rows."""
    by_param = {id(st.param): st for st in states}
    out = []
    for layer in structure.layers:
        for parts, n_units in ((layer.attention_unit_map(), layer.n_attention_units),
                               (layer.mlp_unit_map(), layer.intermediate_size)):
            entries = []
            for param, axis, unit in parts:
                st = by_param.get(id(param))
                if st is not None:
                    unit = unit.to(st.delta.device)
                    entries.append((st, axis, unit[st.start:st.stop] if axis == 0 else unit))
            if entries:
                out.append((entries, n_units))
    return out


def _sharded_structure_prox(ctx, states, groups, cfg: MoreauConfig, accumulate: bool, sumsq) -> None:
    """Paper-mode group soft-threshold over heads / MLP channels; the groups' squared norms are summed
    over ranks in one all-reduce (column groups of o_proj/down_proj span every rank's rows)."""
    us, partial = [], []
    for entries, n_units in groups:
        norm2 = torch.zeros(n_units, dtype=torch.float32, device=ctx.device)
        group_us = []
        for st, axis, unit in entries:
            g = _local_grad(st.param).float()
            u = st.delta - cfg.lr * (g + st.delta / cfg.lamb)
            if not st.empty:
                sq = u * u
                sq = sq.sum(dim=1) if (axis == 0 and u.dim() == 2) else (sq.sum(dim=0) if axis == 1 else sq)
                norm2.index_add_(0, unit, sq.to(norm2.device))
            group_us.append(u)
        us.append(group_us)
        partial.append(norm2)
    total = _all_reduce(ctx, torch.cat(partial)) if partial else None
    tau = cfg.lr * cfg.soft
    grouped, offset = set(), 0
    for (entries, n_units), group_us in zip(groups, us):
        r = torch.sqrt(total[offset:offset + n_units])
        offset += n_units
        coeff = torch.where(r <= tau, torch.zeros_like(r), 1.0 - tau / r)
        for (st, axis, unit), u in zip(entries, group_us):
            c = coeff.to(u.device)[unit]
            new = u * (c[:, None] if (axis == 0 and u.dim() == 2) else (c[None, :] if axis == 1 else c))
            st.delta.copy_(new)
            if accumulate and st.acc is not None:
                st.acc.add_(new)
            grouped.add(id(st))
    for k, st in enumerate(states):
        if id(st) in grouped:
            sumsq[k] = float((st.delta * st.delta).sum())
        elif st.empty:
            sumsq[k] = 0.0
        else:
            sumsq[k] = float(mk.prox_update_(_local_grad(st.param).contiguous(), st.delta, st.acc, cfg.lr, cfg.soft,
                                             cfg.lamb, cfg.prox_mode, accumulate and st.acc is not None))
        st.param.grad = None


# ============================================================================ plain gradients (Taylor)
def gradient_fsdp(model: nn.Module, batch: torch.Tensor, ctx: Context, names, micro_batch_size=None,
                  loss_fn: Callable = lm_loss) -> dict[str, torch.Tensor]:
    """The batch-mean gradient of the calibration loss, as this rank's local shards (fp32)."""
    named = unique_named_parameters(model)
    wanted = set(names)
    flags = [p.requires_grad for _, p in named]
    a, b = batch_rows(batch.shape[0], ctx.world, ctx.rank)
    try:
        model.eval()
        for _, p in named:
            p.requires_grad_(True)
            p.grad = None
        _forward_backward(model, batch[a:b], batch.shape[0], ctx.world, micro_batch_size, loss_fn)
        out = {}
        for n, p in named:
            if n in wanted:
                g = _local_grad(p).float()
                if not torch.isfinite(g).all():
                    raise EstimatorError(f"non-finite gradient in {n}")
                out[n] = g
        return out
    finally:
        for (_, p), flag in zip(named, flags):
            p.grad = None
            p.requires_grad_(flag)
        model.set_requires_gradient_sync(True)


def fisher_fsdp(model: nn.Module, batch: torch.Tensor, ctx: Context, names) -> dict[str, torch.Tensor]:
    """F = (1/N) Σ_n g_n² as local shards. The square comes before the sum over rows, so rows cannot
    be split across ranks: every rank runs every row (the reduce then averages equal gradients)."""
    n = batch.shape[0]
    acc: dict[str, torch.Tensor] = {}
    for j in range(n):
        row = batch[j:j + 1]
        for name, g in gradient_fsdp(model, row.expand(ctx.world, -1), ctx, names).items():
            g = g.square_().div_(n)
            if name in acc:
                acc[name].add_(g)
            else:
                acc[name] = g
    return acc


# ============================================================================ scores
def sharded_saliency(ctx: Context, grads: dict[str, torch.Tensor] | None):
    """A ``saliency`` for :func:`moreau_pruner.score.importance.layer_scores` on sharded weights: row sums
    of the local rows are gathered, column sums are summed over ranks (identical on every rank)."""

    def saliency(lin, _grads, names, vectorize):
        w = lin.weight
        rows_n, cols_n = w.shape
        local = w.to_local().detach()
        g = None
        if grads is not None:
            name = names[id(w)]
            if name not in grads:
                raise KeyError(f"no gradient estimate for {name}; was it scored by the estimator?")
            g = grads[name]
        if local.shape[0]:
            rows, _ = mk.channel_saliency(local, g, vectorize)
            p = local.float() if g is None else local.float() * g.float()
            cols = p.sum(dim=0) if vectorize else p.abs().sum(dim=0)
        else:
            rows = torch.zeros(0, dtype=torch.float32, device=local.device)
            cols = torch.zeros(cols_n, dtype=torch.float32, device=local.device)
        cols = _all_reduce(ctx, cols)
        return _gather_rows(ctx, rows, rows_n), (cols.abs() if vectorize else cols)

    return saliency


def compute_scores_fsdp(model: nn.Module, batch: torch.Tensor | None, ctx: Context, method: str = "moreau",
                        prune=None, moreau: MoreauConfig | None = None, reduction: str = "sum",
                        vectorize: bool = False, seed: int = 0, micro_batch_size: int | None = None,
                        progress: bool = True, taylor_variant: str = "param_first", head_score: str = "unit"):
    """Unit scores of the layers to prune (the same on every rank); returns (scores, estimate, timings).

    ``head_score``: how attention units combine their channels (:data:`.importance.HEAD_SCORES`)."""
    from dataclasses import replace

    from ..score.importance import METHODS, check_head_score, model_scores, scored_parameter_names
    from ..prune.plan import PruneConfig
    from ..model.structure import discover
    from ..score.taylor import effective_gradients

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_head_score(head_score)
    structure = discover(model)
    prune = prune or PruneConfig()
    attn_range, mlp_range = prune.validate(structure.num_layers)
    layers = set(attn_range) | set(mlp_range)
    names = scored_parameter_names(structure, layers)
    if method in ("moreau", "taylor") and batch is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    timings: dict = {}
    est = None
    grads = None
    t0 = time.perf_counter()
    comm0 = ctx.comm_s
    if method == "moreau":
        cfg = moreau or MoreauConfig(seed=seed)
        if micro_batch_size and cfg.micro_batch_size is None:
            cfg = replace(cfg, micro_batch_size=micro_batch_size)
        est = moreau_estimate_fsdp(model, batch, ctx, cfg, names, progress, structure=structure)
        grads = est.grads
    elif method == "taylor":
        if taylor_variant not in TAYLOR_VARIANTS:
            raise ValueError(f"taylor variant must be one of {TAYLOR_VARIANTS}, got {taylor_variant!r}")
        if vectorize and taylor_variant == "param_first":
            taylor_variant = "vectorize"
        g = gradient_fsdp(model, batch, ctx, names, micro_batch_size) if taylor_variant != "param_second" else None
        f = fisher_fsdp(model, batch, ctx, names) if taylor_variant in ("param_second", "param_mix") else None
        if f is not None:  # F ⊙ W needs the local rows of W
            local_w = {n: p.to_local() for n, p in unique_named_parameters(model) if n in f}
            grads = {n: (fv * local_w[n].detach().float() if taylor_variant == "param_second"
                         else g[n].float() - 0.5 * fv * local_w[n].detach().float()) for n, fv in f.items()}
        else:
            grads = effective_gradients(model, taylor_variant, g, None)
        vectorize = taylor_variant == "vectorize"
    timings["importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model_scores(structure, "taylor" if method == "taylor" else method, grads, reduction, vectorize,
                          prune.granularity, seed, layers,
                          saliency=sharded_saliency(ctx, grads if method != "magnitude" else None),
                          head_score=head_score)
    timings["scoring_s"] = time.perf_counter() - t0
    timings["collectives_s"] = ctx.comm_s - comm0
    return scores, est, timings


# ============================================================================ whole pipeline (CLI)
UNSUPPORTED = (
    ("unstructured", lambda a: a.unstructured, "--unstructured has no distributed path yet (structured methods only)"),
    ("allocation", lambda a: a.allocation != "uniform",
     "--allocation {value} has no distributed path yet (only uniform)"),
    ("noise", lambda a: a.noise != "philox", "--noise torch has no distributed path yet (use philox)"),
    ("method", lambda a: a.method in ("wanda", "gblm"), "--method {value} is unstructured; no distributed path yet"),
    ("method", lambda a: a.method == "policy-gradient",
     "--method policy-gradient has no distributed path yet (its masked forwards run in one process)"),
    ("rounds", lambda a: a.rounds != 1, "--rounds {value} has no distributed path yet (one-shot only)"),
)


def check_options(args) -> None:
    """Refuse, before any work, the options that have no distributed path yet (naming each)."""
    problems = [msg.format(value=getattr(args, key)) for key, bad, msg in UNSUPPORTED if bad(args)]
    if problems:
        raise DistributedError("; ".join(problems))


def run(args) -> dict | None:
    """The one-process CLI pipeline on FSDP2 ranks; rank 0 returns the report, the others None.

    Every rank runs the estimate and the scores on its shards; rank 0 gathers the full model,
    prunes it with the common plan, evaluates and saves. An error on rank 0 after the gather is
    sent to every rank so none is left waiting.
    """
    from ..cli.compensation import check_args as check_compensation
    from ..cli.prune import _check_out, _check_uniform_args, _eval_lens
    from ..prune.plan import PruneConfig

    check_options(args)
    comp_cfg = check_compensation(args)
    if args.uniform:
        _check_uniform_args(args)
    check_environment()
    lens = _eval_lens(args.eval_seq_lens) if args.eval else []
    _check_out(args)
    prune_cfg = PruneConfig(ratio=args.ratio, attn_layers=args.attn_layers,
                            mlp_layers=args.mlp_layers or args.attn_layers, scope=args.scope,
                            granularity=args.granularity, round_to=args.round_to, uniform=args.uniform)
    moreau_cfg = MoreauConfig(mode=args.mode, std=args.std, lamb=args.lamb, lr=args.lr, soft=args.soft,
                              iters=args.iters, avg_last=args.avg_last, group=args.group,
                              n_samples=args.noise_samples, noise=args.noise, seed=args.seed,
                              micro_batch_size=args.micro_batch_size).validate()
    if not 0 < args.ratio < 1:
        raise ValueError(f"--ratio must be in (0, 1), got {args.ratio}")
    mk.set_backend(args.backend)
    ctx = init(args.device)
    try:
        return _run(args, ctx, lens, prune_cfg, moreau_cfg, comp_cfg)
    finally:
        dist.destroy_process_group()


def _run(args, ctx, lens, prune_cfg, moreau_cfg, comp_cfg=None):
    from .. import data
    from ..cli.prune import _half_gemm
    from ..model.precision import fp32_accumulate_gemms
    from ..model.structure import discover

    times: dict = {}
    t0 = time.perf_counter()
    sm = load_sharded(args.model, args.dtype, ctx)
    times["load_s"] = time.perf_counter() - t0
    model, tok = sm.model, sm.tokenizer
    prune_cfg.validate(discover(model).num_layers)
    calib_text = data.load_text(args.calib_file) if args.calib_file else data.calibration_text(args.calib)
    batch = data.calibration_batch(tok, calib_text, args.num_examples, args.seq_len, args.seed).to(ctx.device)
    progress = not args.quiet
    half = _half_gemm(args)
    gemms = (fp32_accumulate_gemms((getattr(torch, args.dtype),)) if half == "fp32-accumulate"
             else contextlib.nullcontext())
    with gemms:
        scores, est, more = compute_scores_fsdp(model, batch, ctx, args.method, prune_cfg, moreau_cfg,
                                                args.reduction, args.vectorize, args.seed, args.micro_batch_size,
                                                progress, args.taylor_variant, args.head_score)
    times.update(more)
    comp = None
    if comp_cfg is not None:  # before the gather: each rank updates its rows (distributed.compensate)
        from ..cli.compensation import with_batch
        from .compensate import compensate_fsdp

        comp_cfg = with_batch(comp_cfg, args, tok, calib_text)
        t0 = time.perf_counter()
        with gemms:
            comp = compensate_fsdp(model, scores, prune_cfg, batch if comp_cfg.batch is None else comp_cfg.batch,
                                   comp_cfg, ctx, progress)
        times["compensate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = gather_to_rank0(sm, ctx)
    times["gather_s"] = time.perf_counter() - t0
    report, error = None, None
    if ctx.is_main:
        try:
            report = _rank0_finish(args, plain, tok, batch, lens, prune_cfg, moreau_cfg, scores, est, times, half,
                                   progress, ctx, sm, gemms, comp)
        except Exception as e:  # noqa: BLE001 - sent to every rank, then raised
            error = e
    status = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise DistributedError(f"rank 0 failed: {status[0][0]}: {status[0][1]}")
    return report


def _rank0_finish(args, plain, tok, batch, lens, prune_cfg, moreau_cfg, scores, est, times, half, progress, ctx,
                  sm, gemms, comp=None):
    import json

    from .. import data
    from ..cli.prune import _prune_and_report, perplexity_report
    from ..io.pruned import save_pruned
    from ..prune.plan import prune_structure
    from ..model.structure import discover

    device = ctx.device
    if lens:
        plain.to(device)
    eval_text = data.load_text(args.eval_file) if args.eval_file else data.heldout_text(args.calib)
    eval_ids = data.tokenize_text(tok, eval_text) if lens else None

    ppl = perplexity_report(plain, eval_ids, lens, args.eval_tokens, times, progress)

    def structured(model):
        t = time.perf_counter()
        rep = prune_structure(discover(model), scores, prune_cfg)
        if comp is not None:  # the compensated weights came with the gather; the bias changes did not
            from ..prune.plan import count_parameters
            from .compensate import install_biases

            install_biases(model, comp[1])
            rep.compensation, rep.params_after = comp[0], count_parameters(model)
        times["prune_s"] = time.perf_counter() - t
        model.to(device)
        extra = {"moreau": est.summary() if est else None, "allocation": None,
                 "backend": est.backend if est else mk.get_backend(), "estimator_path": "fsdp" if est else None,
                 "distributed": {"mode": "fsdp", "world_size": ctx.world, "device": str(device),
                                 "sliced_loading": sm.sliced_loading,
                                 "pruned_on": "rank 0, gathered full model (CPU)"}}
        return rep, extra

    with gemms:
        report = _prune_and_report(args, plain, tok, batch.cpu(), eval_ids, ppl, prune_cfg, moreau_cfg, None,
                                   times, progress, half, structured=structured)
    if args.out:
        from ..io.stock import save_uniform

        t = time.perf_counter()
        save = save_uniform if args.uniform else save_pruned
        save(plain, args.out, tokenizer=tok, extra=report, overwrite=args.overwrite)
        times["save_s"] = time.perf_counter() - t
        report["out"] = str(Path(args.out).resolve())
    if args.json:
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, args.json)
    return report
