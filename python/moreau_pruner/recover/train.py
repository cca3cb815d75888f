"""Recovering a pruned model's quality with a short fine-tune (``moreau-recover``).

The default is the recipe of LLM-Pruner and MoreauPruner's recovery stage: LoRA adapters (rank 8,
alpha 16, dropout 0.05) on every attention and MLP projection (q/k/v/o, gate/up/down), AdamW at lr
1e-4, 2 epochs over sequences cut off at 256 tokens, the LM loss; then the adapter is merged into the
weights. ``distill=True`` learns from the dense teacher's next-token distributions instead (KL
divergence, optionally mixed with the LM loss), and ``tuning="full"`` trains every weight.

This module is the stage's public address; the pieces live by concern:

* :mod:`.config`: :class:`RecoverConfig`, the settings of a run;
* :mod:`.dataset`: :func:`load_recovery_data` (corpora, text files, ``{"text"}`` rows, Alpaca rows)
  and the deterministic order of the batches;
* :mod:`.lora`: the peft adapters (wrapping, reading and writing adapter weights);
* :mod:`.tuning`: what is trained (LoRA adapters or every weight), behind one interface;
* :mod:`.generate`: recovery text the teacher samples itself (``data="generated"``);
* :mod:`.teacher`: the dense teacher (which model, loaded frozen, checked against the student);
* :mod:`.losses`: the LM loss and the distillation loss;
* :mod:`.checkpoints`: checkpoints under ``OUT/checkpoints`` and the output directory checks;
* :mod:`.loop`: :func:`recover`, the run itself (train, merge, evaluate, save);
and the command line, ``moreau-recover``, is :mod:`moreau_pruner.cli.recover`.
"""
from __future__ import annotations

from .config import DEFAULT_TARGET_MODULES, RecoverConfig
from .dataset import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, RecoveryData, alpaca_prompt,
                      load_recovery_data)
from .generate import GENERATED, GenerationSettings
from .lora import MissingExtraError
from .loop import ADAPTER_DIR, REPORT_FILE, RecoverResult, recover
from .teacher import Teacher, load_teacher, resolve_teacher

__all__ = [
    "ADAPTER_DIR",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "DEFAULT_TARGET_MODULES",
    "GENERATED",
    "GenerationSettings",
    "IGNORE_INDEX",
    "MissingExtraError",
    "REPORT_FILE",
    "RecoverConfig",
    "RecoveryData",
    "RecoverResult",
    "Teacher",
    "alpaca_prompt",
    "load_recovery_data",
    "load_teacher",
    "recover",
    "resolve_teacher",
]
