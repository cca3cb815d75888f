"""The training losses of recovery."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import IGNORE_INDEX

__all__ = ["lm_loss_sum"]


def lm_loss_sum(model, ids, labels, mask) -> torch.Tensor:
    """Sum over the batch of the next-token cross-entropy at every labelled position (fp32)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
