"""The Triton backend of the moreau ops (one file per op, Liger style).

:mod:`moreau_kernels.dispatch` calls these with the argument order of
:mod:`moreau_kernels.reference`; inputs arrive validated and contiguous (see ``ops.py``). Runs on
CUDA tensors, and on CPU fp32 tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from .saliency import channel_saliency
from .perturb import perturb_multi, perturb_out
from .philox import philox_bits, philox_normal
from .prox_update import prox_update_, prox_update_multi_

__all__ = ["channel_saliency", "perturb_multi", "perturb_out", "philox_bits", "philox_normal", "prox_update_",
           "prox_update_multi_"]
