"""Recovery after pruning (``moreau-recover``): a short LoRA fine-tune of the pruned model; see :mod:`.train`."""
from .train import (ADAPTER_DIR, ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, DEFAULT_TARGET_MODULES, IGNORE_INDEX,
                    REPORT_FILE, MissingExtraError, RecoverConfig, RecoveryData, RecoverResult, alpaca_prompt,
                    build_parser, load_recovery_data, main, recover)

__all__ = ["ADAPTER_DIR", "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "DEFAULT_TARGET_MODULES", "IGNORE_INDEX",
           "REPORT_FILE", "MissingExtraError", "RecoverConfig", "RecoveryData", "RecoverResult", "alpaca_prompt",
           "build_parser", "load_recovery_data", "main", "recover"]
