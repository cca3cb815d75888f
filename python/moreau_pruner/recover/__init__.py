"""Recovery after pruning (``moreau-recover``): a short fine-tune of the pruned model (LoRA or every
weight; LM loss or distillation from the dense model); see :mod:`.train`."""
from .train import (ADAPTER_DIR, ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, DEFAULT_TARGET_MODULES, GENERATED,
                    IGNORE_INDEX, GenerationSettings,
                    REPORT_FILE, MissingExtraError, RecoverConfig, RecoveryData, RecoverResult, Teacher,
                    alpaca_prompt, load_recovery_data, load_teacher, recover, resolve_teacher)

__all__ = ["ADAPTER_DIR", "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "DEFAULT_TARGET_MODULES", "GENERATED",
           "GenerationSettings", "IGNORE_INDEX",
           "REPORT_FILE", "MissingExtraError", "RecoverConfig", "RecoveryData", "RecoverResult", "Teacher",
           "alpaca_prompt", "load_recovery_data", "load_teacher", "recover",
           "resolve_teacher"]
