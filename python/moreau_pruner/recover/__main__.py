"""``python -m moreau_pruner.recover``: moreau-recover."""
import sys

from ..cli.recover import main

sys.exit(main())
