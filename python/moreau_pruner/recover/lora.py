"""LoRA adapters from ``peft`` (the optional extra ``recover``): wrapping a pruned model, reading and
writing adapter weights. peft wraps each ``nn.Linear`` with its own shape, so the per-layer widths of a
pruned model need nothing special."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import check_fit
from .config import DEFAULT_TARGET_MODULES, RecoverConfig

__all__ = ["ADAPTER_WEIGHTS", "MissingExtraError", "adapter_tensors", "load_adapter_weights", "make_lora_config",
           "peft_module", "read_adapter_dir", "wrap"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MissingExtraError(ImportError):
    """The optional extra ``recover`` (peft) is not installed."""


def peft_module():
    try:
        import peft
    except ImportError as exc:
        raise MissingExtraError(
            "LoRA recovery needs peft, the optional extra 'recover': pip install 'moreau-kernels[recover]' "
            "(or pip install peft)"
        ) from exc
    return peft



def make_lora_config(cfg: RecoverConfig):
    peft = peft_module()
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(model, lora_config):
    """``model`` with LoRA adapters; every targeted linear of every layer must be wrapped."""
    peft = peft_module()
    targets = set(lora_config.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(targets - present)
    if missing:
        raise ValueError(f"target modules {missing} do not exist in {type(model).__name__} "
                         f"(LLaMA-family names: {', '.join(DEFAULT_TARGET_MODULES)})")
    peft_model = peft.get_peft_model(model, lora_config)
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():  # a LoraLayer's own child is named base_layer
        if name.rsplit(".", 1)[-1] in targets and not isinstance(module, LoraLayer):
            raise RuntimeError(f"peft did not wrap {name} ({type(module).__name__})")
    return peft_model


def adapter_tensors(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_weights(peft_model, state: dict[str, torch.Tensor], where: str) -> None:
    """Loads adapter tensors into ``peft_model`` after checking every name and shape."""
    from peft import set_peft_model_state_dict

    check_fit({k: tuple(v.shape) for k, v in adapter_tensors(peft_model).items()}, state, f"adapter {where}")
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter {where}: peft did not use {len(unexpected)} tensors (e.g. {unexpected[0]})")


def read_adapter_dir(directory: Path):
    """(LoraConfig, tensors) of a directory written by peft ``save_pretrained``."""
    peft = peft_module()
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    cfg_file = directory / "adapter_config.json"
    weights = directory / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a peft adapter directory (needs adapter_config.json and "
                                f"{ADAPTER_WEIGHTS})")
    try:
        lora_config = peft.LoraConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise ValueError(f"{cfg_file} is not a LoRA adapter config: {exc}") from exc
    from safetensors.torch import load_file

    return lora_config, load_file(str(weights))
