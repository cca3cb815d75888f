"""Which pruning options combine: every rule in one place, checked once, before any work.

The same rules serve the command line and the library; only the way a message names an option
differs (``--allocation owl`` on the command line, ``allocation 'owl'`` in the library), so
:func:`check` takes ``cli=True`` from the CLIs and is called with the default by
:func:`moreau_pruner.pipeline.prune_model`, :func:`moreau_pruner.prune.policy.policy_prune` and
:func:`moreau_pruner.unstructured.prune.unstructured_prune`.

Values that concern one setting alone (a ratio in (0, 1), a known scope) are checked by the config
objects themselves (:class:`~moreau_pruner.prune.config.PruneConfig` and friends); the layer ranges,
which need the model, by :func:`~moreau_pruner.prune.target.resolve_target`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..score import methods

_UNSET = object()


class IncompatibleOptions(ValueError):
    """Two or more options that do not combine (the message names them)."""


@dataclass(frozen=True)
class Request:
    """The choices whose combinations are restricted."""

    method: str = "moreau"
    unstructured: bool = False
    nm: str | None = None  # N:M sparsity as written ("2:4")
    allocation: str = "uniform"  # layer allocator, row allocator or "<layer>+trim"
    rounds: int = 1
    uniform: bool = False
    scope: str = "local"
    round_to: int | None = None
    layer_ratios: bool = False  # per-layer ratios given directly (library)
    init: str | None = None  # start of the policy-gradient search
    noise: str = "philox"
    distributed: bool = False
    policy: bool = False  # a PolicyConfig given (library)
    target_params: bool = False  # a kept-parameter budget given (library)

    @property
    def trim(self) -> bool:
        return self.allocation.endswith("trim")


class _Names:
    """How a message names an option: the CLI flag (``--allocation owl``) or the library argument
    (``allocation 'owl'``)."""

    def __init__(self, cli: bool):
        self.cli = cli

    def __call__(self, key: str, value=_UNSET) -> str:
        if self.cli:
            flag = "--" + key.replace("_", "-")
            return flag if value is _UNSET else f"{flag} {value}"
        return key if value is _UNSET else f"{key} {value!r}"


def _distributed_problems(req: Request, n: _Names) -> list[str]:
    """What has no FSDP2 path yet (all of it is reported at once)."""
    out = []
    if req.unstructured:
        out.append(f"{n('unstructured')} has no distributed path yet (structured methods only)")
    if req.allocation != "uniform":
        out.append(f"{n('allocation', req.allocation)} has no distributed path yet (only uniform)")
    if req.noise != "philox":
        out.append(f"{n('noise', req.noise)} has no distributed path yet (use philox)")
    m = methods.get(req.method)
    if m.search:
        out.append(f"{n('method', req.method)} has no distributed path yet (its masked forwards run in one process)")
    elif not m.distributed:
        out.append(f"{n('method', req.method)} is unstructured; no distributed path yet")
    if req.rounds != 1:
        out.append(f"{n('rounds', req.rounds)} has no distributed path yet (one-shot only)")
    return out


def check(req: Request, cli: bool = False) -> None:
    """Raise :class:`IncompatibleOptions` naming the first combination of ``req`` that cannot run
    (with ``distributed``, every option without an FSDP2 path at once)."""
    n = _Names(cli)
    m = methods.get(req.method)
    if req.distributed:
        problems = _distributed_problems(req, n)
        if problems:
            raise IncompatibleOptions("; ".join(problems))
    if isinstance(req.rounds, bool) or not isinstance(req.rounds, int) or req.rounds < 1:
        raise IncompatibleOptions(f"{n('rounds')} must be a positive integer, got {req.rounds!r}")
    if req.unstructured:
        _check_unstructured(req, m, n)
    else:
        _check_structured(req, m, n)
    if (req.policy or req.target_params) and not m.search:
        given = n("policy") if req.policy else n("target_params")
        raise IncompatibleOptions(f"{given} configures the policy-gradient search; it does not apply to "
                                  f"{n('method', req.method)} (for a parameter budget use ratio_for_params)")
    if req.init is not None and not m.search:
        raise IncompatibleOptions(f"{n('init')} starts the policy-gradient pruner from a method's scores; it does "
                                  f"not apply to {n('method', req.method)}")


def _check_unstructured(req: Request, m: methods.Method, n: _Names) -> None:
    if m.search:
        raise IncompatibleOptions(f"{n('method', req.method)} removes whole units (structural pruning); it does not "
                                  f"combine with {n('unstructured')}")
    if not m.unstructured:
        raise IncompatibleOptions(f"{n('unstructured')} supports methods {', '.join(methods.UNSTRUCTURED)}; got "
                                  f"{req.method}")
    if req.trim and req.nm:
        raise IncompatibleOptions(f"{n('allocation', req.allocation)} does not combine with {n('nm', req.nm)}: N:M "
                                  "sparsity fixes n of every m weights in each row, TRIM gives every row its own "
                                  "ratio")
    if req.rounds > 1:
        raise IncompatibleOptions(f"{n('rounds')} applies to structured pruning; {n('unstructured')} prunes in one "
                                  "shot")
    if req.uniform:
        raise IncompatibleOptions(f"{n('uniform')} is for structural pruning; {n('unstructured')} keeps every "
                                  "layer's shape already")


def _check_structured(req: Request, m: methods.Method, n: _Names) -> None:
    if not m.structured:
        raise IncompatibleOptions(f"{n('method', req.method)} is an unstructured method: add {n('unstructured')}")
    if req.nm:
        raise IncompatibleOptions(f"{n('nm')} needs {n('unstructured')}")
    if req.trim:
        raise IncompatibleOptions(f"{n('allocation', req.allocation)}: TRIM gives each output row of a matrix its own "
                                  f"sparsity, which only {n('unstructured')} pruning has (structural pruning removes "
                                  f"whole heads and channels); add {n('unstructured')} or use a layer allocator")
    if m.search:
        _check_search(req, n)
    if req.uniform:
        if req.scope != "local":
            raise IncompatibleOptions(f"{n('uniform')} prunes the same counts in every layer (the local rule); "
                                      f"{n('scope', req.scope)} varies them per layer")
        if req.allocation != "uniform" or req.layer_ratios:
            what = n("allocation", req.allocation) if req.allocation != "uniform" else "per-layer ratios"
            raise IncompatibleOptions(f"{n('uniform')} keeps every layer at the same width; {what} gives layers "
                                      "different ratios")


def _check_search(req: Request, n: _Names) -> None:
    pg = n("method", req.method)
    if req.allocation != "uniform" or req.layer_ratios:
        what = n("allocation", req.allocation) if req.allocation != "uniform" else "per-layer ratios"
        raise IncompatibleOptions(f"{pg} allocates the budget across layers itself; {what} does not apply")
    if req.rounds != 1:
        raise IncompatibleOptions(f"{pg} searches the whole mask at once; {n('rounds')} does not apply")
    if req.uniform:
        raise IncompatibleOptions(f"{pg} gives layers different widths; it cannot make a {n('uniform')} model")
    if req.round_to:
        raise IncompatibleOptions(f"{n('round_to')} is not supported by {pg} (its widths follow the budget)")
