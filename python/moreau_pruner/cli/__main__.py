"""``python -m moreau_pruner.cli`` (and ``torchrun ... -m moreau_pruner.cli --distributed fsdp``): moreau-prune."""
import sys

from .prune import main

sys.exit(main())
