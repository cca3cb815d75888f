"""What a recovery run trains (``RecoverConfig.tuning``): LoRA adapters or every weight of the model.

Both answer the same calls, so the training loop does not ask which one runs:

* :meth:`prepare` readies the model and returns the module to train;
* :meth:`trainable` lists the parameters the optimizer updates;
* :meth:`tensors` / :meth:`load` are the trained weights a checkpoint stores (``weights_file``);
* :meth:`autocast` is the context of the forward passes;
* :meth:`finish` returns the plain model to evaluate and save;
* :meth:`save_side` writes what goes next to the saved model (LoRA: the adapter alone).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoints import check_fit
from .config import RecoverConfig
from .lora import ADAPTER_WEIGHTS, adapter_tensors, load_adapter_weights, make_lora_config, read_adapter_dir, wrap

__all__ = ["FullTuning", "LoraTuning", "make_tuning"]


class LoraTuning:
    """LoRA adapters (peft) on ``cfg.target_modules``, merged into the weights at the end; optionally
    starting from a saved adapter, whose rank, alpha, dropout and targets then apply."""

    kind = "lora"
    weights_file = ADAPTER_WEIGHTS

    def __init__(self, adapter: str | Path | None = None):
        self.adapter = adapter
        self.adapter_cfg = self.adapter_state = None
        if adapter is not None:
            self.adapter_cfg, self.adapter_state = read_adapter_dir(Path(adapter))
        self.model = None

    def settle(self, cfg: RecoverConfig) -> RecoverConfig:
        """``cfg`` with the starting adapter's LoRA settings (if any)."""
        if self.adapter_cfg is None:
            return cfg
        a = self.adapter_cfg
        return replace(cfg, rank=a.r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                       target_modules=tuple(sorted(a.target_modules)))

    def prepare(self, model, cfg: RecoverConfig):
        torch.manual_seed(cfg.seed)  # LoRA A initialisation
        lora_config = self.adapter_cfg if self.adapter_cfg is not None else make_lora_config(cfg)
        lora_config.inference_mode = False
        self.model = wrap(model, lora_config)
        if self.adapter_state is not None:
            load_adapter_weights(self.model, self.adapter_state, str(self.adapter))
        return self.model

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def tensors(self) -> dict[str, torch.Tensor]:
        return adapter_tensors(self.model)

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        load_adapter_weights(self.model, tensors, where)

    def autocast(self):
        return contextlib.nullcontext()

    def save_side(self, directory: Path) -> None:
        """The adapter alone (peft ``save_pretrained``), written before merging."""
        self.model.save_pretrained(str(directory))

    def finish(self):
        return self.model.merge_and_unload()


class FullTuning:
    """Every weight of the pruned model is trained. With a 16-bit training dtype the weights are kept in
    float32 during training (AdamW's small steps vanish in a bfloat16 weight) and the forward passes run
    under ``torch.autocast`` in that dtype; :meth:`finish` returns the model in the training dtype."""

    kind = "full"
    weights_file = "model.safetensors"

    def __init__(self, adapter: str | Path | None = None):
        if adapter is not None:
            raise ValueError("a starting LoRA adapter (--adapter) applies to LoRA tuning only, not to full "
                             "fine-tuning; merge it first (--adapter DIR --max-steps 0) and fully fine-tune the "
                             "merged model")
        self.model = None
        self.dtype = None

    def settle(self, cfg: RecoverConfig) -> RecoverConfig:
        return cfg

    def prepare(self, model, cfg: RecoverConfig):
        torch.manual_seed(cfg.seed)
        self.dtype = cfg.resolved_dtype()
        self.device_type = torch.device(cfg.device).type
        if self.dtype != torch.float32:
            _cast_parameters(model, torch.float32)
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        self.model = model
        return model

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def tensors(self) -> dict[str, torch.Tensor]:
        # named_parameters lists a tied weight once (under its first name), as load() expects
        return {k: p.detach().to("cpu").contiguous().clone() for k, p in self.model.named_parameters()}

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        params = dict(self.model.named_parameters())
        check_fit({k: tuple(p.shape) for k, p in params.items()}, tensors, f"checkpoint {where}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def save_side(self, directory: Path) -> None:
        return None

    def finish(self):
        self.model.requires_grad_(False)
        if self.dtype != torch.float32:
            _cast_parameters(self.model, self.dtype)
        return self.model


def _cast_parameters(model, dtype: torch.dtype) -> None:
    """The floating-point parameters of ``model`` in ``dtype``; buffers (e.g. the rotary frequencies, which
    lose position resolution in 16 bits) stay as they are."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)


def make_tuning(cfg: RecoverConfig, adapter: str | Path | None = None):
    """The :class:`LoraTuning` or :class:`FullTuning` of ``cfg.tuning``."""
    return {"lora": LoraTuning, "full": FullTuning}[cfg.tuning](adapter)
