"""``python -m moreau_pruner.recover``: moreau-recover."""
import sys

from .cli import main

sys.exit(main())
