"""The ``fsdp`` memory strategy: w̃ written into the local FSDP2 shard (SPEC §9).

δ, acc and the clean copy of the weights exist only as local shards (FSDP2 shards dim 0, so rows
stay whole; shards may be uneven or empty). The perturbed weight is written into the local shard
in place by ``moreau_kernels.perturb_out`` from a clean copy taken just before, and the clean
values are copied back after the backward, so the weights end bit-identical. The Philox noise of a
shard is that of its elements in the *full* tensor (counter offset = first row × row length):
:func:`shard_noise` makes it and passes it to the op, since the perturb ops take no element offset.
After each step's backward the sharded ``.grad`` (a DTensor whose local part is the reduced
gradient of the batch) is read shard by shard (FSDP2 parameters never see ``register_hook``).

The strategy is given the data-parallel runner of the job (``moreau_pruner.distributed.context.
DataParallel``), which splits the batch, weights the loss, controls gradient sync and all-reduces
the loss, Σδ² and structure-group norms; ``FsdpStrategy(runner)`` is what
``estimate(..., strategy=...)`` takes.
"""
from __future__ import annotations

import math

import torch

import moreau_kernels as mk

from ..params import local_grad
from ..runner import Runner
from .base import State, Strategy


def shard_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a dim-0 shard as FSDP2 cuts it (``torch.chunk``: ceil(rows/world) per
    rank, the last ranks get fewer or none)."""
    chunk = -(-rows // world) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


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


class ShardState(State):
    """A parameter's local dim-0 shard: rows start..stop of the full tensor."""

    __slots__ = ("start", "stop", "row_numel", "clean")

    def __init__(self, name, param, index, scored, world: int, rank: int):
        super().__init__(name, param, index, scored, local=param.to_local())
        self.start, self.stop = shard_range(param.shape[0], world, rank)
        self.row_numel = math.prod(param.shape[1:])
        self.clean = None

    @property
    def local(self) -> torch.Tensor:
        return self.param.to_local()

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def empty(self) -> bool:
        return self.stop == self.start


class FsdpStrategy(Strategy):
    name = "fsdp"
    label = "Moreau estimate (FSDP2)"

    def __init__(self, runner: Runner):
        self.runner = runner

    def prepare(self, model, named, wanted, cfg, updates):
        self.cfg = cfg
        r = self.runner
        self.states = [ShardState(n, p, i, wanted(n), r.world, r.rank) for i, (n, p) in enumerate(named)]
        return self.states

    def perturb(self, key):
        """w̃ = w + ξ·|c·w| + δ written into every local shard, the clean rows kept aside."""
        cfg = self.cfg
        with torch.no_grad():
            for st in self.states:
                if st.empty:
                    continue
                local = st.local
                st.clean = local.clone()
                noise = shard_noise(local.shape, cfg.seed, key, st.index, st.start * st.row_numel, local.device)
                mk.perturb_out(st.clean, st.delta, noise, local, cfg.std, cfg.seed, key, st.index)

    def restore(self):
        with torch.no_grad():
            for st in self.states:
                if st.clean is not None:
                    st.local.copy_(st.clean)
                    st.clean = None

    def gradient(self, st):
        return local_grad(st.param).contiguous()
