"""``python -m moreau_pruner.recover``: moreau-recover."""
import sys

from .train import main

sys.exit(main())
