"""moreau_kernels: fused kernels for the MoreauPruner gradient estimate.

Ops (all in the ``moreau`` torch.library namespace, see :mod:`moreau_kernels.ops`):
``philox_normal``, ``perturb_out`` / ``perturb``, ``perturb_multi``, ``prox_update_``,
``prox_update_multi_``, ``channel_saliency``. Backends: ``reference`` (pure PyTorch, always),
``cpu`` (C++/OpenMP), ``cuda`` (CUDA C++), ``triton``. ``python -m moreau_kernels.info`` says
which are available here and why not.
"""
from . import reference
from .dispatch import (BACKENDS, BackendFallbackWarning, BackendUnavailable, availability, clear_cache, explain,
                       get_backend, select, set_backend, use_backend)
from .ops import (channel_saliency, perturb, perturb_multi, perturb_out, philox_normal, prox_update_,
                  prox_update_multi_)
from .reference import MODE_PAPER, MODE_REFERENCE

__all__ = [
    "BACKENDS", "BackendFallbackWarning", "BackendUnavailable", "MODE_PAPER", "MODE_REFERENCE", "availability",
    "channel_saliency", "clear_cache",
    "explain", "get_backend", "perturb", "perturb_multi", "perturb_out", "philox_normal", "prox_update_",
    "prox_update_multi_", "reference", "select", "set_backend", "use_backend",
]
__version__ = "0.1.0"
