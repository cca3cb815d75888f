"""The training losses of recovery: the LM loss and distillation from the dense teacher.

Every loss here is a *sum* over the labelled next-token positions of a micro-batch (position ``t``
predicts token ``t + 1``; a position counts when ``labels[t + 1] != -100``), in float32 whatever the
models' dtype; the training loop divides by the labelled tokens of the whole optimizer batch.

Distillation compares the teacher's next-token distribution ``p`` with the student's ``q``, both at
temperature ``T`` (``softmax(logits / T)``), by the forward KL divergence
``KL(p || q) = sum_v p_v (log p_v - log q_v)`` and scales it by ``T²`` (Hinton et al.: the gradient of
the softened KL shrinks as ``1 / T²``). With ``top_k`` the two distributions are first coarsened to the
teacher's ``k`` most likely tokens plus one bin for all other tokens, whose mass is ``1 - sum of the k``
(computed as a log-sum-exp of the other tokens, not a subtraction): still a true KL divergence, zero
exactly when the coarsened distributions agree, and equal to the full KL when ``k`` covers the
vocabulary. The teacher's side is reduced to :class:`TeacherTargets` (``N x V`` or ``N x k`` values
for the ``N`` labelled positions of one micro-batch) before the student runs, so the teacher's logits
of the whole micro-batch are dropped early and those of the run are never held at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dataset import IGNORE_INDEX

__all__ = ["TeacherTargets", "distillation_kl_sum", "distillation_loss", "lm_loss_sum", "mix", "next_token_ce",
           "teacher_targets"]


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the next-token cross-entropy at every labelled position (fp32)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def lm_loss_sum(model, ids, labels, mask) -> torch.Tensor:
    """:func:`next_token_ce` of ``model``'s logits for ``ids`` (the LM loss of one micro-batch)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return next_token_ce(logits, labels)


def _labelled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The next-token logits (``N x V``, fp32) of the labelled positions."""
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()


@dataclass
class TeacherTargets:
    """The teacher's side of the KL for the labelled positions of one micro-batch, at temperature
    ``temperature``: ``log_probs`` (``N x V``) when ``index`` is None; else the log-probabilities of
    the teacher's top-k tokens (``N x k``), their token ids ``index`` and the log of the mass of every
    other token ``log_rest`` (``N``)."""

    log_probs: torch.Tensor
    temperature: float
    index: torch.Tensor | None = None
    log_rest: torch.Tensor | None = None


def teacher_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    top_k: int | None = None) -> TeacherTargets:
    """:class:`TeacherTargets` from the teacher's logits of a micro-batch (``batch x len x V``)."""
    log_p = F.log_softmax(_labelled(teacher_logits, labels) / temperature, dim=-1)
    if top_k is None or top_k >= log_p.shape[-1]:
        return TeacherTargets(log_p, temperature)
    top, index = log_p.topk(top_k, dim=-1)
    log_rest = log_p.scatter(-1, index, float("-inf")).logsumexp(dim=-1)
    return TeacherTargets(top, temperature, index, log_rest)


def distillation_kl_sum(student_logits: torch.Tensor, targets: TeacherTargets, labels: torch.Tensor) -> torch.Tensor:
    """``sum over labelled positions of KL(p_teacher || q_student)`` at the targets' temperature
    (not yet scaled by ``T²``); differentiable in ``student_logits``."""
    log_q = F.log_softmax(_labelled(student_logits, labels) / targets.temperature, dim=-1)
    if log_q.shape[0] != targets.log_probs.shape[0]:
        raise ValueError(f"the student has {log_q.shape[0]} labelled positions and the teacher's targets "
                         f"{targets.log_probs.shape[0]}: they must come from the same micro-batch")
    if targets.index is None:
        if log_q.shape[-1] != targets.log_probs.shape[-1]:
            raise ValueError(f"the teacher predicts {targets.log_probs.shape[-1]} tokens and the student "
                             f"{log_q.shape[-1]}: distillation needs one vocabulary")
        return (targets.log_probs.exp() * (targets.log_probs - log_q)).sum()
    log_q_top = log_q.gather(-1, targets.index)
    log_q_rest = log_q.scatter(-1, targets.index, float("-inf")).logsumexp(dim=-1)
    top = (targets.log_probs.exp() * (targets.log_probs - log_q_top)).sum()
    rest = (targets.log_rest.exp() * (targets.log_rest - log_q_rest)).sum()
    return top + rest


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, top_k: int | None = None,
                      lm_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, ce)`` summed over the labelled positions of a micro-batch:
    ``loss = (1 - lm_weight) * T² * kl + lm_weight * ce``, ``kl`` the KL divergence at temperature
    ``T`` (:func:`distillation_kl_sum`), ``ce`` the LM loss (:func:`next_token_ce`). ``ce`` carries no
    gradient when ``lm_weight`` is 0."""
    with torch.no_grad():
        targets = teacher_targets(teacher_logits, labels, temperature, top_k)
    kl = distillation_kl_sum(student_logits, targets, labels)
    return mix(kl, student_logits, labels, temperature, lm_weight)


def mix(kl: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
        lm_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((1 - lm_weight) * T² * kl + lm_weight * ce, kl, ce)`` (see :func:`distillation_loss`)."""
    if lm_weight == 0:
        with torch.no_grad():
            ce = next_token_ce(student_logits, labels)
        return temperature * temperature * kl, kl, ce
    ce = next_token_ce(student_logits, labels)
    return (1.0 - lm_weight) * temperature * temperature * kl + lm_weight * ce, kl, ce
