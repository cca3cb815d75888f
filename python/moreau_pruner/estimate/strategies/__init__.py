"""Memory strategies of the estimate loop (see :mod:`.base` for the interface)."""
from .base import NAMES, State, Strategy, Updates, refusals
from .fsdp import FsdpStrategy
from .lean import Lean
from .reference import Reference
from .regen import Regen

#: strategies that run in one process, by name
STRATEGIES = {"reference": Reference, "lean": Lean, "regen": Regen}

__all__ = ["FsdpStrategy", "Lean", "NAMES", "Reference", "Regen", "STRATEGIES", "State", "Strategy", "Updates",
           "refusals"]
