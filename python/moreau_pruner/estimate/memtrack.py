"""Peak live tensor bytes, measured at the tensor level (per process).

Peak RSS on a CPU says little about what an estimate holds (the allocator keeps freed pages,
the model file is mapped, the Python heap grows), and ``torch.cuda.max_memory_allocated`` exists
on a GPU only. :class:`LiveTensorTracker` is a ``TorchDispatchMode`` that follows the storages
the ops create: every tensor an op returns (forward, backward, factories such as
``torch.zeros``, the ``moreau_kernels`` custom ops) has its untyped storage registered once, by
``nbytes``, with a weak reference whose callback subtracts it when the storage is freed. The
sum of live storages is tracked over time and its maximum is ``peak_bytes``::

    with LiveTensorTracker(baseline=model) as tr:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    print(tr.peak_bytes, tr.peak_breakdown)

What is counted:

* ``baseline``: tensors that exist before entering (a module's parameters and buffers, an
  optimizer's state, plain tensors) are registered at ``__enter__`` and count from the start,
  for as long as they live. Leave it out to measure only what the work adds (``peak_bytes``
  then starts from 0; ``peak_above_baseline`` is the same figure either way).
* tensors created before entering that are not in ``baseline`` are counted from the first op that
  reads them (``count_inputs=True``, the default), under the category ``input``; their life
  before that point is unknown to the tracker.
* everything an op creates under the mode, including the backward pass (the autograd engine runs
  its ops under the same mode), so saved activations, gradients and ``.grad`` buffers count.
  Several tensors that share a storage (views, ``param.data`` swaps) count once.

What is not: memory an op allocates and frees inside itself (its temporaries between two op
boundaries: the peak is sampled at op boundaries), allocator rounding and caching, and memory that
is not a tensor. Repeated forwards and backwards are fine (nothing is keyed by module or pass).
The tracker is per process and per thread that enters it (plus the autograd threads of that
backward); under FSDP each rank has its own.

``peak_breakdown`` splits the peak by category: ``baseline``, ``input``, and for created storages
``forward:<op>`` / ``backward:<op>`` by the op that created them (``backward`` when created while
the autograd engine runs a graph task).
"""
from __future__ import annotations

import threading
import weakref
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorTracker", "storage_bytes"]

_IGNORED = "(pre-existing, not counted)"


def _storages(obj) -> list:
    out = []
    for t in tree_flatten(obj)[0]:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            try:
                out.append(t.untyped_storage())
            except (NotImplementedError, RuntimeError):  # tensors without a storage
                pass
    return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr() if st.nbytes() else id(st)] = st.nbytes()
    return sum(seen.values())


def _baseline_tensors(baseline) -> list[torch.Tensor]:
    if baseline is None:
        return []
    items = baseline if isinstance(baseline, (list, tuple)) else [baseline]
    out: list[torch.Tensor] = []
    for b in items:
        if isinstance(b, torch.Tensor):
            out.append(b)
        elif isinstance(b, nn.Module):
            out += [p for p in b.parameters()] + [x for x in b.buffers()]
            out += [p.grad for p in b.parameters() if p.grad is not None]
        elif isinstance(b, torch.optim.Optimizer):
            for state in b.state.values():
                out += [v for v in state.values() if isinstance(v, torch.Tensor)]
        elif isinstance(b, dict):
            out += [v for v in tree_flatten(b)[0] if isinstance(v, torch.Tensor)]
        else:
            raise TypeError(f"baseline entries must be tensors, modules, optimizers or dicts of tensors, "
                            f"got {type(b).__name__}")
    return out


