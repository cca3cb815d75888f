"""The FSDP2 job a rank belongs to: launch checks, the process group, collectives, and the
data-parallel runner of the estimate (SPEC §9).

Every rank draws the same calibration batch and keeps a contiguous block of rows (uneven blocks are
weighted so the result is still the mean over the whole batch). The loss of rank r is scaled by
``world · n_r / n`` so that FSDP2's averaging reduce-scatter hands each rank the batch-mean gradient
of its own shard, reduced in fp32. :class:`DataParallel` is how the estimate loop and the plain
gradients of :mod:`moreau_pruner.estimate` see this: it splits the batch, weights the loss, turns
gradient sync on for the last micro-batch only, and all-reduces the loss, Σδ² and the
structure-group norms.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..estimate.runner import Runner

MODES = ("fsdp",)
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc-per-node N -m moreau_pruner.cli --distributed fsdp ..."


class DistributedError(ValueError):
    """A bad launch or an option without a distributed path."""


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


def batch_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's calibration rows: contiguous blocks, the first n % world ranks one row more."""
    if n < world:
        raise DistributedError(f"the calibration batch has {n} rows but {world} ranks: every rank needs at least "
                               f"one row (raise --num-examples or lower --nproc-per-node)")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce(ctx: Context, t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the collective's device), back on t's device."""
    t0 = time.perf_counter()
    x = t.to(ctx.device)
    dist.all_reduce(x)
    ctx.comm_s += time.perf_counter() - t0
    return x.to(t.device)


def gather_rows(ctx: Context, local: torch.Tensor, rows: int) -> torch.Tensor:
    """The full [rows] vector from every rank's dim-0 shard (uneven or empty shards padded)."""
    t0 = time.perf_counter()
    chunk = -(-rows // ctx.world)
    pad = torch.zeros(chunk, dtype=local.dtype, device=ctx.device)
    pad[:local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(ctx.world)]
    dist.all_gather(parts, pad)
    ctx.comm_s += time.perf_counter() - t0
    return torch.cat(parts)[:rows].to(local.device)


class DataParallel(Runner):
    """The estimate's runner on FSDP2 ranks (see the module docstring)."""

    rows_name = "this rank's calibration rows"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.world, self.rank, self.device = ctx.world, ctx.rank, ctx.device

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        a, b = batch_rows(batch.shape[0], self.world, self.rank)
        return batch[a:b]

    def set_gradient_sync(self, model: nn.Module, on: bool) -> None:
        model.set_requires_gradient_sync(on)

    def finish(self, model: nn.Module) -> None:
        model.set_requires_gradient_sync(True)

    def sum_loss(self, loss: float) -> float:
        return float(all_reduce(self.ctx, torch.tensor([loss], dtype=torch.float64))[0])

    def sum_sumsq(self, sumsq: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.ctx, sumsq)

    def unit_norms(self, pieces: list[tuple[torch.Tensor, torch.Tensor]], n_units: int) -> torch.Tensor:
        """This rank's rows of every tensor of the group, accumulated in one buffer."""
        norm2 = torch.zeros(n_units, dtype=torch.float32, device=self.device)
        for unit, sq in pieces:
            norm2.index_add_(0, unit, sq.to(norm2.device))
        return norm2

    def sum_unit_norms(self, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every group's norms summed over the ranks, in one all-reduce."""
        total = all_reduce(self.ctx, torch.cat(norms))
        return list(torch.split(total, [n.numel() for n in norms]))
