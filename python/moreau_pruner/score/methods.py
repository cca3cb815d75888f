"""The scoring methods by name, and what each one is for.

One table answers, for the CLI's choices, the library, the sharded path and the compatibility
rules: which methods exist, whether a method scores whole units (structural pruning), single
weights (``--unstructured``) or both, whether it needs a calibration batch, whether it has an
FSDP2 path, and whether it is a search that chooses the units itself (the policy-gradient pruner)
or can start that search (:data:`POLICY_INITS`). The functions that compute the scores live in
:mod:`moreau_pruner.score.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    structured: bool = True  # scores attention units and MLP channels
    unstructured: bool = False  # gives a per-weight metric for unstructured / N:M pruning
    needs_batch: bool = True
    distributed: bool = True  # has an FSDP2 path
    search: bool = False  # chooses the units itself instead of scoring them


_TABLE = (
    Method("moreau", "Moreau-envelope estimate of the gradient (SPEC §2-3), then |W * G|", unstructured=True),
    Method("taylor", "plain gradient (LLM-Pruner's Taylor importance and its variants)", unstructured=True),
    Method("magnitude", "|W|", unstructured=True, needs_batch=False),
    Method("random", "random scores (a baseline)", needs_batch=False),
    Method("policy-gradient", "learn which units to remove from forward passes only (arXiv 2406.10576)",
           distributed=False, search=True),
    Method("wanda", "|W| * input activation norm (unstructured only)", structured=False, unstructured=True,
           distributed=False),
    Method("gblm", "Wanda plus gradient norms (GBLM-Pruner; unstructured only)", structured=False,
           unstructured=True, distributed=False),
)
REGISTRY: dict[str, Method] = {m.name: m for m in _TABLE}
#: every method name, in the order the CLI lists them
METHODS: tuple[str, ...] = tuple(REGISTRY)
#: methods that score units for structural pruning (the search excluded)
UNIT_SCORERS: tuple[str, ...] = tuple(m.name for m in _TABLE if m.structured and not m.search)
#: methods with a per-weight metric for unstructured pruning
UNSTRUCTURED: tuple[str, ...] = tuple(m.name for m in _TABLE if m.unstructured)
#: starting points of the policy-gradient search: ``none`` (no prior) or a unit scorer's scores
POLICY_INITS: tuple[str, ...] = ("none", "taylor", "moreau", "magnitude")


def get(name: str) -> Method:
    """The method called ``name``, or a ValueError listing them."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {METHODS}, got {name!r}") from None