class LiveTensorTracker(TorchDispatchMode):
    """Track live tensor-storage bytes and their peak while the ``with`` block runs.

    ``baseline``: a tensor, module, optimizer, dict of tensors, or a list of them, counted from the
    start (see the module docstring). ``count_inputs``: count pre-existing tensors an op reads
    from that op on. ``device``: count only storages on this device type (``"cpu"``,
    ``"cuda"``, ``"meta"``...; None: all).

    Attributes after (and during) the block: ``live_bytes``, ``peak_bytes``, ``baseline_bytes``,
    ``peak_above_baseline``, ``peak_breakdown`` (category -> bytes at the peak), ``peak_op`` (the
    op after which the peak was reached), ``n_ops``.
    """

    def __init__(self, baseline=None, count_inputs: bool = True, device: str | None = None):
        super().__init__()
        self._baseline_src = baseline
        self.count_inputs = count_inputs
        self.device = device
        self._lock = threading.Lock()
        self._live: dict[int, tuple[int, str, weakref.ref]] = {}  # key -> (nbytes, category, ref)
        self._by_cat: dict[str, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_op = ""
        self.n_ops = 0
        self._closed = False

    # ------------------------------------------------------------------ bookkeeping
    def _key(self, st) -> int:
        return st._cdata  # the StorageImpl: unique while it lives

    def _add(self, st, category: str) -> None:
        if self.device is not None and st.device.type != self.device:
            return
        key = self._key(st)
        n = 0 if category == _IGNORED else st.nbytes()
        with self._lock:
            old = self._live.get(key)
            if old is not None:
                if old[1] != _IGNORED and old[0] != n:  # resized in place (resize_, out= ops)
                    self._live[key] = (n, old[1], old[2])
                    self._by_cat[old[1]] += n - old[0]
                    self.live_bytes += n - old[0]
                return
        ref = weakref.ref(st, self._make_release(key))
        with self._lock:
            self._live[key] = (n, category, ref)
            self._by_cat[category] = self._by_cat.get(category, 0) + n
            self.live_bytes += n

    def _make_release(self, key: int):
        def release(_ref) -> None:
            with self._lock:
                entry = self._live.get(key)
                if entry is None or entry[2] is not _ref:
                    return
                del self._live[key]
                self._by_cat[entry[1]] -= entry[0]
                self.live_bytes -= entry[0]
        return release

    def _check_peak(self, op: str) -> None:
        if self.live_bytes > self.peak_bytes:
            with self._lock:
                self.peak_bytes = self.live_bytes
                self.peak_breakdown = {k: v for k, v in self._by_cat.items() if v}
                self.peak_op = op

    # ------------------------------------------------------------------ the mode
    def __enter__(self):
        for t in _baseline_tensors(self._baseline_src):
            for st in _storages(t):
                self._add(st, "baseline")
        self.baseline_bytes = self.live_bytes
        self._check_peak("(enter)")
        return super().__enter__()

    def __exit__(self, *exc):
        self._closed = True
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for st in _storages((args, kwargs)):  # pre-existing storages (views of them are not new)
            if self._key(st) not in self._live:
                self._add(st, "input" if self.count_inputs else _IGNORED)
        out = func(*args, **kwargs)
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        name = f"{phase}:{func.overloadpacket.__name__}" if hasattr(func, "overloadpacket") else f"{phase}:{func}"
        for st in _storages(out):
            self._add(st, name)
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.is_mutable:  # in-place / out= ops may have resized an input
            for st in _storages((args, kwargs)):
                self._add(st, name)
        self.n_ops += 1
        self._check_peak(name)
        return out

    # ------------------------------------------------------------------ reporting
    @property
    def peak_above_baseline(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def live_breakdown(self) -> dict[str, int]:
        """Category -> live bytes now."""
        with self._lock:
            return {k: v for k, v in self._by_cat.items() if v}

    def summary(self, top: int = 8) -> str:
        """A few lines: peak, baseline, and the largest categories at the peak."""
        lines = [f"peak {self.peak_bytes / 2**20:.1f} MiB of live tensors (baseline {self.baseline_bytes / 2**20:.1f} "
                 f"MiB, above it {self.peak_above_baseline / 2**20:.1f} MiB) after {self.peak_op}; {self.n_ops} ops"]
        for k, v in sorted(self.peak_breakdown.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {k:<32s} {v / 2**20:10.1f} MiB")
        return "\n".join(lines)
