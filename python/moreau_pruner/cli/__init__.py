"""The command-line interfaces: ``moreau-prune`` (this package's ``main``), ``moreau-recover`` and ``moreau-eval``."""
from .prune import main

__all__ = ["main"]
